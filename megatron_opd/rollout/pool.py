"""Several rollout servers as one engine: a batch is split across them, and the share of a server
that fails (connection lost, HTTP error) is retried on the servers still alive."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any, Callable

from megatron_opd.rollout.http_client import ServerError
from megatron_opd.records import Rollout, SamplingParams


class RolloutPool:
    def __init__(self, clients: list[Any], max_retries: int = 3) -> None:
        if not clients:
            raise ValueError("a rollout pool needs at least one server")
        self.clients = clients
        self.max_retries = max_retries
        self.retries = 0
        self.dead: set[int] = set()
        self._lock = threading.Lock()

    def _alive(self) -> list[int]:
        return [i for i in range(len(self.clients)) if i not in self.dead]

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
            return hear if on_rollout else None

        alive = self._alive()
        if not alive:
            raise ServerError("no rollout server is alive")
        shares = [list(range(len(prompts)))[k :: len(alive)] for k in range(len(alive))]
        results: dict[int, list[Rollout]] = {}
        with ThreadPoolExecutor(max_workers=len(self.clients)) as executor:
            futures = {}
            for chunk_id, (server, indices) in enumerate(zip(alive, shares)):
                if indices:
                    futures[self._submit(executor, server, indices, prompts, sampling, chunk_id, relay(indices))] = (server, indices, chunk_id, 0)
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    server, indices, chunk_id, attempt = futures.pop(future)
                    try:
                        rollouts = future.result()
                    except ServerError as exc:
                        if not exc.unavailable:  # a bad request fails the same everywhere
                            raise
                        with self._lock:
                            self.dead.add(server)
                            self.retries += 1
                        survivors = self._alive()
                        if not survivors or attempt + 1 > self.max_retries:
                            raise
                        target = survivors[chunk_id % len(survivors)]
                        futures[self._submit(executor, target, indices, prompts, sampling, chunk_id, relay(indices))] = (target, indices, chunk_id, attempt + 1)
                        continue
                    for rollout in rollouts:
                        results.setdefault(indices[rollout.prompt_index], []).append(
                            replace(rollout, prompt_index=indices[rollout.prompt_index]))
        return [r for i in range(len(prompts)) for r in sorted(results[i], key=lambda r: r.sample_index)]

    def pause(self) -> None:
        for i in self._alive():
            self.clients[i].pause()

    def resume(self) -> None:
        for i in self._alive():
            self.clients[i].resume()

    def health(self) -> bool:
        """True while at least one server answers; servers that stop answering are marked dead."""
        for i in self._alive():
            if not self.clients[i].health():
                self.dead.add(i)
        return bool(self._alive())

    def _submit(self, executor, server, indices, prompts, sampling, chunk_id, on_rollout=None):
        seed = None if sampling.seed is None else sampling.seed + chunk_id  # same share -> same seed on retry
        shared = replace(sampling, seed=seed)
        if on_rollout is None:
            return executor.submit(self.clients[server].generate, [prompts[i] for i in indices], shared)
        return executor.submit(self.clients[server].generate, [prompts[i] for i in indices], shared, on_rollout)
