"""The replicas of one teacher as one scorer: batching, bounded concurrency, retries, failover.

A batch keeps the n samples of one prompt together (same prefix), so the server computes the
prompt once (SGLang's radix cache; the embedded server's per-request prefix sharing). A replica
that cannot be reached, times out, rate-limits or fails server-side is taken out of rotation for
a cooldown and its batch goes to another one after a backoff (with no replica left in rotation,
the ones answering /health come back). When the retry budget is spent or no replica answers,
scoring stops with a :class:`TeacherError` naming the teacher — never a missing or zero score.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from megatron_opd.rollout.http_client import ServerError
from megatron_opd.records import TokenScores
from megatron_opd.teachers.types import Scorer, TeacherError


@dataclass
class TeacherCounters:
    samples: int = 0
    tokens: int = 0  # completion tokens scored
    computed_tokens: int = 0  # positions the teacher ran (prefix reuse makes this smaller)
    requests: int = 0
    retries: int = 0
    failures: int = 0  # failed requests (each one retried or fatal)
    wait_s: float = 0.0  # wall time spent waiting for this teacher

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def prefix_batches(sequences: list[list[int]], starts: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of at most ``batch_size`` that keep sequences with one prefix together
    (a group larger than ``batch_size`` is split)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        groups.setdefault(tuple(seq[:start]), []).append(i)
    batches: list[list[int]] = []
    current: list[int] = []
    for members in groups.values():
        for lo in range(0, len(members), batch_size):
            part = members[lo:lo + batch_size]
            if current and len(current) + len(part) > batch_size:
                batches.append(current)
                current = []
            current = current + part
    if current:
        batches.append(current)
    return batches


class TeacherPool:
    def __init__(self, name: str, replicas: list[Scorer], batch_size: int = 32, max_concurrency: int = 4,
                 max_retries: int = 3, backoff_s: float = 0.5, cooldown_s: float = 30.0) -> None:
        if not replicas:
            raise ValueError(f"teacher {name!r}: no replicas")
        self.name = name
        self.replicas = replicas
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cooldown_s = cooldown_s
        self.dead_until: dict[int, float] = {}  # replica -> end of its cooldown
        self.counters = TeacherCounters()
        self._next = 0

    @property
    def dead(self) -> set[int]:
        now = time.monotonic()
        return {i for i, until in self.dead_until.items() if until > now}

    def check_health(self) -> None:
        """Take replicas that do not answer /health out of rotation; stop if none does."""
        for i, replica in enumerate(self.replicas):
            if replica.health():
                self.dead_until.pop(i, None)
            else:
                self.dead_until[i] = time.monotonic() + self.cooldown_s
        if len(self.dead) == len(self.replicas):
            raise TeacherError(f"teacher {self.name!r}: none of its {len(self.replicas)} replicas is healthy "
                               f"({', '.join(getattr(r, 'url', '?') for r in self.replicas)})")

    def _pick(self) -> int:
        alive = [i for i in range(len(self.replicas)) if i not in self.dead]
        if not alive:  # everyone is cooling down: take back whoever answers /health now
            for i, replica in enumerate(self.replicas):
                if replica.health():
                    self.dead_until.pop(i, None)
                    alive.append(i)
        if not alive:
            raise TeacherError(f"teacher {self.name!r}: none of its {len(self.replicas)} replicas answers "
                               f"({', '.join(getattr(r, 'url', '?') for r in self.replicas)})")
        self._next += 1
        return alive[self._next % len(alive)]

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int = 0,
              token_ids: list[list[int]] | None = None) -> list[TokenScores]:
        """Every sequence scored exactly once, in order (``token_ids``: see ``SGLangScorer.score``)."""
        began = time.perf_counter()
        results: list[TokenScores | None] = [None] * len(sequences)
        batches = prefix_batches(sequences, starts, self.batch_size)
        executor = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = {self._submit(executor, batch, sequences, starts, top_k, token_ids): (batch, 0) for batch in batches}
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    batch, attempt = futures.pop(future)
                    replica, error = future.replica, future.exception()
                    if error is None:
                        for index, scores in zip(batch, future.result()):
                            results[index] = scores
                        continue
                    if not isinstance(error, ServerError) or not error.retryable:
                        raise TeacherError(f"teacher {self.name!r}: {error}") from error
                    self.counters.failures += 1
                    self.dead_until[replica] = time.monotonic() + self.cooldown_s
                    if attempt >= self.max_retries:
                        raise TeacherError(f"teacher {self.name!r}: a batch failed {attempt + 1} times; last error: {error}") from error
                    print(f"[teachers] {self.name}: replica {replica} ({getattr(self.replicas[replica], 'url', '?')}) failed ({error}); retrying its batch of {len(batch)} "
                          f"(attempt {attempt + 2} of {self.max_retries + 1})", flush=True)
                    time.sleep(self.backoff_s * 2 ** attempt)
                    self.counters.retries += 1
                    futures[self._submit(executor, batch, sequences, starts, top_k, token_ids)] = (batch, attempt + 1)
        finally:  # on an error, do not wait for the queued batches
            executor.shutdown(wait=False, cancel_futures=True)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # cannot happen unless a replica answered short; never hand on a silent gap
            raise TeacherError(f"teacher {self.name!r}: no scores for samples {missing[:10]}")
        self.counters.samples += len(sequences)
        self.counters.tokens += sum(len(r) for r in results)
        self.counters.computed_tokens += sum(r.computed_tokens for r in results)
        self.counters.wait_s += time.perf_counter() - began
        return results  # type: ignore[return-value]

    def _submit(self, executor, batch, sequences, starts, top_k, token_ids=None):
        """Only the calling (main) thread touches the rotation and the counters."""
        replica = self._pick()
        self.counters.requests += 1
        args = [[sequences[i] for i in batch], [starts[i] for i in batch], top_k]
        if token_ids is not None:
            args.append([token_ids[i] for i in batch])
        future = executor.submit(self.replicas[replica].score, *args)
        future.replica = replica
        return future
