"""The SFT stage, run for real through `opd run` (torchrun + gloo when it needs several processes)."""
import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import opd, opd_signalled, read_metrics, sft_recipe


@pytest.mark.slow
def test_one_step_tp2pp2_equals_tp1pp1(tiny_world, tmp_path):
    """TP2 x PP2 with micro-batches by token budget (other rows, other shapes per micro-batch, which
    the pipeline stages exchange) against TP1 x PP1 in rows of the draw order: the same step."""
    results = {}
    for tp, pp, extra in [(1, 1, []), (2, 2, ["train.max_tokens_per_micro_batch=120"])]:
        out = tmp_path / f"tp{tp}pp{pp}"
        opd("run", str(sft_recipe(tiny_world, out, tp=tp, pp=pp, steps=1)), *extra)
        (record,) = [r for r in read_metrics(out) if "train/loss" in r]
        results[(tp, pp)] = record
    a, b = results[(1, 1)], results[(2, 2)]
    assert a["train/tokens"] == b["train/tokens"] > 0
    for key in ("train/loss", "train/grad_norm"):
        assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a[key], b[key])


def _final_weights(out):
    return load_file(out / "hf" / "model.safetensors")


@pytest.mark.slow
def test_resume_after_sigkill_and_after_sigint_is_exact(tiny_world, tmp_path):
    common = dict(steps=20, save_interval=5, keep_last=2)
    straight = tmp_path / "straight"
    opd("run", str(sft_recipe(tiny_world, straight, pp=2, **common)))

    resumed = tmp_path / "resumed"
    recipe = sft_recipe(tiny_world, resumed, pp=2, **common)
    # 1) killed with SIGKILL right before step 13: steps 11-12 are lost, checkpoint 10 survives
    killed = opd("run", str(recipe), env={"OPD_FAULT_INJECT": "step:13"}, check=False)
    assert killed.returncode != 0
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    # 2) resumed, then killed while checkpoint 15 is being written: 10 must stay loadable
    killed = opd("run", str(recipe), env={"OPD_FAULT_INJECT": "save:15"}, check=False)
    assert killed.returncode != 0
    assert "resumed from" in killed.stdout and "at step 10" in killed.stdout
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    assert (resumed / "checkpoints" / ".tmp-step-00000015").is_dir()  # the half-written one
    assert not (resumed / "checkpoints" / "step-00000015").exists()
    opd("export-hf", str(resumed / "checkpoints"), str(tmp_path / "from_step10"))
    assert (tmp_path / "from_step10" / "model.safetensors").is_file()
    # 3) resumed, then Ctrl-C (SIGINT to the whole process group, as a terminal sends it: each rank gets it from
    # the terminal and again from the launcher) while step 13 runs: that step finishes, is checkpointed, and the
    # run exits with 75 (the same command resumes it); no step after 10 is redone
    stopped = opd_signalled("run", str(recipe), signum=signal.SIGINT, before_step=13, process_group=True)
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    assert "stopped on SIGINT after step 13: checkpoint" in stopped.stdout and "Traceback" not in stopped.stdout
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step-00000013"
    assert json.loads((resumed / "stopped.json").read_text())["step"] == 13
    # 4) resumed again: finishes
    finished = opd("run", str(recipe))
    assert "at step 13" in finished.stdout and not (resumed / "stopped.json").exists()

    def losses(out):
        return {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}

    assert list(losses(straight)) == list(range(1, 21))
    assert losses(resumed) == losses(straight)  # identical floats, every step, no duplicates
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # (the tied embedding's two PP copies staying equal is checked by test_sft_halves_held_out_loss:
    # the trainer's loss uses the last stage's copy, the exported HF model the first stage's)
    initial = load_file(tiny_world["student"] / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(a["model.embed_tokens.weight"], initial)  # training changed them


@pytest.mark.slow
def test_sft_halves_held_out_loss(tiny_world, tmp_path):
    out = tmp_path / "learn"
    proc = opd("run", str(sft_recipe(tiny_world, out, pp=2, steps=60, global_batch_size=16, micro_batch_size=8)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] <= 0.5 * summary["eval_loss_before"], summary
    assert "held-out loss: before" in proc.stdout
    # the exported HF model, run by transformers, reproduces the reported held-out loss
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opd.data.chat import load_rows, tokenize_dataset

    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    examples, _ = tokenize_dataset(load_rows(str(tiny_world["test"])), tokenizer, 128)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples[:32]:
            ids = torch.tensor([ex.input_ids])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(ex.loss_mask[1:], dtype=torch.float64)
            nll -= float((picked * mask).sum())
            tokens += int(mask.sum())
    assert abs(nll / tokens - summary["eval_loss_after"]) < 1e-4


@pytest.mark.slow
def test_a_full_disk_mid_save_stops_every_rank_and_leaves_no_partial_step(tiny_world, tmp_path):
    """A real file system that fills up during the second checkpoint (a 2.4 MB tmpfs; the tiny student's
    checkpoint is ~1.5 MB): both ranks stop with the path and the free space, the partial step is removed, and
    the first checkpoint stays the one to resume from."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        full = opd("run", str(sft_recipe(tiny_world, out, pp=2, steps=3, save_interval=1)), check=False)
        assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
        said = full.stderr[-3000:]
        # DCP's shard writer may be the write that fills the disk: its torch.save says "unexpected pos", and the
        # message adds what the free space at the failure shows
        assert "writing checkpoint step 2 under" in said and "No space left on device" in said, said
        assert "MiB free there); the partial step was removed and step-00000001 stays the latest checkpoint" in full.stderr
        assert "Traceback" not in full.stderr
        ckpts = out / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000001"]
        assert (ckpts / "latest").read_text().strip() == "step-00000001"
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_train_state_written_to_a_full_disk_says_no_space(tmp_path):
    """torch.save to a path on a full disk says only "unexpected pos"; the checkpoint's writer names ENOSPC (the
    full-disk test above sees whichever write fills the disk first: this one, DCP's shards or the HF config)."""
    import errno
    import subprocess

    import torch

    from megatron_opd.model.checkpoint import write_train_state

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(OSError) as raised:
            write_train_state({"rng": torch.zeros(100_000)}, disk / "rank00000.pt")
        assert raised.value.errno == errno.ENOSPC and "No space left on device" in str(raised.value)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_save_that_fails_on_one_rank_only_is_explained_by_every_rank(tiny_world, tmp_path):
    """Rank 1 alone cannot write (injected ENOSPC), rank 0 wrote its part: the first rank to exit prints the
    cause, whichever it is (the launcher stops the others), because every rank learns it from the one that knows."""
    out = tmp_path / "run"
    full = opd("run", str(sft_recipe(tiny_world, out, pp=2, steps=2, save_interval=1)),
               env={"OPD_FAULT_INJECT": "write@1:2"}, check=False)
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert "writing checkpoint step 2 under" in full.stderr and "No space left on device" in full.stderr
    assert "(on rank 1)" in full.stderr or "[rank 1]" in full.stderr
    assert "step-00000001 stays the latest checkpoint" in full.stderr and "Traceback" not in full.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
