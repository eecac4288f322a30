"""``opd bench step``: where a step's time goes, and how it grows with the batch and the completion
length.

Each point is an ``opd run`` of the e2e bench's settings (``recipes/tiny/opd_general.yaml``, one
sample per prompt, full-vocabulary forward KL) at one (batch, completion cap); the figures are
medians over the steps after warm-up of each phase's wall time — rollout (generation), scoring
(teacher requests), train (forward/backward + optimizer), sync (weights to the engine) — and of the
whole step, with the step's ratio to its longest phase: 1.0 when the phases overlap completely.
The batch sweep uses the cold-started student (responses end by themselves); the length sweep the
random ``student_init``, which rarely stops, so its completions run to the cap.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_opd.bench.e2e import REPO, E2ESettings, write_prompt_pool

PHASES = ("rollout", "scoring", "train", "sync")


@dataclass
class StepPoint:
    batch: int
    max_new_tokens: int
    response_length: float
    phases: dict[str, float]
    step: float

    @property
    def longest(self) -> float:
        return max(self.phases.values())

    def line(self) -> str:
        phases = ", ".join(f"{p} {self.phases[p]:.3f} s" for p in PHASES)
        return (f"batch {self.batch}, <= {self.max_new_tokens} new tokens (mean {self.response_length:.0f}): {phases}; "
                f"step {self.step:.3f} s = {self.step / self.longest:.2f} x the longest phase")


def measure(settings: E2ESettings, student: Path, batch: int, max_new_tokens: int, work: Path) -> StepPoint:
    out = work / f"b{batch}-n{max_new_tokens}"
    prompts = write_prompt_pool(E2ESettings(student, settings.teacher, batch=batch, steps=settings.steps), work / f"p{batch}.jsonl")
    cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(REPO / "recipes" / "tiny" / "opd_general.yaml"),
           f"model.hf_path={student}", f"teachers.teachers.original.model={settings.teacher}", f"data.train=[{prompts}]",
           f"train.steps={settings.steps}", f"train.prompts_per_step={batch}", "rollout.n=1",
           f"train.micro_batch_size={math.gcd(batch, 8)}", f"rollout.max_new_tokens={max_new_tokens}",
           "loss.kind=topk_forward_kl", "loss.normalize=token", "train.save_interval=0", "eval.world_dir=null",
           f"run.output_dir={out}", *settings.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line][settings.warmup:]
    phases = {p: statistics.median(r.get(f"time/{p}_s", 0.0) for r in rows) for p in PHASES}
    return StepPoint(batch, max_new_tokens, statistics.median(r["rollout/response_length"] for r in rows), phases,
                     statistics.median(r["time/step_s"] for r in rows))


def bench_step(settings: E2ESettings, batches: list[int], lengths: list[int], random_student: Path, log=print) -> list[str]:
    points: list[StepPoint] = []
    with tempfile.TemporaryDirectory(prefix="opd-bench-step-") as tmp:
        for batch in batches:
            points.append(measure(settings, settings.student, batch, settings.max_new_tokens, Path(tmp)))
            log(f"[bench] {points[-1].line()}")
        for length in lengths:
            points.append(measure(settings, random_student, settings.batch, length, Path(tmp)))
            log(f"[bench] {points[-1].line()}")
    base = next(p for p in points if p.batch == settings.batch and p.max_new_tokens == settings.max_new_tokens)
    return [p.line() for p in points] + [
        f"step time / longest phase at batch {base.batch}, <= {base.max_new_tokens} new tokens: {base.step / base.longest:.2f}"]
