"""Stop a training run cleanly on the signals a cluster sends, and say so with an exit code.

SIGTERM (a Slurm time limit, preemption, ``scancel``, ``kill``), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's
warning before the limit, ``sbatch --signal=USR1@SECONDS``) are the defaults of ``run.save_on_signals``.
The first one is only noted. The step loop asks :func:`stop_agreed` once per step (a one-element
all-reduce, so every rank stops after the same step), finishes that step, writes a checkpoint and the
process exits with :data:`EXIT_STOPPED` — 75, ``EX_TEMPFAIL``: run the same command again to resume.
Megatron-LM's ``--exit-signal-handler`` and TorchTitan do the same.

A second signal exits at once (``128 + N``) — unless it is the same signal within
:data:`DUPLICATE_WINDOW_S` of the first: one event often arrives by two routes (Slurm signals every
process of a job step, and torchrun passes SIGTERM on to its workers as well; a terminal's Ctrl-C
reaches a whole process group), and that must not turn a clean stop into a kill.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: a checkpoint was written on a signal; the same command resumes
DUPLICATE_WINDOW_S = 2.0
STOPPED_FILE = "stopped.json"  # written into the run directory by rank 0 after the checkpoint (the Slurm script requeues on it)
SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


@dataclass
class Received:
    name: str
    at: float  # time.monotonic()
    wall: float  # time.time()


class StopSignals:
    """The handlers of one process (install from the main thread)."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        unknown = [n for n in names if n not in SIGNAL_NAMES]
        if unknown:
            raise ValueError(f"run.save_on_signals: {unknown} not among {list(SIGNAL_NAMES)}")
        self.names = list(names)
        self.received: Received | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        for name in self.names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        first = self.received
        if first is None:
            self.received = Received(name, now, time.time())
            _say(f"{name} received: finishing this step, then writing a checkpoint and exiting with {EXIT_STOPPED} "
                 f"(a second signal exits at once)")
            return
        if first.name == name and now - first.at < DUPLICATE_WINDOW_S:
            return  # the same event by a second route
        _say(f"{name} received again: exiting at once without a checkpoint")
        os._exit(128 + signum)  # not SystemExit: a rank waiting in a collective would never get to unwind

    def seconds_since(self) -> float:
        return time.monotonic() - self.received.at if self.received else 0.0


_active: StopSignals | None = None


def install_stop_signals(names: list[str] | tuple[str, ...]) -> StopSignals:
    """Install the handlers for this process (the run's ranks); returns them."""
    global _active
    if _active is not None:
        _active.uninstall()
    _active = StopSignals(names).install()
    return _active


def active() -> StopSignals | None:
    return _active


def stop_agreed() -> bool:
    """Collective over the default process group (every rank calls it at the same point of each step):
    True on every rank when any rank has received a stop signal. A process without the handlers
    installed never stops here."""
    import torch
    import torch.distributed as dist

    if _active is None:
        return False
    flag = 1.0 if _active.received is not None else 0.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_opd.platform.dist import comm_device

        tensor = torch.tensor([flag], device=comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flag = float(tensor.item())
    return flag > 0


def write_stopped(run_dir: Path, step: int, checkpoint: Path, tag: str) -> None:
    """Rank 0, after the checkpoint: the marker the Slurm script requeues on, and the line a user reads."""
    import json

    received = _active.received if _active else None
    name = received.name if received else "?"
    seconds = _active.seconds_since() if _active else 0.0
    (run_dir / STOPPED_FILE).write_text(json.dumps({"signal": name, "step": step, "checkpoint": str(checkpoint),
                                                    "seconds_after_signal": round(seconds, 3),
                                                    "exit_code": EXIT_STOPPED}, indent=1))
    print(f"[{tag}] stopped on {name} after step {step}: checkpoint {checkpoint} written {seconds:.1f} s after the "
          f"signal; exit {EXIT_STOPPED} (run the same command to resume)", flush=True)


def clear_stopped(run_dir: Path) -> None:
    (run_dir / STOPPED_FILE).unlink(missing_ok=True)


def _say(message: str) -> None:
    rank = os.environ.get("RANK")
    if rank in (None, "0"):  # one line per job, not one per rank
        # straight to the file descriptor: the interrupted code may be inside a write to sys.stderr's buffer
        os.write(2, f"[opd] {message}\n".encode())


def ignore_stop_signals_here(names: tuple[str, ...] = ("SIGUSR1", "SIGUSR2")) -> None:
    """For a process with nothing to save (a server, a launcher's shell): a Slurm warning signal sent to
    every process of a job must not kill it (their default action is to terminate)."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
