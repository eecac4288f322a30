"""One run per run directory: an advisory lock held for the run's life.

``fcntl.flock`` on ``<run dir>/.opd-run.lock``: the kernel releases it when the last process holding the
file closes it — a run that dies, even by SIGKILL, frees its directory without any clean-up. The
holder writes its PID, host, start time and command into the file, so a second run into the same
directory stops at once naming it. The process that takes the lock passes it to the ranks it starts
(the descriptor is inherited; ``OPD_RUN_LOCKED`` names the directory so they do not take it again).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".opd-run.lock"
HELD_ENV = "OPD_RUN_LOCKED"  # the run directory whose lock a parent process holds for this one


class RunDirInUse(RuntimeError):
    """Another live run holds the directory."""


_held: dict[str, int] = {}  # resolved run dir -> the open descriptor (kept open for the process's life)


def lock_run_dir(run_dir: str | Path, what: str = "run.output_dir") -> None:
    """Take the run directory's lock for this process (and the processes it starts), or raise
    :class:`RunDirInUse` naming the holder. Idempotent; a no-op where a parent holds it for us."""
    path = Path(run_dir).resolve()
    key = str(path)
    if key in _held or os.environ.get(HELD_ENV) == key:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirInUse(f"{what} {run_dir} is in use by another run ({holder}); wait for it to end, stop "
                              f"it, or choose another {what}") from None
        # a file system without locks (some NFS mounts): say so and go on unguarded
        print(f"[opd] warning: cannot lock {path / LOCK_NAME} ({exc.strerror}); nothing stops a second run into "
              f"{run_dir}", file=sys.stderr, flush=True)
        return
    os.set_inheritable(fd, True)  # the ranks a local run starts hold it too, until the last one exits
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "command": " ".join(sys.argv)}).encode(), 0)
    _held[key] = fd
    os.environ[HELD_ENV] = key


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}: {info.get('command', '?')}"


def held_fds() -> tuple[int, ...]:
    """The lock descriptors this process holds: passed to the ranks it starts (``pass_fds``), so the
    directory stays locked until the last of them exits."""
    return tuple(_held.values())
