"""The OPD loop end to end: TP2 x PP2 over gloo, embedded engine, an embedded teacher server,
SIGTERM (a checkpoint on the signal) + resume, reproducing the unbroken run exactly. A
resume at another layout (resharded by megatron's dist_checkpointing: TP2 x PP1 -> TP1 x PP2) is
tests/bench/test_real_shapes.py's."""
import json
import re
import signal

import httpx
import pytest
import torch

from helpers import REPO, opd, opd_signalled
from megatron_opd.config import ConfigError, load_recipe

RECIPE = REPO / "recipes" / "tiny" / "opd_arith.yaml"
SMALL = ["model.hf_path=assets/tiny/student_init", "train.prompts_per_step=4", "rollout.n=2", "train.micro_batch_size=4",
         "rollout.max_new_tokens=24", "train.steps=4", "train.save_interval=2", "eval.samples=4", "eval.max_new_tokens=24",
         "optim.lr=3.0e-4", "rollout.engine=embedded", "rollout.sync=in_process", "rollout.max_staleness=0"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_opd_tp2pp2_runs_reports_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    run = opd("run", str(RECIPE), *SMALL, f"run.output_dir={straight}")
    assert "[opd] held-out accuracy before OPD" in run.stdout and "wall time" in run.stdout
    assert "rollout" in run.stdout and "scoring" in run.stdout and "sync" in run.stdout  # per-step time breakdown
    results = json.loads((straight / "results.json").read_text())
    assert set(results["eval"]) == {"before", "after"} and "arithmetic" in results["eval"]["after"]
    assert set(results["time_by_phase_s"]) == {"rollout", "scoring", "train", "sync"}
    assert results["teacher_counters"]["arithmetic"]["samples"] == 4 * 4 * 2
    rows = _metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["opd/train_inference_mismatch"] <= 1e-5  # the engine serves exactly the trainer's weights
        assert r["teacher/arithmetic/reverse_kl"] == pytest.approx(r["opd/reverse_kl"], abs=1e-4)
        assert r["opd/advantage_abs_mean"] > 0 and r["train/tokens"] > 0
    assert (straight / "hf" / "model.safetensors").is_file()

    resumed = tmp_path / "resumed"
    # SIGTERM while step 3 runs (what Slurm sends at a time limit): step 3 finishes, is checkpointed, the teacher
    # server is stopped and the run exits with 75 (a SIGKILL's resume from the last periodic checkpoint is
    # test_moe_run's, OPD at EP2, and test_sft's)
    stopped = opd_signalled("run", str(RECIPE), *SMALL, f"run.output_dir={resumed}", signum=signal.SIGTERM, before_step=3)
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    seconds = float(re.search(r"stopped on SIGTERM after step 3: checkpoint \S+ written ([\d.]+) s after the signal",
                              stopped.stdout).group(1))
    assert seconds < 120
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert not (resumed / "results.json").exists()  # the evaluation and export wait for the resume
    for url in re.findall(r"embedded server\(s\) at (\S+)", stopped.stdout):
        with pytest.raises(httpx.TransportError):  # stopped with the run
            httpx.get(url.rstrip(",") + "/health", timeout=5)
    again = opd("run", str(RECIPE), *SMALL, f"run.output_dir={resumed}")
    assert "resumed from" in again.stdout and "at step 3" in again.stdout
    resumed_results = json.loads((resumed / "results.json").read_text())
    assert set(resumed_results["eval"]) == {"before", "after"}
    # the teacher's counters went into the checkpoint and went on from there: the resumed run's totals are
    # the unbroken run's (steps 1-3 counted before the signal, 4 after the resume)
    for key in ("samples", "tokens", "requests"):
        assert resumed_results["teacher_counters"]["arithmetic"][key] == results["teacher_counters"]["arithmetic"][key], key
    keys = ("train/loss", "opd/reverse_kl", "rollout/response_length", "train/grad_norm", "opd/advantage_mean")
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):  # same prompts, same samples, same updates: identical floats
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}, x["step"]


def test_opd_recipe_validation_names_the_field():
    cfg = load_recipe(RECIPE)
    assert cfg.kind == "opd" and cfg.parallel.tp == 2 and cfg.parallel.pp == 2
    with pytest.raises(ConfigError, match="loss.*top_k"):
        load_recipe(RECIPE, ["loss.top_k=0"])
    with pytest.raises(ConfigError, match="rollout.engine 'embedded_server' needs rollout.sync 'disk' or 'distributed'"):
        load_recipe(RECIPE, ["rollout.sync=in_process"])
    with pytest.raises(ConfigError, match="rollout.*in_process"):
        load_recipe(RECIPE, ["rollout.engine=embedded", "rollout.sync=disk"])
    with pytest.raises(ConfigError, match="teachers: .*routes.arithmetic: unknown teacher 'nope'"):
        load_recipe(RECIPE, ["teachers.routes.arithmetic=nope"])
    with pytest.raises(ConfigError, match="did you mean 'prompts_per_step'"):
        load_recipe(RECIPE, ["train.prompt_per_step=3"])
    with pytest.raises(ConfigError, match="multiple of"):
        load_recipe(RECIPE, ["train.prompts_per_step=3", "rollout.n=1"])


@pytest.mark.slow
def test_grpo_verifier_rewards_drive_the_update(tmp_path):
    """kind: grpo — no teacher; rewards from the domain verifier, group-normalised per prompt."""
    out = tmp_path / "grpo"
    opd("run", str(REPO / "recipes" / "tiny" / "grpo_arith.yaml"), "model.hf_path=assets/tiny/student_init",
        "data.train=[assets/tiny/data/format/train.jsonl]", "reward.format_weight=1.0", "parallel.tp=1",
        "train.steps=2", "train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=8", "rollout.max_new_tokens=16",
        "eval.domains=[format]", "eval.samples=4", "eval.max_new_tokens=16", f"run.output_dir={out}")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["rollout/reward_mean"] <= 2.0
        assert r["opd/advantage_abs_mean"] > 0  # random samples get different format scores: a real signal
        assert not any(k.startswith("teacher/") for k in r)
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_counters"] == {} and "format" in results["eval"]["after"]


def test_grpo_recipe_validation():
    grpo = REPO / "recipes" / "tiny" / "grpo_arith.yaml"
    assert load_recipe(grpo).reward.format_weight == 0.5
    with pytest.raises(ConfigError, match="lambda_opd > 0 needs `teachers`"):
        load_recipe(grpo, ["reward.lambda_opd=0.5"])
    with pytest.raises(ConfigError, match="kind 'opd' needs `teachers`"):
        load_recipe(grpo, ["kind=opd", "reward=null"])


def test_domain_normalisation_gives_each_domain_an_equal_share():
    """loss.normalize=domain: a short-answer domain weighs as much as a long one in the token mean."""
    from megatron_opd.records import Prompt, Rollout
    from megatron_opd.train.batches import micro_batches
    from megatron_opd.train.opd.step_maker import build_step_batch, check_domain_weights, equal_share_weights

    domains, lengths = ["arith", "arith", "str", None], [30, 50, 4, 16]
    weights = equal_share_weights(domains, lengths)
    assert weights == pytest.approx([100 / (3 * 80)] * 2 + [100 / (3 * 4), 100 / (3 * 16)])
    assert sum(w * n for w, n in zip(weights, lengths)) == pytest.approx(sum(lengths))

    prompts = [Prompt([1, 2], d, row=i) for i, d in enumerate(domains)]
    rollouts = [Rollout([1, 2], [3] * n, [-1.0] * n, "stop", "step-0", i) for i, n in enumerate(lengths)]
    batch = build_step_batch(prompts, rollouts, None, "domain", 0)
    assert batch.loss_weights.tolist() == pytest.approx(weights)
    micro = micro_batches(batch, 2, pad_id=0)  # longest first: samples 1, 0 | 3, 2
    assert [m.loss_w.tolist() for m in micro] == [pytest.approx([weights[1], weights[0]]), pytest.approx([weights[3], weights[2]])]
    assert build_step_batch(prompts, rollouts, None, "token", 0).loss_weights.tolist() == [1.0] * 4
    # loss.domain_weights: str at half the weight of the others -> shares 1/2.5, 0.5/2.5, 1/2.5 (the untagged group)
    halved = build_step_batch(prompts, rollouts, None, "domain", 0, domain_weights={"str": 0.5}).loss_weights.tolist()
    assert halved == pytest.approx([100 / (2.5 * 80)] * 2 + [50 / (2.5 * 4), 100 / (2.5 * 16)])
    assert sum(w * n for w, n in zip(halved, lengths)) == pytest.approx(sum(lengths))
    assert load_recipe(RECIPE, ["loss.normalize=domain", "loss.domain_weights={arithmetic: 2}"]).loss.domain_weights == {"arithmetic": 2.0}
    with pytest.raises(ConfigError, match="loss.domain_weights.*needs loss.normalize 'domain'"):
        load_recipe(RECIPE, ["loss.normalize=token", "loss.domain_weights={arithmetic: 2}"])
    with pytest.raises(ConfigError, match=r"loss.domain_weights \{'strings': 0.0\}: each weight must be > 0"):
        load_recipe(RECIPE, ["loss.normalize=domain", "loss.domain_weights={strings: 0}"])
    check_domain_weights({"str": 0.5}, prompts)
    with pytest.raises(ValueError, match=r"loss.domain_weights: \['strings'\] tag no prompt of data.train \(its domains: \['arith', 'str'\]\)"):
        check_domain_weights({"strings": 0.5}, prompts)


def test_micro_batches_by_token_budget_keep_every_sample_once():
    from megatron_opd.records import Prompt, Rollout
    from megatron_opd.train.batches import micro_batches
    from megatron_opd.train.opd.step_maker import build_step_batch

    completions = [30, 50, 4, 16, 45, 10]  # + 2 prompt tokens: samples of 32, 52, 6, 18, 47, 12 tokens
    prompts = [Prompt([1, 2], "d", row=i) for i in range(len(completions))]
    rollouts = [Rollout([1, 2], [3 + i] * n, [-0.5 - i] * n, "stop", "step-0", i) for i, n in enumerate(completions)]
    batch = build_step_batch(prompts, rollouts, None, "token", 0)
    by_rows = micro_batches(batch, 2, pad_id=0)
    by_tokens = micro_batches(batch, 2, pad_id=0, max_tokens=100)  # 52 | 47 + 32 (94) | 18 + 12 + 6 (54)
    assert [m.seq_len.tolist() for m in by_tokens] == [[52], [47, 32], [18, 12, 6]]
    assert [tuple(m.input_ids.shape) for m in by_tokens] == [(1, 52), (2, 47), (3, 18)]
    for micros in (by_rows, by_tokens):  # every sample once, its own tokens and log-probs where they belong
        seen = {}
        for m in micros:
            for r in range(m.input_ids.shape[0]):
                sample = int(m.input_ids[r, 2]) - 3
                n = completions[sample]
                assert m.input_ids[r, 2:2 + n].tolist() == [3 + sample] * n and not m.input_ids[r, 2 + n:].any()
                assert m.sampler_lp[r, 2:2 + n].tolist() == [-0.5 - sample] * n and m.loss_mask[r].sum() == n
                seen[sample] = seen.get(sample, 0) + 1
        assert seen == {i: 1 for i in range(len(completions))}
    def padded(micros):
        return 1 - sum(int(m.seq_len.sum()) for m in micros) / sum(m.input_ids.numel() for m in micros)

    assert padded(by_tokens) == pytest.approx(1 - 167 / 200) and padded(by_rows) == pytest.approx(1 - 167 / 192)
    # a sample longer than the budget trains alone; the rest still fill up to it
    assert [m.seq_len.tolist() for m in micro_batches(batch, 2, 0, max_tokens=40)] == [[52], [47], [32], [18, 12], [6]]
    cfg = load_recipe(RECIPE, ["train.max_tokens_per_micro_batch=512", "train.micro_batch_size=3"])  # rows no longer divide
    assert cfg.train.max_tokens_per_micro_batch == 512
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size x parallel.dp"):
        load_recipe(RECIPE, ["train.micro_batch_size=3"])


def test_sequence_normalisation_gives_each_sample_an_equal_share():
    """loss.normalize=sequence: w_i = T / (N * T_i), so every sample's tokens carry T / N of the token
    mean. With group advantages summing to 0, what every sample holds in proportion to its length
    (c tokens per token of response) gets no net push; with token-mean the long samples dominate it.
    The price: a token held once by every sample is pushed toward the short samples' advantages."""
    from megatron_opd.algo.advantages import grpo_advantages
    from megatron_opd.train.opd.step_maker import equal_share_weights

    lengths = [12, 40, 40, 96]  # one short correct answer, three longer wrong ones
    weights = equal_share_weights(list(range(len(lengths))), lengths)
    assert weights == pytest.approx([188 / (4 * n) for n in lengths])
    assert [w * n for w, n in zip(weights, lengths)] == pytest.approx([188 / 4] * 4)
    adv = grpo_advantages(torch.tensor([[1.5, 0.2, 0.3, 0.0]]))[0].tolist()
    # net push (up to the 1/T of the mean) on tokens held c * T_i times by sample i: sum_i A_i w_i c T_i
    assert sum(a * w * n for a, w, n in zip(adv, weights, lengths)) == pytest.approx(0.0, abs=1e-6)
    assert sum(a * n for a, n in zip(adv, lengths)) < -10  # token mean: the long wrong answers dominate
    # on a token held once by every sample: sum_i A_i w_i (token mean: sum_i A_i = 0)
    assert sum(a * w for a, w in zip(adv, weights)) > 1 and sum(adv) == pytest.approx(0.0, abs=1e-6)
    assert load_recipe(RECIPE, ["loss.normalize=sequence"]).loss.normalize == "sequence"
    with pytest.raises(ConfigError, match="loss.normalize"):
        load_recipe(RECIPE, ["loss.normalize=sample"])


@pytest.mark.parametrize("kind,expect,layout", [
    ("sampled_token", "opd/clip_fraction", ["parallel.pp=1"]),
    # micro-batches by token budget: their rows and lengths differ, so the two stages exchange shapes;
    # the token set is the union of the teacher's and the student's top-16 (the engine's top-k, scored
    # by the teacher through token_ids_logprob)
    ("jsd", "opd/topk_overlap", ["parallel.pp=2", "train.max_tokens_per_micro_batch=100", "loss.token_set=union"])])
@pytest.mark.slow
def test_sampled_token_and_jsd_losses_train_end_to_end(tmp_path, kind, expect, layout):
    out = tmp_path / kind
    opd("run", str(RECIPE), *SMALL, "parallel.tp=1", *layout, f"loss.kind={kind}", "loss.top_k=16",
        "train.steps=3", "eval.world_dir=null", f"run.output_dir={out}")
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["train/grad_norm"] > 0 and r["opd/advantage_abs_mean"] > 0 and expect in r
        assert 0 <= r["train/padding_fraction"] < 1 and r["opd/student_entropy"] > 0
        assert r["teacher/arithmetic/reverse_kl"] == pytest.approx(r["opd/reverse_kl"], abs=1e-4)
    assert rows[0]["train/loss"] != rows[-1]["train/loss"]
    if "loss.token_set=union" in layout:  # the teacher's 16 plus those of the student's 16 it lacks
        assert all(16 < r["opd/token_set_size"] < 32 for r in rows)


@pytest.mark.slow
def test_a_teacher_outage_stops_the_run_naming_it_and_the_resume_loses_nothing(tmp_path):
    """The run's only teacher replica is SIGKILLed mid-run: the run stops with the teacher named and
    its last checkpoint kept; with the teacher back on the same port, the rerun resumes there and
    trains every step's samples exactly once (counted)."""
    import os
    import subprocess
    import sys
    import time

    from helpers import REPO as repo
    from megatron_opd.platform.net import free_port
    from megatron_opd.wire.process import start_server

    teacher_dir = repo / "assets" / "tiny" / "teachers" / "arithmetic"
    port = free_port()
    out = tmp_path / "run"
    steps = ["train.steps=8", f"teachers.teachers.arithmetic.urls=[http://127.0.0.1:{port}]"]
    server = start_server(teacher_dir, role="teacher", port=port)
    try:
        err = open(tmp_path / "stderr.log", "w")  # a file: a full pipe would stall the job while we poll
        job = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "run", str(RECIPE), *SMALL, *steps,
                                f"run.output_dir={out}"], cwd=repo, stdout=subprocess.DEVNULL, stderr=err,
                               env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 600
        while not (out / "checkpoints" / "latest").is_file() and job.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        server.proc.kill()  # right after the step-2 checkpoint: the teacher's only replica is gone
        server.proc.wait(timeout=30)
        job.wait(timeout=600)
    finally:
        server.stop()
    err.close()
    stderr = (tmp_path / "stderr.log").read_text()
    assert job.returncode != 0 and "teacher 'arithmetic'" in stderr and "none of its 1 servers answers" in stderr, stderr[-3000:]
    latest = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert latest in (2, 4, 6) and not (out / "results.json").exists()

    server = start_server(teacher_dir, role="teacher", port=port)
    try:
        again = opd("run", str(RECIPE), *SMALL, *steps, f"run.output_dir={out}")
    finally:
        server.stop()
    assert f"at step {latest}" in again.stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # every step once: none repeated, none lost
    assert all(r["rollout/samples"] == 4 * 2 for r in rows)
    counters = json.loads((out / "results.json").read_text())["teacher_counters"]["arithmetic"]
    assert counters["samples"] == 8 * 4 * 2  # steps before the checkpoint (restored) + after the resume, each scored once


@pytest.mark.slow
def test_full_activation_recompute_trains_the_same(tmp_path):
    """model.recompute=full (megatron recomputes each layer in the backward pass) changes memory, not math."""
    runs = {}
    for mode in ("none", "full"):
        out = tmp_path / mode
        opd("run", str(RECIPE), *SMALL, "train.steps=2", "train.save_interval=0", "eval.world_dir=null", "parallel.tp=1",
            "parallel.pp=1", f"model.recompute={mode}", f"run.output_dir={out}")
        runs[mode] = _metrics(out)
    for plain, recomputed in zip(runs["none"], runs["full"]):
        assert recomputed["train/loss"] == pytest.approx(plain["train/loss"], rel=1e-6, abs=1e-9)
        assert recomputed["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-5)
    assert runs["none"][1]["train/grad_norm"] != runs["none"][0]["train/grad_norm"]  # the steps did train
