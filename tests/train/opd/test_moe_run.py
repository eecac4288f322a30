"""An MoE student in real runs at DP2 x EP2 (experts split over the two data-parallel ranks): SFT that resumes
exactly after a SIGKILL, then OPD whose sampler (the embedded engine, synced by broadcast) serves the trainer's
weights every step."""
import json

import pytest

from helpers import REPO, opd


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]


@pytest.mark.slow
def test_moe_student_at_ep2_resumes_exactly_and_distils_with_its_sampler_in_sync(tmp_path):
    from transformers import AutoTokenizer

    from megatron_opd.model.tiny import make_tiny_qwen3_moe

    tokenizer = REPO / "assets" / "tiny" / "tokenizer"
    student = make_tiny_qwen3_moe(tmp_path / "student", len(AutoTokenizer.from_pretrained(str(tokenizer))),
                                  "nano_moe", seed=0, tokenizer_dir=tokenizer)
    layout = ["parallel.pp=1", "parallel.dp=2", "parallel.ep=2"]
    sft = [str(REPO / "recipes" / "tiny" / "sft.yaml"), f"model.hf_path={student}", *layout, "train.steps=4",
           "train.save_interval=2", "train.log_interval=1", "data.eval_max_rows=8"]
    opd("run", *sft, f"run.output_dir={tmp_path / 'straight'}")
    killed = opd("run", *sft, f"run.output_dir={tmp_path / 'resumed'}", env={"OPD_FAULT_INJECT": "step:4"}, check=False)
    assert killed.returncode != 0
    again = opd("run", *sft, f"run.output_dir={tmp_path / 'resumed'}")
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):  # the experts' shards and optimizer state came back from the checkpoint exactly
        assert (x["train/loss"], x["train/grad_norm"]) == (y["train/loss"], y["train/grad_norm"]), x["step"]

    out = tmp_path / "opd"
    opd("run", str(REPO / "recipes" / "tiny" / "opd_arith.yaml"), f"model.hf_path={tmp_path / 'straight' / 'hf'}",
        "parallel.tp=1", *layout, "train.prompts_per_step=4", "rollout.n=2", "train.micro_batch_size=4",
        "rollout.max_new_tokens=24", "train.steps=3", "train.save_interval=0", "eval.world_dir=null",
        "rollout.max_staleness=0", f"run.output_dir={out}")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the engine samples with the weights the trainer has (a sync that lost an expert would not)
        assert r["opd/train_inference_mismatch"] <= 1e-5 and r["train/tokens"] > 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["weight_versions"] for s in samples] == [[step - 1] * 8 for step in (1, 2, 3)]
