"""Launch and drive real SGLang servers (GPU). Same HTTP client as the embedded server.

Without the ``sglang`` package or CUDA this fails at once with a message saying what is missing
(``pip install -e '.[sglang]'`` on a CUDA machine), never with an ImportError deep in a stack and
never by silently using the embedded engine instead.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from megatron_opd.wire.client import ROUTED_EXPERTS_FLAG, NotHealthy, SGLangClient, wait_healthy

# Flags of `python -m sglang.launch_server` (sglang 0.5.x ServerArgs) that this launcher emits.
SGLANG_FLAGS = {
    "--model-path", "--host", "--port", "--tp-size", "--mem-fraction-static", "--api-key", "--dtype",
    "--random-seed", "--skip-tokenizer-init", "--trust-remote-code", "--context-length",
    ROUTED_EXPERTS_FLAG,  # routing replay: meta_info["routed_experts"] when a request asks
}


class SGLangUnavailable(RuntimeError):
    """SGLang cannot run here (package or CUDA missing)."""


@dataclass(frozen=True)
class SGLangServerConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    mem_fraction_static: float = 0.7
    dtype: str = "bfloat16"
    api_key: str | None = None
    random_seed: int = 0
    context_length: int | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def command(self) -> list[str]:
        """The exact ``launch_server`` command line (token ids in and out: no tokenizer needed)."""
        cmd = [sys.executable, "-m", "sglang.launch_server",
               "--model-path", self.model_path, "--host", self.host, "--port", str(self.port),
               "--tp-size", str(self.tp_size), "--mem-fraction-static", str(self.mem_fraction_static),
               "--dtype", self.dtype, "--random-seed", str(self.random_seed), "--skip-tokenizer-init"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.context_length:
            cmd += ["--context-length", str(self.context_length)]
        return cmd + list(self.extra_args)


def check_available() -> None:
    missing = []
    if importlib.util.find_spec("sglang") is None:
        missing.append("the 'sglang' package (pip install -e '.[sglang]')")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (SGLang's kernels are CUDA-only; on CPU use `opd serve --role rollout`)")
    if missing:
        raise SGLangUnavailable("SGLang rollout engine unavailable: missing " + " and ".join(missing))


def launch(config: SGLangServerConfig, timeout_s: float = 900.0) -> tuple[subprocess.Popen, SGLangClient]:
    """Start a server, wait for ``/health``, and return the process and a client."""
    check_available()
    proc = subprocess.Popen(config.command())
    client = SGLangClient(f"http://{config.host}:{config.port}", api_key=config.api_key)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        wait_healthy(client.base_url, timeout_s, headers=headers, proc=proc, interval=2.0, request_timeout=10.0)
    except NotHealthy as exc:
        if exc.exit_code is not None:
            raise RuntimeError(f"sglang.launch_server exited with code {exc.exit_code}") from None
        proc.kill()
        raise TimeoutError(f"SGLang server on port {config.port} not healthy after {timeout_s:.0f}s") from None
    return proc, client
