"""``opd bench soak``: the tiny OPD loop for a long while, a teacher replica SIGKILLed (and brought
back on its port) on a schedule, the job's resident memory sampled.

The teacher runs as two ``opd serve --role teacher`` replicas this harness owns; the job reaches
them by URL (``teachers.<t>.urls``), so it sees only what a cluster job sees: a replica gone
mid-request, then back. At the end the job is stopped (SIGTERM) and its per-step metrics are read:
samples lost = samples the finished steps should have trained minus those they trained; unscored =
trained samples the teacher never scored. RSS growth compares the job's resident set (trainer ranks
and rollout server) over the last fifth of the run with the fifth after its first steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_opd.platform.net import free_port
from megatron_opd.wire.process import ServerProcess, start_server


@dataclass(frozen=True)
class SoakSettings:
    recipe: Path
    student: Path
    teacher: Path
    out_dir: Path
    minutes: float = 30.0
    kill_every_s: float = 120.0
    down_s: float = 20.0
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _job_rss(pid: int) -> int:
    """Resident bytes of the job's process tree (the harness's teacher servers are not in it)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_soak(s: SoakSettings, log: Callable[[str], None] = print) -> list[str]:
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ports = [free_port(), free_port()]
    replicas: list[ServerProcess | None] = [start_server(s.teacher, role="teacher", port=p, log_path=out / f"teacher-{i}.log")
                                            for i, p in enumerate(ports)]
    urls = ",".join(r.url for r in replicas if r)
    cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(s.recipe), f"model.hf_path={s.student}",
           f"run.output_dir={out / 'run'}", "train.steps=1000000", "train.save_interval=50", "eval.samples=4",
           f"teachers.teachers.arithmetic.urls=[{urls}]", f"teachers.teachers.arithmetic.model={s.teacher}", *s.overrides]
    job_log = open(out / "job.log", "w")
    job = subprocess.Popen(cmd, stdout=job_log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    began = time.monotonic()
    end = began + 60 * s.minutes
    kills, next_kill, victim = 0, began + s.kill_every_s, 0
    rss: list[tuple[float, int, int]] = []  # (time, steps done, bytes)
    metrics_path = out / "run" / "metrics.jsonl"
    try:
        while time.monotonic() < end and job.poll() is None:
            now = time.monotonic()
            if now >= next_kill and replicas[victim] is not None:
                replicas[victim].proc.send_signal(signal.SIGKILL)
                replicas[victim].proc.wait(timeout=30)
                kills += 1
                log(f"[soak] {now - began:.0f}s: SIGKILLed teacher replica {victim} ({replicas[victim].url}); kill {kills}")
                down_until, dead = now + s.down_s, victim
                replicas[victim] = None
                while time.monotonic() < min(down_until, end) and job.poll() is None:
                    time.sleep(1.0)
                replicas[dead] = start_server(s.teacher, role="teacher", port=ports[dead], log_path=out / f"teacher-{dead}.log")
                log(f"[soak] replica {dead} back on port {ports[dead]}")
                victim, next_kill = 1 - victim, time.monotonic() + s.kill_every_s
            steps = sum(1 for _ in metrics_path.open()) if metrics_path.is_file() else 0
            rss.append((time.monotonic() - began, steps, _job_rss(job.pid)))
            time.sleep(5.0)
        alive = job.poll() is None
        if alive:
            job.send_signal(signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
        job_log.close()
        for replica in replicas:
            if replica is not None:
                replica.stop()
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    if not alive or not rows:
        raise RuntimeError(f"the soaked job stopped on its own after {len(rows)} steps: see {out / 'job.log'}")
    per_step = int(rows[0].get("rollout/samples", 0)) or None
    trained = sum(int(r.get("rollout/samples", 0)) for r in rows)
    expected = len(rows) * (per_step or 0)
    scored = int(rows[-1].get("teachers/arithmetic/samples", 0))
    retries = int(rows[-1].get("teachers/arithmetic/retries", 0))
    warm = [b for t, n, b in rss if n >= 3]
    fifth = max(1, len(warm) // 5)
    growth = (sum(warm[-fifth:]) / fifth) / (sum(warm[:fifth]) / fifth) - 1 if warm else float("nan")
    (out / "soak.json").write_text(json.dumps({"minutes": s.minutes, "steps": len(rows), "kills": kills, "retries": retries,
                                               "trained_samples": trained, "expected_samples": expected,
                                               "scored_samples": scored, "rss": rss}, indent=1))
    return [f"steps trained: {len(rows)} in {s.minutes:g} min",
            f"teacher kills survived: {kills} (teacher retries: {retries})",
            f"samples lost: {expected - trained}",
            f"samples trained but unscored: {max(0, trained - scored)}",
            f"RSS growth: {100 * growth:.1f}% ({warm[0] / 2**20 if warm else 0:.0f} MiB -> {warm[-1] / 2**20 if warm else 0:.0f} MiB)"]
