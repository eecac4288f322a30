"""Start an embedded server (`opd serve`) as a subprocess on a free loopback port and wait for it."""

from __future__ import annotations

import subprocess
import sys
import time
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
    import httpx

    from megatron_opd.platform.dist import _free_port
    from megatron_opd.platform.launch import die_with_parent  # a killed run never leaves servers behind

    import tempfile

    import os

    port = port or _free_port()
    env = {**os.environ, "OPD_API_KEY": api_key} if api_key else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if log_path is None:  # a file, not a pipe: a chatty server must never block on a full pipe
        log_path = Path(tempfile.mkstemp(prefix=f"opd-{role}-", suffix=".log")[1])
    with open(log_path, "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "serve", "--role", role, "--model", str(model),
                                 "--host", host, "--port", str(port), *(extra_args or [])],
                                stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent, env=env)
    url = f"http://{host}:{port}"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`opd serve --role {role} --model {model}` exited with {proc.returncode}: "
                                   f"{Path(log_path).read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2, headers=headers).status_code == 200:
                    return ServerProcess(url, proc, log_path)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"`opd serve --role {role} --model {model}` was not healthy after {timeout:.0f}s "
                           f"(log: {log_path})")
    except BaseException:  # never leave a half-started server behind (timeout, Ctrl-C, ...)
        ServerProcess(url, proc, log_path).stop(timeout=10)
        raise
