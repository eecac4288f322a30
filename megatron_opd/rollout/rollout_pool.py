"""Several rollout servers as one engine: a batch is split into one share per server in rotation,
and a share whose server fails is retried elsewhere (the failover policy of :mod:`megatron_opd.wire.failover`)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Callable

from megatron_opd.records import Rollout, SamplingParams
from megatron_opd.wire.failover import Failover, PoolError


class RolloutPool:
    def __init__(self, clients: list[Any], max_retries: int = 3, backoff_s: float = 0.5, cooldown_s: float = 30.0) -> None:
        if not clients:
            raise ValueError("a rollout pool needs at least one server")
        self.clients = clients
        self.failover = Failover("rollout", clients, max_retries=max_retries, backoff_s=backoff_s,
                                 cooldown_s=cooldown_s, error=PoolError)
        self.counters = self.failover.counters
        self._lock = threading.Lock()

    @property
    def retries(self) -> int:
        return self.counters.retries

    @property
    def dead(self) -> set[int]:
        """Servers out of rotation (cooling down after a failure)."""
        return self.failover.cooling_down

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 on_rollout: Callable[[int, Rollout], None] | None = None) -> list[Rollout]:
        """``sampling.n`` rollouts per prompt, each prompt's samples exactly once, in prompt order.
        ``on_rollout(j, rollout)`` (streaming, from the servers' threads) hears of each output once,
        a retried share's outputs included (a share keeps its seed, so a retry repeats them)."""
        reported: set[int] = set()

        def relay(indices: list[int]):
            def hear(local: int, rollout: Rollout) -> None:
                prompt = indices[local // sampling.n]
                index = prompt * sampling.n + local % sampling.n
                with self._lock:
                    if index in reported:
                        return
                    reported.add(index)
                on_rollout(index, replace(rollout, prompt_index=prompt))
            return hear

        servers = len(self.failover.in_rotation())
        shares = [s for s in (list(range(len(prompts)))[k::servers] for k in range(servers)) if s]

        def run_share(server: int, share_id: int) -> list[Rollout]:
            indices = shares[share_id]
            seed = None if sampling.seed is None else sampling.seed + share_id  # same share -> same seed on retry
            args: list[Any] = [[prompts[i] for i in indices], replace(sampling, seed=seed)]
            if on_rollout is not None:
                args.append(relay(indices))
            return self.clients[server].generate(*args)

        results: dict[int, list[Rollout]] = {}
        for share_id, rollouts in enumerate(self.failover.run(list(range(len(shares))), run_share)):
            indices = shares[share_id]
            for rollout in rollouts:
                results.setdefault(indices[rollout.prompt_index], []).append(
                    replace(rollout, prompt_index=indices[rollout.prompt_index]))
        return [r for i in range(len(prompts)) for r in sorted(results[i], key=lambda r: r.sample_index)]

    def pause(self) -> None:
        for i in self.failover.in_rotation():
            self.clients[i].pause()

    def resume(self) -> None:
        for i in self.failover.in_rotation():
            self.clients[i].resume()

    def health(self) -> bool:
        """True while at least one server answers; the others leave the rotation."""
        try:
            self.failover.check_health()
        except PoolError:
            return False
        return True
