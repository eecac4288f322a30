"""``opd bench e2e [--vs trl]``: trained completion tokens per second of the whole OPD loop.

The project's loop (``opd run`` of ``recipes/tiny/opd_general.yaml`` with the bench's batch) and,
with ``--vs trl``, TRL's GKD trainer (``bench/trl_gkd.py`` in TRL's own venv) run on the same
student, teacher, prompt pool, batch, completion cap and loss (forward KL to the teacher's full
distribution, fp32), in turn: A B A B ... Throughput counts steady state only: the completion tokens
trained in steps ``warmup+1 .. steps`` over the wall clock from the end of step ``warmup`` to the
end of the last step (start-up, the first steps and the final save are outside the window). Each
pair gives one ratio; the figures printed last are medians.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRL_DRIVER = Path(__file__).with_name("trl_gkd.py")
DOMAINS = ("arithmetic", "strings", "format")


@dataclass
class E2ESettings:
    student: Path
    teacher: Path
    world: Path = REPO / "assets" / "tiny"
    batch: int = 64  # samples per step (one per prompt)
    max_new_tokens: int = 96
    steps: int = 12
    warmup: int = 2
    lr: float = 1e-3
    overrides: tuple[str, ...] = ()  # extra dotted overrides for the project's run


def steady_tokens_per_s(tokens: list[float], step_s: list[float], warmup: int) -> float:
    """Completion tokens of steps after ``warmup`` over their wall time (``step_s``: each step's own)."""
    if len(tokens) != len(step_s) or len(tokens) <= warmup:
        raise ValueError(f"need more than {warmup} steps, got {len(tokens)}")
    return sum(tokens[warmup:]) / sum(step_s[warmup:])


def write_prompt_pool(settings: E2ESettings, path: Path) -> Path:
    """``steps x batch`` chat rows from the three domains' train splits (seeded): both trainers draw
    every step's prompts from this pool, each prompt once."""
    rows = []
    for domain in DOMAINS:
        rows += [line for line in (settings.world / "data" / domain / "train.jsonl").read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    path.write_text("\n".join(rows[: settings.steps * settings.batch]) + "\n")
    return path


def run_ours(settings: E2ESettings, prompts: Path, work: Path, overrides: tuple[str, ...] | None = None) -> float:
    out = work / "ours"
    cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(REPO / "recipes" / "tiny" / "opd_general.yaml"),
           f"model.hf_path={settings.student}", f"teachers.teachers.original.model={settings.teacher}",
           f"data.train=[{prompts}]", f"train.steps={settings.steps}", f"train.prompts_per_step={settings.batch}",
           "rollout.n=1", f"train.micro_batch_size={math.gcd(settings.batch, 8)}", f"rollout.max_new_tokens={settings.max_new_tokens}", "loss.kind=topk_forward_kl",
           "loss.normalize=token", f"optim.lr={settings.lr}", "train.save_interval=0", "train.log_interval=1",
           "eval.world_dir=null", f"run.output_dir={out}", *(settings.overrides if overrides is None else overrides)]
    _check(subprocess.run(cmd, capture_output=True, text=True, cwd=REPO), "megatron-opd")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return steady_tokens_per_s([r["train/tokens"] for r in rows], [r["time/step_s"] for r in rows], settings.warmup)


def run_trl(settings: E2ESettings, prompts: Path, work: Path, python: Path) -> float:
    out = work / "trl.json"
    cmd = [str(python), str(TRL_DRIVER), "--student", str(settings.student), "--teacher", str(settings.teacher),
           "--prompts", str(prompts), "--steps", str(settings.steps), "--batch", str(settings.batch),
           "--max-new-tokens", str(settings.max_new_tokens), "--lr", str(settings.lr), "--out", str(out)]
    _check(subprocess.run(cmd, capture_output=True, text=True, cwd=work), "trl")
    steps = json.loads(out.read_text())
    ends = [s["end_s"] for s in steps]
    # TRL's trainer gives no per-step wall time: differences of step ends (step 1 has none: warm-up)
    durations = [0.0] + [b - a for a, b in zip(ends, ends[1:])]
    return steady_tokens_per_s([s["tokens"] for s in steps], durations, settings.warmup)


def _check(proc: subprocess.CompletedProcess, who: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{who} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def find_trl_python(given: Path | None) -> Path:
    candidates = [given] if given else [Path(p) for p in (os.environ.get("OPD_TRL_PYTHON"),) if p] + [REPO / ".venv-trl" / "bin" / "python"]
    for candidate in candidates:
        if candidate and candidate.exists():
            return candidate
    raise FileNotFoundError("no TRL Python found (--trl-python, $OPD_TRL_PYTHON or .venv-trl/bin/python): "
                            "create one with `bash tools/setup_trl_venv.sh`")


def bench_e2e(settings: E2ESettings, vs_trl: bool, rounds: int, trl_python: Path | None, log=print) -> list[str]:
    """Run the rounds; returns the figure lines (the caller prints them last)."""
    for path, what in ((settings.student, "student"), (settings.teacher, "teacher")):
        if not (Path(path) / "config.json").is_file():
            hint = " (run `opd run recipes/tiny/sft.yaml` first)" if what == "student" else ""
            raise FileNotFoundError(f"--{what}: {path} is not an HF checkpoint{hint}")
    if settings.warmup < 1 or settings.steps <= settings.warmup:
        raise ValueError(f"--warmup must be >= 1 and below --steps ({settings.steps}), got {settings.warmup}")
    python = find_trl_python(trl_python) if vs_trl else None
    if "rollout.engine=vllm" in settings.overrides:
        return _engines_side_by_side(settings, rounds, log)
    ours: list[float] = []
    theirs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        work = Path(tmp)
        prompts = write_prompt_pool(settings, work / "prompts.jsonl")
        for r in range(rounds):
            ours.append(run_ours(settings, prompts, work / f"round{r}"))
            log(f"[bench] round {r + 1}/{rounds}: megatron-opd {ours[-1]:.0f} tokens/s")
            if python is not None:
                (work / f"round{r}").mkdir(exist_ok=True)
                theirs.append(run_trl(settings, prompts, work / f"round{r}", python))
                log(f"[bench] round {r + 1}/{rounds}: trl {theirs[-1]:.0f} tokens/s (ratio {ours[-1] / theirs[-1]:.2f})")
    extra = f"; overrides: {' '.join(settings.overrides)}" if settings.overrides else ""
    lines = [f"settings: {settings.batch} samples/step (one per prompt), <= {settings.max_new_tokens} new tokens, "
             f"full-vocabulary forward KL, fp32, steps {settings.warmup + 1}-{settings.steps} timed, {rounds} rounds; "
             f"megatron-opd as recipes/tiny/opd_general.yaml{extra}",
             f"megatron-opd trained tokens/s: {statistics.median(ours):.0f}"]
    if theirs:
        ratios = [a / b for a, b in zip(ours, theirs)]
        lines += [f"trl gkd trained tokens/s: {statistics.median(theirs):.0f}",
                  f"ratio megatron-opd / trl: {statistics.median(ratios):.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)})"]
    return lines


def _engines_side_by_side(settings: E2ESettings, rounds: int, log) -> list[str]:
    """``rollout.engine=vllm`` among the overrides: the same loop with the embedded engine's servers (the recipe's
    own rollout settings) and with vLLM's (synced by disk), in turn, A B A B; the ratio per round."""
    engine_keys = ("rollout.engine=", "rollout.sync=", "rollout.vllm_python=", "rollout.reload_check_tol=")
    embedded = tuple(o for o in settings.overrides if not o.startswith(engine_keys))
    vllm = (*settings.overrides, *(() if any(o.startswith("rollout.sync=") for o in settings.overrides) else ("rollout.sync=disk",)))
    rates: dict[str, list[float]] = {"embedded": [], "vllm": []}
    with tempfile.TemporaryDirectory(prefix="opd-bench-") as tmp:
        work = Path(tmp)
        prompts = write_prompt_pool(settings, work / "prompts.jsonl")
        for r in range(rounds):
            for name, overrides in (("embedded", embedded), ("vllm", vllm)):
                rates[name].append(run_ours(settings, prompts, work / f"round{r}-{name}", overrides))
            log(f"[bench] round {r + 1}/{rounds}: embedded {rates['embedded'][-1]:.0f}, vllm {rates['vllm'][-1]:.0f} "
                f"tokens/s (ratio {rates['vllm'][-1] / rates['embedded'][-1]:.2f})")
    ratios = [b / a for a, b in zip(rates["embedded"], rates["vllm"])]
    return [f"settings: {settings.batch} samples/step (one per prompt), <= {settings.max_new_tokens} new tokens, "
            f"full-vocabulary forward KL, fp32, steps {settings.warmup + 1}-{settings.steps} timed, {rounds} rounds; "
            f"recipes/tiny/opd_general.yaml with {' '.join(embedded) or 'its own rollout'} vs {' '.join(vllm)}",
            f"embedded engine trained tokens/s: {statistics.median(rates['embedded']):.0f}",
            f"vllm engine trained tokens/s: {statistics.median(rates['vllm']):.0f}",
            f"ratio vllm / embedded: {statistics.median(ratios):.2f} (per round: {', '.join(f'{x:.2f}' for x in ratios)})"]
