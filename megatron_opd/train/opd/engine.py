"""The trainer's handle on its rollout engine (rank 0), and where its weights go after each update.

``rollout.engine``: ``embedded`` (in rank 0's own process), ``embedded_server`` (the run starts
``rollout.replicas`` x ``opd serve --role rollout`` on 127.0.0.1: generation runs in its own
process, beside the trainer — the shape of a GPU deployment), or ``servers`` (SGLang / ``opd
serve`` already running at ``rollout.urls``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from megatron_opd.config import RolloutConfig
from megatron_opd.records import Rollout, SamplingParams
from megatron_opd.rollout.rollout_pool import RolloutPool
from megatron_opd.wire.client import ROUTED_EXPERTS_FLAG, RoutedShape
from megatron_opd.train.weight_export import CheckedSink, DiskSink, DistributedSink, InProcessSink, WeightSink

if TYPE_CHECKING:
    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.teachers.backends import SGLangScorer
    from megatron_opd.wire.client import SGLangClient
    from megatron_opd.wire.process import ServerProcess


class RolloutEngine:
    """The engine in rank 0's process (:class:`EmbeddedEngine`), or its servers as one
    (:class:`RolloutPool` over ``clients``, of which this run started ``servers``)."""

    def __init__(self, engine: EmbeddedEngine | RolloutPool, eos_token_id: int, clients: list[SGLangClient] | None = None,
                 servers: list[ServerProcess] | None = None, api_key: str | None = None,
                 routed: RoutedShape | None = None) -> None:
        self.engine = engine
        self.routed = routed  # every rollout carries its experts, of this shape (routing replay)
        self.eos_token_id = eos_token_id
        self.clients = clients or []
        self.servers = servers or []  # the `opd serve` processes this run started
        self.api_key = api_key
        self._scorers: list[SGLangScorer] = []

    @classmethod
    def start(cls, rcfg: RolloutConfig, model_dir: Path, eos_token_id: int, log_dir: Path | None = None,
              threads: int | None = None, routed: RoutedShape | None = None) -> "RolloutEngine":
        """``routed``: the student's experts (routing replay): every generation asks for them."""
        if rcfg.engine == "embedded":
            from megatron_opd.rollout.embedded import EmbeddedEngine

            return cls(EmbeddedEngine(model_dir, batch_size=rcfg.batch_size, device=rcfg.device), eos_token_id,
                       routed=routed)
        from megatron_opd.wire.client import SGLangClient

        servers: list[ServerProcess] = []
        urls = list(rcfg.urls)
        try:
            if rcfg.engine == "embedded_server":
                from megatron_opd.wire.process import start_server

                extra = ["--batch-size", str(rcfg.batch_size), "--device", rcfg.device] + (["--threads", str(threads)] if threads else [])
                extra += [ROUTED_EXPERTS_FLAG] if routed is not None else []
                if log_dir:  # the disk sync writes the new weights under the run directory
                    extra += ["--weights-root", str(Path(log_dir).resolve())]
                for r in range(rcfg.replicas):
                    log = Path(log_dir) / f"rollout-{r}.log" if log_dir else None
                    servers.append(start_server(Path(model_dir), role="rollout", log_path=log, extra_args=extra))
                urls = [s.url for s in servers]
            if rcfg.engine == "vllm":
                return cls._start_vllm(rcfg, model_dir, eos_token_id, urls, servers, log_dir, threads)
            api_key = None
            if rcfg.api_key_env:
                api_key = os.environ.get(rcfg.api_key_env)
                if not api_key:
                    raise RuntimeError(f"rollout.api_key_env: environment variable {rcfg.api_key_env} (the rollout "
                                       "servers' API key) is not set")
            clients = [SGLangClient(url, api_key=api_key, timeout=rcfg.timeout_s, routed_experts=routed) for url in urls]
            return cls(RolloutPool(clients), eos_token_id, clients, servers, api_key, routed=routed)
        except BaseException:
            for server in servers:
                server.stop()
            raise

    @classmethod
    def _start_vllm(cls, rcfg: RolloutConfig, model_dir: Path, eos_token_id: int, urls: list[str],
                    servers: list[ServerProcess], log_dir: Path | None, threads: int | None) -> "RolloutEngine":
        """vLLM servers at ``urls``, or ``rollout.replicas`` of them started here (appended to ``servers``, which
        the caller stops if this fails)."""
        from megatron_opd.wire.vllm import VLLMClient, start_vllm_servers, vllm_python

        if not urls:
            python = vllm_python(rcfg.vllm_python)
            servers += start_vllm_servers(Path(model_dir), python, "student", rcfg.replicas,
                                          f"vLLM ({python}) serving {model_dir}", log_dir, "rollout-vllm", threads or 1)
            urls = [s.url for s in servers]
            print(f"[rollout] {len(servers)} vLLM server(s) at {', '.join(urls)}", flush=True)
        api_key = os.environ.get(rcfg.api_key_env) if rcfg.api_key_env else None
        clients = [VLLMClient(url, model=None if rcfg.urls else "student", api_key=api_key, timeout=rcfg.timeout_s)
                   for url in urls]
        return cls(RolloutPool(clients), eos_token_id, clients, servers, api_key)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_rollout: Callable[[int, Rollout], None] | None = None) -> list[Rollout]:
        if isinstance(self.engine, RolloutPool):  # its clients ask for the experts themselves
            return self.engine.generate(prompts, sampling, on_rollout)
        return self.engine.generate(prompts, sampling, on_rollout, routed_experts=self.routed is not None)

    def student_top_ids(self, sequences: list[list[int]], starts: list[int], k: int) -> list[torch.Tensor]:
        """The student's k most likely ids [T, k] at every completion position of each finished sequence,
        under the engine's current weights: a scoring prefill on the engine (prefix-cached on SGLang)."""
        if isinstance(self.engine, RolloutPool):
            from megatron_opd.teachers.backends import SGLangScorer

            if not self._scorers:
                self._scorers = [SGLangScorer(c.base_url, name=f"rollout {c.base_url}", api_key=self.api_key, binary=True)
                                 for c in self.clients]
            per_server = -(-len(sequences) // len(self.engine.failover.in_rotation()))
            slices = [list(range(lo, min(len(sequences), lo + per_server))) for lo in range(0, len(sequences), per_server)]

            def score_slice(server: int, indices: list[int]) -> list[torch.Tensor]:
                scores = self._scorers[server].score([sequences[i] for i in indices], [starts[i] for i in indices], k)
                return [sc.top_ids for sc in scores]

            # each server in rotation takes an equal slice; the pool's failover retries a failed one elsewhere
            return [ids for part in self.engine.failover.run(slices, score_slice) for ids in part]
        # the embedded engine takes the first position to score (SGLang's logprob_start_len + 1)
        return [r["top_ids"] for r in self.engine.score(sequences, starts, k)]

    def complete(self, prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int) -> list[list[int]]:
        """Completion ids for evaluation (greedy at temperature 0)."""
        sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                  stop_token_ids=(self.eos_token_id,))
        return [r.completion_ids for r in self.generate(prompts, sampling)]

    def counters(self) -> dict[str, Any]:
        """The server pool's requests / retries / failures / wait ({} for the in-process engine)."""
        return self.engine.counters.as_dict() if isinstance(self.engine, RolloutPool) else {}

    def restore_counters(self, saved: dict[str, Any]) -> None:
        if isinstance(self.engine, RolloutPool) and saved:
            self.engine.counters.restore(saved)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop()


def weight_sink(rcfg: RolloutConfig, engine: RolloutEngine | None, work_dir: Path) -> WeightSink:
    """The sink for ``rollout.sync``; ``engine`` is None on every rank but 0."""
    bucket = rcfg.bucket_mb << 20
    clients = engine.clients if engine else []
    if rcfg.sync == "in_process":
        return InProcessSink(engine.engine if engine else None)
    if rcfg.sync == "disk":
        failover = engine.engine.failover if engine is not None and isinstance(engine.engine, RolloutPool) else None
        disk = DiskSink(clients, Path(work_dir) / "sync", bucket, failover)
        # vLLM repacks its weights on CPU, so only log-probs can tell that a reload took effect
        return CheckedSink(disk, clients, rcfg.reload_check_tol, failover) if rcfg.engine == "vllm" else disk
    return DistributedSink(clients, bucket)
