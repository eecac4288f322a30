"""The trainer's handle on its rollout engine (rank 0): the embedded engine in-process, or a pool
of servers (SGLang or `opd serve --role rollout`), plus the matching weight-sync function."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from megatron_opd.model import ModelBundle
from megatron_opd.rollout.types import Rollout, SamplingParams


class RolloutEngine:
    def __init__(self, engine: Any, clients: list[Any] | None = None) -> None:
        self.engine = engine  # EmbeddedEngine or RolloutPool
        self.clients = clients or []
        self.pusher = None

    @classmethod
    def start(cls, rcfg: Any, model_dir: Path) -> "RolloutEngine":
        if rcfg.engine == "embedded":
            from megatron_opd.rollout.embedded import EmbeddedEngine

            return cls(EmbeddedEngine(model_dir, batch_size=rcfg.batch_size))
        from megatron_opd.rollout.http_client import SGLangClient
        from megatron_opd.rollout.pool import RolloutPool

        clients = [SGLangClient(url) for url in rcfg.urls]
        return cls(RolloutPool(clients), clients)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Rollout]:
        return self.engine.generate(prompts, sampling)

    def complete(self, prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int) -> list[list[int]]:
        """Completion ids for evaluation (greedy at temperature 0)."""
        eos = getattr(self.engine, "eos_token_id", None)
        sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                  stop_token_ids=(eos,) if eos is not None else ())
        return [r.completion_ids for r in self.generate(prompts, sampling)]

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        for client in self.clients:
            client.close()

    @staticmethod
    def syncer(rcfg: Any, bundle: ModelBundle, engine: "RolloutEngine | None", work_dir: Path) -> Callable[[str], Any]:
        """A collective ``sync(version)``: every rank exports, rank 0 (which holds ``engine``) pushes."""
        from megatron_opd.train.weight_sync import sync_weights_distributed, sync_weights_in_process, sync_weights_via_disk

        bucket = rcfg.bucket_mb << 20

        def sync(version: str):
            if rcfg.sync == "in_process":
                return sync_weights_in_process(bundle, engine.engine if engine else None, version)
            if rcfg.sync == "disk":
                return sync_weights_via_disk(bundle, engine.clients if engine else [], version, Path(work_dir) / "sync", bucket)
            if engine is not None and engine.pusher is None:
                from megatron_opd.platform.dist import _free_port
                from megatron_opd.rollout.weight_sync import DistributedPusher

                engine.pusher = DistributedPusher(engine.clients, master_port=_free_port())
            return sync_weights_distributed(bundle, engine.pusher if engine else None, version, bucket)

        return sync
