"""Deterministic fault injection for crash-safety tests: ``OPD_FAULT_INJECT=<point>:<step>``.

Points: ``step`` (before training step N), ``save`` (while checkpoint N is being written).
Only global rank 0 kills itself (SIGKILL, no cleanup); torchrun then tears the job down.
"""

from __future__ import annotations

import os
import signal

ENV = "OPD_FAULT_INJECT"


def maybe_kill(point: str, step: int, rank: int) -> None:
    if rank == 0 and os.environ.get(ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
