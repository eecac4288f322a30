"""``opd serve``: the embedded engine behind SGLang's HTTP API, as a rollout server or a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from megatron_opd.platform.exit import fail
from megatron_opd.platform.net import is_loopback


def serve(
    role: str = typer.Option("rollout", help="rollout (generation + weight updates) or teacher (scoring; read-only weights)"),
    model: Path = typer.Option(..., help="HF checkpoint directory"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback unless told otherwise)"),
    port: int = typer.Option(30000),
    api_key: Optional[str] = typer.Option(None, envvar="OPD_API_KEY", help="require 'Authorization: Bearer KEY' "
                                          "(or set OPD_API_KEY: a flag shows in the process list)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback --host without an API key"),
    batch_size: int = typer.Option(256, help="sequences per decode loop / scoring chunk bound"),
    kv_cache_mib: int = typer.Option(4096, min=1, help="KV cache one decode loop may hold (more rows run as more loops)"),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: one per core)"),
    device: str = typer.Option("cpu", help="where the model runs: cpu, or cuda (one GPU: the GPU check)"),
    weights_root: Optional[List[Path]] = typer.Option(None, help="a directory /update_weights_from_disk may read "
                                                      "from (repeatable; default: the working dir and --model)"),
    allow_nonfinite_weights: bool = typer.Option(False, help="accept weight updates holding NaN / Inf"),
    max_request_tokens: int = typer.Option(131_072, min=1, help="per-request budget: prompt tokens x n + outputs x max_new_tokens"),
    max_body_mb: float = typer.Option(16.0, min=0.001, help="largest request body accepted (HTTP 413 above)"),
    pause_wait_s: float = typer.Option(120.0, min=0.0, help="a /generate waits this long on a paused server, then 503"),
    group_timeout_s: float = typer.Option(60.0, min=0.1, help="joining a weight-update group gives up after this"),
    body_timeout_s: float = typer.Option(30.0, min=0.1, help="a request body must arrive in full within this (HTTP "
                                         "408 otherwise)"),
    max_waiting: int = typer.Option(256, min=1, help="/generate requests in progress before new ones get a 503 "
                                    "(and /health says overloaded)"),
    enable_return_routed_experts: bool = typer.Option(False, "--enable-return-routed-experts", help="MoE models: a "
                                                      "/generate may ask for each token's experts (return_routed_experts, "
                                                      "as SGLang's flag of this name; routing replay)"),
) -> None:
    """Serve the embedded engine with SGLang's HTTP API (/generate incl. scoring, weight updates, /health, ...)."""
    from megatron_opd.platform.signals import ignore_stop_signals_here

    ignore_stop_signals_here()  # Slurm's SIGUSR1 warning reaches every process of a job: a server has nothing to save
    if role not in ("rollout", "teacher"):
        fail(f"--role {role!r}: expected 'rollout' or 'teacher'")
    if device not in ("cpu", "cuda"):
        fail(f"--device {device!r}: expected 'cpu' or 'cuda'")
    if not (model / "config.json").is_file():
        fail(f"--model {model}: not an HF checkpoint directory (no config.json)")
    if not api_key and not insecure and not is_loopback(host):
        fail(f"--host {host}: a server reachable from other machines needs an API key (--api-key or OPD_API_KEY); "
              "--insecure runs it without one")
    missing = [str(p) for p in weights_root or [] if not p.is_dir()]
    if missing:
        fail(f"--weights-root: {missing} are not directories")
    import uvicorn

    if threads:
        import torch

        torch.set_num_threads(threads)
    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.serve.requests import Limits
    from megatron_opd.serve.rollout_server import create_app

    engine = EmbeddedEngine(model, batch_size=batch_size, allow_nonfinite_weights=allow_nonfinite_weights,
                            weights_roots=[Path.cwd(), model, *(weights_root or [])], kv_cache_mib=kv_cache_mib,
                            device=device)
    limits = Limits(context_len=int(getattr(engine.config, "max_position_embeddings", 0) or 1 << 30),
                    max_body_bytes=int(max_body_mb * (1 << 20)), max_request_tokens=max_request_tokens,
                    pause_wait_s=pause_wait_s, group_timeout_s=group_timeout_s, max_waiting=max_waiting,
                    body_timeout_s=body_timeout_s, routed_experts=enable_return_routed_experts)
    server = create_app(engine, api_key, role=role, limits=limits)
    typer.echo(f"serving {model} as {role} on http://{host}:{port}", err=True)
    # SIGTERM: in-flight generations stop at their next token (the app's shutdown hook), then exit
    uvicorn.run(server, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
