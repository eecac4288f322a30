"""Start an embedded server (`opd serve`) as a subprocess on a free loopback port and wait for it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


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
    import tempfile

    from megatron_opd.platform.net import free_port
    from megatron_opd.platform.local_ranks import die_with_parent  # a killed run never leaves servers behind
    from megatron_opd.wire.client import NotHealthy, wait_healthy

    env = {**os.environ, "OPD_API_KEY": api_key} if api_key else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if log_path is None:  # a file, not a pipe: a chatty server must never block on a full pipe
        log_path = Path(tempfile.mkstemp(prefix=f"opd-{role}-", suffix=".log")[1])
    attempts = 1 if port else 3  # a port we picked can be taken by another process before the server binds it
    for attempt in range(attempts):
        bind = port or free_port()
        with open(log_path, "w") as log:  # the child keeps its own handle
            # its own session: a terminal's Ctrl-C reaches the run, which finishes its step with the server still
            # up, then stops it (and a run that dies takes it along: die_with_parent)
            proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "serve", "--role", role, "--model",
                                     str(model), "--host", host, "--port", str(bind), *(extra_args or [])],
                                    stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent, env=env,
                                    start_new_session=True)
        url = f"http://{host}:{bind}"
        try:
            wait_healthy(url, timeout, headers=headers, proc=proc, interval=0.5, request_timeout=2.0)
        except BaseException as exc:  # never leave a half-started server behind (timeout, Ctrl-C, ...)
            ServerProcess(url, proc, log_path).stop(timeout=10)
            if not isinstance(exc, NotHealthy):
                raise
            text = Path(log_path).read_text()
            if exc.exit_code is not None and "address already in use" in text and attempt + 1 < attempts:
                continue
            what = f"`opd serve --role {role} --model {model}` on {url}"
            if exc.exit_code is not None:
                raise RuntimeError(f"{what} exited with {exc.exit_code}: {text[-3000:]}") from None
            raise RuntimeError(f"{what} was not healthy after {timeout:.0f}s (log: {log_path})") from None
        return ServerProcess(url, proc, log_path)
    raise AssertionError("unreachable")
