"""An MoE student in real runs at DP2 x EP2 (experts split over the two data-parallel ranks): SFT that resumes
exactly after a SIGKILL; OPD with routing replay whose sampler (an `opd serve` rollout server, synced from disk)
serves the trainer's weights every step and returns the experts it routed each token to."""
import json

import pytest

from helpers import REPO, opd


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]


@pytest.mark.slow
def test_moe_student_sft_at_ep2_with_router_losses_resumes_exactly(tmp_path):
    from transformers import AutoTokenizer

    from megatron_opd.model.tiny import make_tiny_qwen3_moe

    tokenizer = REPO / "assets" / "tiny" / "tokenizer"
    student = make_tiny_qwen3_moe(tmp_path / "student", len(AutoTokenizer.from_pretrained(str(tokenizer))),
                                  "nano_moe", seed=0, tokenizer_dir=tokenizer)
    layout = ["parallel.pp=1", "parallel.dp=2", "parallel.ep=2"]
    sft = [str(REPO / "recipes" / "tiny" / "sft.yaml"), f"model.hf_path={student}", *layout, "train.steps=4",
           "train.save_interval=2", "train.log_interval=1", "data.eval_max_rows=8",
           "model.moe.load_balancing=aux_loss", "model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001"]
    opd("run", *sft, f"run.output_dir={tmp_path / 'straight'}")
    killed = opd("run", *sft, f"run.output_dir={tmp_path / 'resumed'}", env={"OPD_FAULT_INJECT": "step:4"}, check=False)
    assert killed.returncode != 0
    again = opd("run", *sft, f"run.output_dir={tmp_path / 'resumed'}")
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):  # the experts' shards and optimizer state came back from the checkpoint exactly
        assert (x["train/loss"], x["train/grad_norm"]) == (y["train/loss"], y["train/grad_norm"]), x["step"]
        # the routers' losses, logged: E / (k T^2) sum_e P_e n_e is 1 for even routing; z-loss > 0
        assert 0.5 < x["moe/load_balancing_loss"] < 4 and x["moe/z_loss"] > 0  # at most E (= 4): all on one expert
        assert (x["moe/load_balancing_loss"], x["moe/z_loss"]) == (y["moe/load_balancing_loss"], y["moe/z_loss"])


@pytest.mark.slow
def test_routing_replay_from_rollout_servers_at_ep2_resumes_exactly(tmp_path):
    """OPD at DP2 x EP2 with routing replay, sampled by an `opd serve` rollout server that returns each token's
    experts in SGLang's form: every step logs the sampler's per-expert load, the sampler stays on the trainer's
    weights, and a run killed after its step-2 checkpoint resumes to the same numbers."""
    from transformers import AutoTokenizer

    from megatron_opd.model.tiny import make_tiny_qwen3_moe

    tokenizer = REPO / "assets" / "tiny" / "tokenizer"
    student = make_tiny_qwen3_moe(tmp_path / "student", len(AutoTokenizer.from_pretrained(str(tokenizer))),
                                  "nano_moe", seed=0, tokenizer_dir=tokenizer)
    run = [str(REPO / "recipes" / "tiny" / "opd_arith.yaml"), f"model.hf_path={student}", "parallel.tp=1",
           "parallel.pp=1", "parallel.dp=2", "parallel.ep=2", "train.prompts_per_step=4", "rollout.n=2",
           "train.micro_batch_size=4", "rollout.max_new_tokens=16", "train.steps=3", "train.save_interval=1",
           "eval.world_dir=null", "rollout.max_staleness=0", "train.routing_replay=true",
           "rollout.engine=embedded_server", "rollout.sync=disk"]
    opd("run", *run, f"run.output_dir={tmp_path / 'straight'}")
    killed = opd("run", *run, f"run.output_dir={tmp_path / 'resumed'}", env={"OPD_FAULT_INJECT": "step:3"}, check=False)
    assert killed.returncode != 0
    opd("run", *run, f"run.output_dir={tmp_path / 'resumed'}")
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b][-3:] == [1, 2, 3]
    b = b[-3:]
    for x, y in zip(a, b):
        assert (x["train/loss"], x["train/grad_norm"]) == (y["train/loss"], y["train/grad_norm"]), x["step"]
        loads = [x[f"moe/expert_load/{e:03d}"] for e in range(4)]
        assert abs(sum(loads) - 1) < 1e-9 and min(loads) > 0 and x["moe/load_imbalance"] >= 1
        assert x["opd/train_inference_mismatch"] <= 1e-5
    assert (tmp_path / "straight" / "plots" / "expert_load.png").is_file()  # the report draws the load
