"""Start a multi-process job on this machine: the same ``opd`` command on N local ranks.

torchrun is the launcher on clusters (nemo-run's Slurm executor starts it on every node). Locally
its agent would serve the rendezvous store on every network interface, so a local job starts its
ranks itself, everything on 127.0.0.1: rank 0 serves the store on loopback only
(:func:`megatron_opd.platform.dist.bound_store`) and gloo binds loopback (``GLOO_SOCKET_IFNAME``).
As under torchrun, the first rank to fail brings the others down and its exit code is the job's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from megatron_opd.platform.net import free_port


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when the process that started it dies, even by SIGKILL
    (a killed run never leaves ranks or servers behind)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def relaunch_local(nproc: int, argv: list[str], grace_s: float = 30.0) -> int:
    """Run ``python -m megatron_opd.cli <argv>`` as ``nproc`` ranks on 127.0.0.1; returns the exit code
    (0 when all succeed, else the first failure's; a signal N reads as 128 + N)."""
    base = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    ranks = [subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", *argv], preexec_fn=die_with_parent,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    stop = {"signal": None}

    def forward(signum, _frame):  # Ctrl-C / SIGTERM of the job: every rank unwinds its own way
        stop["signal"] = signum
        for proc in ranks:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed = None
        while failed is None and any(p.poll() is None for p in ranks):
            failed = next((p for p in ranks if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed or next((p for p in ranks if p.returncode != 0), None)
        if failed is not None:  # one rank failed: the others would wait on it forever
            for proc in ranks:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + grace_s
            for proc in ranks:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = failed.returncode
            print(f"[opd] rank {ranks.index(failed)} exited with {code}; stopped the other ranks", file=sys.stderr, flush=True)
            return 128 - code if code < 0 else code
        return 128 + stop["signal"] if stop["signal"] else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
