"""Start an embedded server (`opd serve`) as a subprocess on a free loopback port and wait for it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path | None = None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)


def start_server(model: Path, role: str = "rollout", host: str = "127.0.0.1", port: int | None = None,
                 timeout: float = 180.0, extra_args: list[str] | None = None, log_path: Path | None = None,
                 api_key: str | None = None) -> ServerProcess:
    """`opd serve --role ROLE --model MODEL` on ``host:port`` (a free port by default), healthy.
    ``api_key`` goes to the server through its environment (``OPD_API_KEY``), never the command line."""
    import os

    env = {**os.environ, "OPD_API_KEY": api_key} if api_key else None
    return start_process(
        lambda bind: [sys.executable, "-m", "megatron_opd.cli", "serve", "--role", role, "--model", str(model),
                      "--host", host, "--port", str(bind), *(extra_args or [])],
        f"`opd serve --role {role} --model {model}`", host, port, timeout, log_path, env, api_key, prefix=f"opd-{role}-")


def start_process(argv: Callable[[int], list[str]], what: str, host: str = "127.0.0.1", port: int | None = None,
                  timeout: float = 180.0, log_path: Path | None = None, env: dict[str, str] | None = None,
                  api_key: str | None = None, prefix: str = "opd-server-", wait: bool = True) -> ServerProcess:
    """A server process (``argv(port)``) on ``host:port`` (a free port by default), once ``/health`` answers;
    its output in ``log_path``. It dies with this process and never outlives a failed start. ``wait=False``
    returns at once (several servers starting together: :func:`wait_started`). Call it from the thread that
    outlives the server: the kernel's parent-death signal follows the creating thread, not the process."""
    import tempfile

    from megatron_opd.platform.local_ranks import die_with_parent  # a killed run never leaves servers behind
    from megatron_opd.platform.net import free_port
    from megatron_opd.wire.client import NotHealthy, wait_healthy

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if log_path is None:  # a file, not a pipe: a chatty server must never block on a full pipe
        log_path = Path(tempfile.mkstemp(prefix=prefix, suffix=".log")[1])
    attempts = 1 if port else 3  # a port we picked can be taken by another process before the server binds it
    for attempt in range(attempts):
        bind = port or free_port()
        with open(log_path, "w") as log:  # the child keeps its own handle
            # its own session: a terminal's Ctrl-C reaches the run, which finishes its step with the server still
            # up, then stops it (and a run that dies takes it along: die_with_parent)
            proc = subprocess.Popen(argv(bind), stdout=log, stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=die_with_parent, env=env, start_new_session=True)
        url = f"http://{host}:{bind}"
        if not wait:
            return ServerProcess(url, proc, log_path)
        try:
            wait_healthy(url, timeout, headers=headers, proc=proc, interval=0.5, request_timeout=2.0)
        except BaseException as exc:  # never leave a half-started server behind (timeout, Ctrl-C, ...)
            ServerProcess(url, proc, log_path).stop(timeout=10)
            if not isinstance(exc, NotHealthy):
                raise
            text = Path(log_path).read_text()
            if exc.exit_code is not None and "address already in use" in text.lower() and attempt + 1 < attempts:
                continue
            if exc.exit_code is not None:
                raise RuntimeError(f"{what} on {url} exited with {exc.exit_code}: {text[-3000:]}") from None
            raise RuntimeError(f"{what} on {url} was not healthy after {timeout:.0f}s (log: {log_path})") from None
        return ServerProcess(url, proc, log_path)
    raise AssertionError("unreachable")


def wait_started(servers: list[ServerProcess], what: str, timeout: float) -> None:
    """Wait until every server answers ``/health`` (they start together); else stop them all and say which failed."""
    import time

    from megatron_opd.wire.client import NotHealthy, wait_healthy

    deadline = time.monotonic() + timeout
    try:
        for server in servers:
            try:
                wait_healthy(server.url, max(1.0, deadline - time.monotonic()), proc=server.proc, interval=0.5,
                             request_timeout=2.0)
            except NotHealthy as exc:
                text = Path(server.log_path).read_text()[-3000:] if server.log_path else ""
                state = f"exited with {exc.exit_code}" if exc.exit_code is not None else f"was not healthy after {timeout:.0f}s"
                raise RuntimeError(f"{what} on {server.url} {state} (log: {server.log_path}): {text}") from None
    except BaseException:
        for server in servers:
            server.stop(timeout=10)
        raise


def vllm_python(configured: str | None, key: str = "rollout.vllm_python") -> str:
    """The interpreter of the vLLM venv: the recipe's (``key``), else ``OPD_VLLM_PYTHON``; it must exist. (Here,
    not in :mod:`megatron_opd.wire.vllm`: the launcher's preflight checks it without importing torch.)"""
    python = configured or os.environ.get("OPD_VLLM_PYTHON")
    if not python:
        raise ValueError(f"{key}: vLLM servers start from their own virtual environment: set {key} (or "
                         "OPD_VLLM_PYTHON) to its python (bash tools/setup_vllm_venv.sh builds .venv-vllm)")
    if not Path(python).is_file():
        raise ValueError(f"{key} / OPD_VLLM_PYTHON: {python} does not exist (bash tools/setup_vllm_venv.sh builds it)")
    return python
