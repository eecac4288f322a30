"""Deterministic fault injection for crash-safety tests: ``OPD_FAULT_INJECT=<point>:<step>``.

Points: ``step`` (before training step N), ``save`` (while checkpoint N is being written): global
rank 0 kills itself (SIGKILL, no cleanup); torchrun then tears the job down. ``write`` makes every
rank's write of checkpoint N fail with ENOSPC after its shards are written (where no small file
system can be mounted to fill for real); ``write@R`` only rank R's. ``noop-reload@S`` tells rollout server
S the new weight version at sync N without loading the weights. ``signal`` parks rank 0 before step N until a stop signal
arrives (at most two minutes), so a test's signal lands in a known step however fast the steps run.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "OPD_FAULT_INJECT"


def maybe_kill(point: str, step: int, rank: int) -> None:
    if rank == 0 and os.environ.get(ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail_write(point: str, step: int, rank: int) -> None:
    if point == "save" and os.environ.get(ENV) in (f"write:{step}", f"write@{rank}:{step}"):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(injected)")


def skips_reload(version: str, server: int) -> bool:
    """``noop-reload@S:N``: rollout server S is told weight version step-N without loading its weights (a reload
    that silently did nothing, which the engine's reload check must catch)."""
    return os.environ.get(ENV) == f"noop-reload@{server}:{version.removeprefix('step-')}"


def maybe_wait_for_signal(step: int, rank: int) -> None:
    if rank == 0 and os.environ.get(ENV) == f"signal:{step}":
        from megatron_opd.platform.signals import active

        print(f"[fault] rank 0 waits for a stop signal before step {step}", flush=True)
        deadline = time.monotonic() + 120
        while (active() is None or active().received is None) and time.monotonic() < deadline:
            time.sleep(0.05)
