"""``opd bench shapes``: the whole OPD loop at Qwen3's real shapes on this machine, against its own limits.

A random Qwen3-0.6B student (fp32) learns from a random teacher of a real Qwen3 shape (0.6B with
another seed by default: with the 1.7B teacher, its server, the TP2 trainer's Adam state and the
rollout server's weights would not leave headroom in 24 GiB), on the tiny world's arithmetic prompts
rendered by Qwen3's chat template and tokenized by its real tokenizer. Every process has one thread
and the loop is strictly on-policy, so generation, scoring and training each have the cores to
themselves, as the machine limits measured first assume.

1. The machine: fp32 GEMM peak (one thread; the trainer's two single-threaded ranks at once), memory
   copy bandwidth, loopback TCP, file write + read back, an idle process's memory (bench/limits.py).
2. The loop at TP2: a few steps of 4 prompts x 2 samples x 64 new tokens with the sampled-token loss,
   weights synced to the rollout server over the distributed path, a checkpoint at step 2.
3. The same checkpoint resumed at TP1 x PP2 (resharded by dist_checkpointing), the disk sync: its
   step-3 loss against the unbroken run's.
4. How cost grows: one sample of 256, 1,024 and 4,096 completion tokens (the row's own response,
   teacher-forced: a random model's generation would take ~0.2 s a token), scored and trained with
   the top-k forward KL at the real vocabulary and full activation recompute; and the tiny
   character-level student at the same lengths.

The figures come last, one per line: measured, the limit or estimate, the ratio, and the goal.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_opd.model import cost
from megatron_opd.bench.limits import Limits, measure_limits, remeasure_gemm
from megatron_opd.bench.runs import REPO, Run, opd_recipe, run_recipe
from megatron_opd.data.chat import chat_ids

GiB, MiB = float(1 << 30), float(1 << 20)
PROMPTS = REPO / "assets" / "tiny" / "data" / "arithmetic" / "train.jsonl"
WORDS = ("the model reads every token of a long answer and the teacher scores it one position at a time while "
         "the student learns from the gap between them").split()


@dataclass
class ShapesSettings:
    work: Path
    student: str = "Qwen3-0.6B"
    teacher: str = "Qwen3-0.6B"
    steps: int = 3
    prompts: int = 4
    samples: int = 2
    max_new_tokens: int = 64
    lengths: tuple[int, ...] = (256, 1024, 4096)
    tiny: bool = True
    log: Any = field(default=print, repr=False)


def _model(work: Path, name: str, seed: int, tokenizer: str = "qwen") -> Path:
    """A random model made once per (config, seed) under ``work/models``."""
    from megatron_opd.model.qwen3 import make_random_qwen3
    from megatron_opd.model.tiny import make_tiny_qwen3

    out = work / "models" / f"{name}-seed{seed}"
    if (out / "config.json").is_file():
        return out
    if tokenizer == "qwen":
        make_random_qwen3(out.with_name(out.name + ".tmp"), name, seed)
    else:  # the tiny world's character-level student / teacher sizes, long enough positions for 4,096 tokens
        make_tiny_qwen3(out.with_name(out.name + ".tmp"), 100, name, seed=seed, max_positions=8192,
                        tokenizer_dir=REPO / "assets" / "tiny" / "tokenizer")
    out.with_name(out.name + ".tmp").rename(out)
    return out


def long_response_rows(tokenizer_dir: Path, length: int, out: Path) -> Path:
    """One chat row whose assistant turn is exactly ``length`` tokens as the student writes it (through
    EOS, after the template's own markup: Qwen3's empty think block)."""
    from transformers import AutoTokenizer

    from megatron_opd.data.prompts import _response_ids

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "user", "content": "Write a long answer."}]
    prompt_len = len(chat_ids(tokenizer, messages, add_generation_prompt=True))
    base = " ".join(WORDS[i % len(WORDS)] for i in range(2 * length))  # at least a token a word

    def tokens(chars: int) -> int:
        return len(_response_ids(tokenizer, messages, base[:chars], prompt_len))

    low, high = 1, len(base)  # the shortest prefix with at least `length` tokens (the count grows with the prefix)
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if tokens(mid) < length else (low, mid)
    text = next((base[:n] for n in range(low, min(len(base), low + 8) + 1) if tokens(n) == length), None)
    if text is None:
        raise RuntimeError(f"could not make a {length}-token response")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"messages": [*messages, {"role": "assistant", "content": text}], "domain": "bench"}) + "\n")
    return out


def _median(run: Run, key: str, steps: list[int]) -> float:
    return statistics.median(run.step(s).get(key, 0.0) for s in steps)


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


@dataclass
class Figures:
    lines: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines.append(text)


def _goal(met: bool) -> str:
    return "met" if met else "MISSED"


def loop_figures(out: Figures, run: Run, limits: Limits, student: cost.Shape, teacher: cost.Shape, s: ShapesSettings,
                 steps: list[int]) -> None:
    """MFU, decode and scoring efficiency, memory per process of the TP2 loop."""
    train_s, rollout_s, scoring_s = (_median(run, f"time/{p}_s", steps) for p in ("train", "rollout", "scoring"))
    positions, squares = _median(run, "train/positions", steps), _median(run, "train/positions_sq", steps)
    flops = student.train_flops(positions, squares)
    mfu = flops / train_s / (limits.gemm_trainer_gflops * 1e9)
    out.add(f"TP2 loop: step {_median(run, 'time/step_s', steps):.1f} s = rollout {rollout_s:.1f} + scoring {scoring_s:.1f} "
            f"+ train {train_s:.1f} + sync {_median(run, 'time/sync_s', steps):.1f} s (median of steps {steps[0]}-{steps[-1]}; "
            f"{s.prompts} prompts x {s.samples} samples x {s.max_new_tokens} new tokens, {positions:.0f} positions trained)")
    out.add(f"trainer MFU: {flops / train_s / 1e9:.0f} GFLOPS of model FLOPs (6 x {student.matmul_params() / 1e6:.0f}M x "
            f"{positions:.0f} tokens + attention) = {mfu:.0%} of the trainer's GEMM peak {limits.gemm_trainer_gflops:.0f} "
            f"GFLOPS (goal >= 50%: {_goal(mfu >= 0.5)})")
    rows, tokens = s.prompts * s.samples, s.prompts * s.samples * s.max_new_tokens
    bound_s = s.max_new_tokens * student.decode_bytes() / (limits.copy_1thread_gbps * 1e9)
    lengths = [run.step(n).get("rollout/response_length", 0) for n in steps]
    out.add(f"decode: {tokens / rollout_s:.1f} tokens/s ({rows} rows, {min(lengths):.0f} tokens each, prefill and HTTP "
            f"included) = {bound_s / rollout_s:.0%} of the bandwidth bound {tokens / bound_s:.1f} tokens/s ("
            f"{student.decode_bytes() / GiB:.2f} GiB of weights per step at {limits.copy_1thread_gbps:.1f} GB/s, one "
            f"thread) (goal >= 50%: {_goal(bound_s / rollout_s >= 0.5)})")
    computed = [run.step(n)["teachers/teacher/computed_tokens"] - (run.step(n - 1)["teachers/teacher/computed_tokens"]
                                                                    if n > 1 else 0) for n in steps]
    score_flops = teacher.forward_flops(statistics.median(computed), squares)
    out.add(f"scoring: {statistics.median(computed) / scoring_s:.0f} positions/s = {score_flops / scoring_s / 1e9:.0f} "
            f"GFLOPS = {score_flops / scoring_s / (limits.gemm_1thread_gflops * 1e9):.0%} of one thread's GEMM peak")
    micro_tokens = positions / max(1e-9, 1 - _median(run, "train/padding_fraction", steps))
    for rank in (0, 1):
        est = cost.trainer_rank(student, 2, 1, 0, int(micro_tokens), 16.0, False, limits.trainer_baseline)
        est.parts["weight-sync export"] = cost.export_transient(student)
        if rank == 0:
            est.parts["HF export shard"] = 2 * GiB
        _memory_line(out, f"rank {rank}", max(run.rank_peak(rank), run.peaks.get(f"rank {rank}", 0)), est)
    width = max(lengths) + 64
    _memory_line(out, "rollout server", run.peaks.get("rollout server", 0),
                 cost.rollout_server(student, rows, width, limits.server_baseline))
    _memory_line(out, "teacher server", run.peaks.get("teacher server", 0),
                 cost.teacher_server(teacher, min(8192, int(positions)), 128 << 20, limits.server_baseline))


def _memory_line(out: Figures, who: str, peak: float, est: cost.RankEstimate) -> None:
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in est.parts.items())
    ratio = peak / est.total
    out.add(f"memory {who}: peak {peak / GiB:.2f} GiB vs estimate {est.total / GiB:.2f} GiB ({parts}) = {ratio:.2f}x "
            f"(goal <= 1.3x: {_goal(ratio <= 1.3)})")


def sync_and_resume_figures(out: Figures, main: Run, resumed: Run, limits: Limits, student: cost.Shape,
                            main_steps: list[int]) -> None:
    nbytes = student.params() * cost.FLOAT
    distributed = _median(main, "time/sync_s", main_steps)
    disk = resumed.step(resumed.rows[-1]["step"])["time/sync_s"]
    out.add(f"weight sync of {nbytes / GiB:.2f} GiB: distributed {distributed:.1f} s (TP2 export + gloo broadcast; loopback "
            f"TCP moves those bytes in {nbytes / (limits.loopback_gbps * 1e9):.2f} s: {nbytes / (limits.loopback_gbps * 1e9) / distributed:.0%}), "
            f"disk {disk:.1f} s (TP1 x PP2 export + safetensors; a file write + read back of those bytes takes "
            f"{nbytes / (limits.disk_gbps * 1e9):.2f} s: {nbytes / (limits.disk_gbps * 1e9) / disk:.0%})")
    saves, load = main.results.get("checkpoint_save_s") or [0.0], resumed.results.get("checkpoint_load_s") or 0.0
    size = sum(f.stat().st_size for f in (main.out / "checkpoints" / "step-00000002").rglob("*") if f.is_file())
    out.add(f"checkpoint (weights + Adam state, dist_checkpointing): save {min(saves):.1f} s at TP2 ({size / GiB:.2f} GiB on "
            f"disk: {size / GiB / min(saves):.2f} GiB/s), resharded load at TP1 x PP2 {load:.1f} s")
    step = resumed.rows[-1]["step"]
    a, b = main.step(step)["train/loss"], resumed.step(step)["train/loss"]
    out.add(f"resume TP2 -> TP1 x PP2: step-{step} loss {a:.7f} unbroken vs {b:.7f} resumed, |diff| {abs(a - b):.1e} "
            f"(goal <= 1e-5: {_goal(abs(a - b) <= 1e-5)}); grad norm {main.step(step)['train/grad_norm']:.6f} vs "
            f"{resumed.step(step)['train/grad_norm']:.6f}")


def length_line(name: str, length: int, run: Run, shape: cost.Shape, limits: Limits) -> tuple[str, dict[str, float]]:
    step = run.rows[-1]["step"]
    row = run.step(step)
    flops = shape.train_flops(row["train/positions"], row["train/positions_sq"])
    peaks = [max(run.rank_peak(r), run.peaks.get(f"rank {r}", 0)) for r in (0, 1)]
    figures = {"step": row["time/step_s"], "scoring": row["time/scoring_s"], "train": row["time/train_s"],
               "sync": row["time/sync_s"], "mfu": flops / row["time/train_s"] / (limits.gemm_trainer_gflops * 1e9),
               "peak0": peaks[0], "peak1": peaks[1], "loss_fwd": max(r.get("memory/loss_forward_extra_mib", 0) for r in run.rows),
               "loss_bwd": max(r.get("memory/loss_backward_extra_mib", 0) for r in run.rows),
               "grad_mib": row["train/positions"] / max(1e-9, 1 - row["train/padding_fraction"]) * shape.vocab / 2 * 4 / MiB}
    text = (f"{name}, {length} completion tokens (teacher-forced, TP2, full recompute): step {figures['step']:.1f} s "
            f"(scoring {figures['scoring']:.1f}, train {figures['train']:.1f} = MFU {figures['mfu']:.0%}, sync "
            f"{figures['sync']:.1f}); peak memory rank 0 / 1 {peaks[0] / GiB:.2f} / {peaks[1] / GiB:.2f} GiB; loss head extra "
            f"forward {figures['loss_fwd']:.0f} MiB, backward {figures['loss_bwd'] - figures['grad_mib']:.0f} MiB beyond the "
            f"logits' {figures['grad_mib']:.0f} MiB gradient")
    return text, figures


def _drop_checkpoints(run: Run) -> None:
    """A finished run's checkpoints and HF export (7 + 2.4 GB at 0.6B): the figures are read already."""
    for sub in ("checkpoints", "hf"):
        shutil.rmtree(run.out / sub, ignore_errors=True)


def bench_shapes(s: ShapesSettings) -> list[str]:
    work, log = s.work, s.log
    student = _model(work, s.student, 0)
    teacher = _model(work, s.teacher, 1)
    shape, teacher_shape = cost.Shape.of(_config(student)), cost.Shape.of(_config(teacher))
    log(f"[bench] models: student {s.student} ({shape.params() / 1e6:.0f}M), teacher {s.teacher} "
        f"({teacher_shape.params() / 1e6:.0f}M), random, fp32, under {work / 'models'}")
    limits = measure_limits(2, 1, work, student)
    for line in limits.lines():
        log(f"[bench] {line}")
    out = Figures(limits.lines())
    recipe = dict(tp=2, pp=1, steps=s.steps, prompts=s.prompts, samples=s.samples, max_new_tokens=s.max_new_tokens,
                  loss="sampled_token", save_interval=2, keep_last=2, micro_batch_size=s.prompts * s.samples)
    main = run_recipe(opd_recipe(student, teacher, PROMPTS, sync="distributed", **recipe), work / "runs" / "tp2", log)
    limits = remeasure_gemm(limits, 2, 1)
    out.lines[0] = limits.lines()[0]
    steps = list(range(2, s.steps + 1))  # step 1 pays for first touches (Adam state, packing, page faults)
    loop_figures(out, main, limits, shape, teacher_shape, s, steps)
    resumed_dir = work / "runs" / "tp1pp2"  # step 2's checkpoint, resumed at another layout
    shutil.rmtree(resumed_dir, ignore_errors=True)
    shutil.copytree(main.out / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002",
                    copy_function=os.link)  # hard links: the 7 GB checkpoint is not copied
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000002\n")
    resume_recipe = opd_recipe(student, teacher, PROMPTS, sync="disk", **{**recipe, "tp": 1, "pp": 2, "steps": 3, "keep_last": 1})
    resume_recipe["train"]["resume_changed_config"] = True
    resumed = run_recipe(resume_recipe, resumed_dir, log)
    sync_and_resume_figures(out, main, resumed, limits, shape, steps)
    for run in (main, resumed):
        _drop_checkpoints(run)
    table = []
    for name, stu, tea, tokenizer in [(s.student, student, teacher, student)] + (
            [("tiny student (micro, char-level)", _model(work, "micro", 0, "char"), _model(work, "small", 1, "char"),
              REPO / "assets" / "tiny" / "tokenizer")] if s.tiny else []):
        for length in s.lengths:
            rows = long_response_rows(tokenizer, length, work / "data" / f"{stu.name}-{length}.jsonl")
            steps = 1 if length >= 2048 else 2  # a long step dwarfs the first step's one-time costs
            run = run_recipe(opd_recipe(stu, tea, rows, tp=2, pp=1, steps=steps, prompts=1, samples=1, max_new_tokens=16,
                                        sync="distributed", loss="topk_forward_kl", on_policy_fraction=0.0,
                                        recompute="full", micro_batch_size=1, vocab_divisible_by=2),
                             work / "runs" / f"{stu.name}-{length}", log)
            _drop_checkpoints(run)
            text, figures = length_line(name, length, run, cost.Shape.of(_config(stu)), limits)
            out.add(text)
            table.append((name, length, figures))
    (work / "shapes.json").write_text(json.dumps({"lines": out.lines, "lengths": table}, indent=1))
    return out.lines
