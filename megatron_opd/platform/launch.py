"""Start a multi-process job on this machine: re-run the same ``opd`` command under torchrun.

nemo-run's LocalExecutor (launcher="torchrun") is the intended launcher for clusters; for a local
run we call torchrun directly so the CLI stays a single, dependency-light entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_opd.platform.dist import _free_port


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``python -m megatron_opd.cli <argv>`` on ``nproc`` local processes; returns the exit code."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "megatron_opd.cli", *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)
