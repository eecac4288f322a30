"""Run an ``opd run`` recipe as a benchmark: in its own process tree, every process's peak memory
watched from outside, its metrics read back.

The watcher polls ``/proc/<pid>/status`` of every process under the run (trainer ranks, the servers the
run starts) and keeps each one's high-water mark (``VmHWM``) under its role. The trainer ranks also
measure themselves (``run.memory_probe``), which is exact where the watcher's last poll may be a
little early; servers are not probed, so the watcher is what they report.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _role(proc: Any) -> str | None:
    """'rollout server', 'teacher server', 'rank N' or None for processes that are not the run's workers."""
    try:
        cmd = proc.cmdline()
        if "serve" in cmd and "--role" in cmd:
            return f"{cmd[cmd.index('--role') + 1]} server"
        if "run" in cmd:
            rank = proc.environ().get("RANK")
            return f"rank {rank}" if rank is not None else None
    except Exception:  # the process ended between listing and reading it
        return None
    return None


class Watcher:
    """Peak resident bytes by role of every process under ``pid``, polled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                children = psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                role = _role(child)  # asked every time: a forked server shows its parent's command until it execs
                peak = _vm_hwm(child.pid) if role else None
                if role and peak:
                    self.peaks[role] = max(self.peaks.get(role, 0), peak)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


@dataclass
class Run:
    out: Path
    rows: list[dict[str, Any]]  # metrics.jsonl, one per step
    results: dict[str, Any]
    peaks: dict[str, int]  # role -> bytes (watcher)
    seconds: float
    stdout: str = field(repr=False, default="")

    def step(self, n: int) -> dict[str, Any]:
        return next(r for r in self.rows if r["step"] == n)

    def rank_peak(self, rank: int) -> int:
        """The rank's own figure (memory probe) when it logged one, else the watcher's."""
        probed = [r.get(f"memory/rank{rank}_peak_rss_mib") for r in self.rows]
        probed = [p for p in probed if p is not None]
        return int(max(probed) * (1 << 20)) if probed else self.peaks.get(f"rank {rank}", 0)


def run_recipe(recipe: dict[str, Any], out: Path, log=print, timeout: float = 3600.0) -> Run:
    """``opd run`` of ``recipe`` (written to ``out/../<name>.yaml``) with ``run.output_dir`` = ``out``."""
    out = Path(out)
    recipe = {**recipe, "run": {**recipe.get("run", {}), "output_dir": str(out)}}
    path, log_path = out.parent / f"{out.name}.yaml", out.parent / f"{out.name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    began = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "run", str(path)], cwd=REPO,
                                stdout=log_file, stderr=subprocess.STDOUT, text=True)
        watcher = Watcher(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=60)
            code = -1
        peaks = watcher.stop()
    text = log_path.read_text()
    if code != 0:
        raise RuntimeError(f"opd run {path} failed ({code}):\n{failure_excerpt(text)}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    results = json.loads((out / "results.json").read_text())
    log(f"[bench] {path.name}: {len(rows)} steps in {time.perf_counter() - began:.0f} s")
    return Run(out, rows, results, peaks, time.perf_counter() - began, text)


def failure_excerpt(log_text: str, chars: int = 4000) -> str:
    """The end of the log of the rank that failed first (the launcher names it), not the other ranks'
    echoes of its death (a closed connection in their next collective); else the end of the whole log."""
    named = re.search(r"\[opd\] rank (\d+) exited with", log_text)
    if named:
        prefix = f"[rank{named.group(1)}]"
        own = [line for line in log_text.splitlines() if not re.match(r"\[rank\d+\]", line) or line.startswith(prefix)]
        return "\n".join(own)[-chars:]
    return log_text[-chars:]


def opd_recipe(student: Path, teacher: Path, train_file: Path, *, tp: int, pp: int, steps: int, prompts: int,
               samples: int, max_new_tokens: int, sync: str, loss: str, top_k: int = 20, save_interval: int = 0,
               on_policy_fraction: float = 1.0, recompute: str = "none", micro_batch_size: int = 8,
               max_prompt_length: int = 256, vocab_divisible_by: int = 128, keep_last: int = 1) -> dict[str, Any]:
    """An OPD stage for benchmarking: one thread per process, strictly on-policy (each phase has the cores
    to itself), the rollout engine and the teacher each in their own embedded server, memory probed."""
    return {
        "kind": "opd",
        "run": {"name": "bench-shapes", "cpu_threads": 1, "memory_probe": True},
        "model": {"hf_path": str(student), "dtype": "float32", "vocab_divisible_by": vocab_divisible_by, "recompute": recompute},
        "parallel": {"tp": tp, "pp": pp, "dp": 1},
        "data": {"train": [str(train_file)], "max_prompt_length": max_prompt_length},
        "rollout": {"engine": "embedded_server", "sync": sync, "max_staleness": 0, "n": samples, "temperature": 1.0,
                    "max_new_tokens": max_new_tokens, "bucket_mb": 256, "on_policy_fraction": on_policy_fraction},
        "teachers": {"teachers": {"teacher": {"model": str(teacher), "batch_size": 64, "timeout_s": 1800}},
                     "default": "teacher"},
        "loss": {"kind": loss, "top_k": top_k},
        "optim": {"lr": 1.0e-5, "min_lr": 1.0e-6, "warmup_steps": 0, "clip_grad": 1.0, "decay_style": "constant"},
        "train": {"steps": steps, "prompts_per_step": prompts, "micro_batch_size": micro_batch_size,
                  "save_interval": save_interval, "keep_last": keep_last},
        "eval": {"world_dir": None},
    }
