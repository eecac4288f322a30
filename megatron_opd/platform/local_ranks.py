"""Start a multi-process job on this machine: the same ``opd`` command on N local ranks.

torchrun is the launcher on clusters (nemo-run's Slurm executor starts it on every node). Locally
its agent would serve the rendezvous store on every network interface, so a local job starts its
ranks itself, everything on 127.0.0.1: rank 0 serves the store on loopback only
(:func:`megatron_opd.platform.dist.bound_store`) and gloo binds loopback (``GLOO_SOCKET_IFNAME``).
As under torchrun, the first rank to fail brings the others down and its exit code is the job's.

On a machine without a GPU, one fresh process (``python -m megatron_opd.platform.local_ranks``)
imports what every rank imports (torch, transformers, megatron-core, mbridge: ~8 s of CPU per
process on this project's 2-core machines) and forks the ranks, so the stack loads once per job
rather than once per rank. Where forking is not safe (a GPU node: CUDA must not be touched before a
fork; or an import started a thread) or ``OPD_LOCAL_RANKS=spawn`` is set, each rank is a fresh
``python -m megatron_opd.cli`` process.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

from megatron_opd.platform.exit import exit_now
from megatron_opd.platform.net import free_port
from megatron_opd.platform.run_lock import held_fds


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
    if os.environ.get("OPD_LOCAL_RANKS") != "spawn" and sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*"):
        # a fresh process (nothing imported, no thread started) that loads the stack once and forks the ranks
        forker = subprocess.Popen([sys.executable, "-m", "megatron_opd.platform.local_ranks", str(nproc), *argv],
                                  preexec_fn=die_with_parent, env=base, pass_fds=held_fds())
        return supervise([forker], grace_s, ranks=False)
    return supervise(spawn_ranks(argv, [{**base, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(nproc)]), grace_s)


def spawn_ranks(argv: list[str], envs: list[dict[str, str]]) -> list[subprocess.Popen]:
    """One fresh ``python -m megatron_opd.cli <argv>`` process per rank environment."""
    return [subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", *argv], preexec_fn=die_with_parent, env=env,
                             pass_fds=held_fds()) for env in envs]


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def supervise(procs: list, grace_s: float, ranks: bool = True) -> int:
    """Wait for ``procs``; the first to fail stops the others (SIGTERM, SIGKILL after ``grace_s``) and its
    exit code is returned; SIGINT / SIGTERM / SIGUSR1 to this process are passed on to them. Ranks that
    stopped on a signal with a checkpoint (exit 75) are not failures: the others are waiting to do the
    same, and 75 is returned once all have."""
    from megatron_opd.platform.signals import EXIT_STOPPED

    def forward(signum, _frame):  # Ctrl-C, SIGTERM, Slurm's warning: every rank stops its own way
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        failed, code, stopping_since = None, 0, None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0, EXIT_STOPPED)), None)
            code = failed.returncode if failed is not None else 0
            if failed is None and stopping_since is None and any(p.poll() == EXIT_STOPPED for p in procs):
                stopping_since = time.monotonic()
            if failed is None and stopping_since is not None and time.monotonic() - stopping_since > grace_s:
                failed, code = next(p for p in procs if p.poll() is None), 1  # it did not follow the others
            time.sleep(0.2)
        if failed is None:
            failed = next((p for p in procs if p.returncode not in (0, EXIT_STOPPED)), None)
            code = failed.returncode if failed is not None else 0
        if failed is not None:  # one rank failed: the others would wait on it forever
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + grace_s
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if ranks:
                print(f"[opd] rank {procs.index(failed)} exited with {code}; stopped the other ranks", file=sys.stderr, flush=True)
            return 128 - code if code < 0 else code
        if any(p.returncode == EXIT_STOPPED for p in procs):
            return EXIT_STOPPED
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fork_ranks(nproc: int, argv: list[str]) -> int:
    """In the forking process: load what every rank imports, fork ``nproc`` ranks, supervise them.
    A rank's own process runs the command and returns its exit code from here."""
    from megatron_opd.platform.cpu_compat import import_megatron_core

    import_megatron_core()
    import mbridge  # noqa: F401
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    envs = [{**os.environ, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(nproc)]
    if len(os.listdir("/proc/self/task")) > 1:  # an import started a thread, which a fork would not carry
        return supervise(spawn_ranks(argv, envs), grace_s=30.0)
    procs = []
    for env in envs:
        rank = ForkedRank.start(env)
        if rank is None:  # this is the new rank's process
            return run_cli_here(argv)  # (its cli main() ends the process; this module's __main__ otherwise)
        procs.append(rank)
    return supervise(procs, grace_s=30.0)


class ForkedRank:
    """A rank forked from this process, with the slice of ``subprocess.Popen`` the launcher uses
    (``returncode`` as Popen's: negative for a signal)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    @classmethod
    def start(cls, env: dict[str, str]) -> "ForkedRank | None":
        """The rank in the parent; None in the new rank's own process (its environment set)."""
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return cls(pid)
        os.environ.clear()
        os.environ.update(env)
        die_with_parent()
        # named opd-rank-N (`ps -o comm`, psutil's name()): its /proc/PID/environ is the forking process's
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(15, f"opd-rank-{env['RANK']}".encode())  # PR_SET_NAME
        return None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run_cli_here(argv: list[str]) -> int:
    """``opd <argv>`` in this process, as ``python -m megatron_opd.cli <argv>`` would run it; its exit code."""
    import runpy

    sys.argv = [sys.argv[0], *argv]
    try:
        runpy.run_module("megatron_opd.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    return 0


if __name__ == "__main__":  # the forking process of relaunch_local: python -m megatron_opd.platform.local_ranks N ARGV...
    exit_now(fork_ranks(int(sys.argv[1]), sys.argv[2:]))
