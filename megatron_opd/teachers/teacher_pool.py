"""The replicas of one teacher as one scorer: batching, bounded concurrency, and the pools' one
failover policy (:mod:`megatron_opd.wire.failover`: cooldown, backoff, bounded retries).

A batch keeps the n samples of one prompt together (same prefix), so the server computes the
prompt once (SGLang's radix cache; the embedded server's per-request prefix sharing). When the retry
budget is spent or no replica answers, scoring stops with a :class:`TeacherError` naming the
teacher — never a missing or zero score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opd.records import TokenScores
from megatron_opd.teachers.scorer import Scorer, TeacherError
from megatron_opd.wire.failover import Failover, PoolCounters


@dataclass
class TeacherCounters(PoolCounters):
    samples: int = 0
    tokens: int = 0  # completion tokens scored
    computed_tokens: int = 0  # positions the teacher ran (prefix reuse makes this smaller)
    nonfinite_tokens: int = 0  # scored positions whose log-prob was NaN/Inf (masked out of the loss)

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


def mask_nonfinite(scores: TokenScores) -> int:
    """Mark the positions whose scores are not numbers (a NaN/Inf sampled-token log-prob, a NaN in the
    top-k or the requested ids) invalid, zero their values so nothing downstream sees a NaN, and return
    how many there were. The loss skips them; the run stops when a step has too many."""
    bad = ~torch.isfinite(scores.logprobs)
    for table in (scores.top_logprobs, scores.ids_logprobs):
        if table is not None:
            bad |= torch.isnan(table).reshape(len(scores), -1).any(-1)
    count = int(bad.sum())
    if count:
        scores.valid = ~bad if scores.valid is None else scores.valid & ~bad
        scores.logprobs = scores.logprobs.masked_fill(bad, 0.0)
        if scores.top_logprobs is not None:
            scores.top_logprobs = scores.top_logprobs.masked_fill(bad[:, None], 0.0)
        if scores.ids_logprobs is not None:
            scores.ids_logprobs = scores.ids_logprobs.masked_fill(bad[:, None], 0.0)
    return count


class TeacherPool:
    def __init__(self, name: str, replicas: list[Scorer], batch_size: int = 32, max_concurrency: int = 4,
                 max_retries: int = 3, backoff_s: float = 0.5, cooldown_s: float = 30.0) -> None:
        if not replicas:
            raise ValueError(f"teacher {name!r}: no replicas")
        self.name = name
        self.replicas = replicas
        self.batch_size = batch_size
        self.counters = TeacherCounters()
        self.failover = Failover(f"teacher {name!r}", replicas, max_retries=max_retries, backoff_s=backoff_s,
                                 cooldown_s=cooldown_s, max_concurrency=max_concurrency, error=TeacherError,
                                 counters=self.counters)

    @property
    def dead(self) -> set[int]:
        """Replicas out of rotation (cooling down after a failure or a failed /health)."""
        return self.failover.cooling_down

    def check_health(self) -> None:
        """Take replicas that do not answer /health out of rotation; stop if none does."""
        self.failover.check_health()

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int = 0,
              token_ids: list[list[int]] | None = None) -> list[TokenScores]:
        """Every sequence scored exactly once, in order (``token_ids``: see ``SGLangScorer.score``)."""
        batches = prefix_batches(sequences, starts, self.batch_size)

        def score_batch(replica: int, batch: list[int]) -> list[TokenScores]:
            args = [[sequences[i] for i in batch], [starts[i] for i in batch], top_k]
            if token_ids is not None:
                args.append([token_ids[i] for i in batch])
            return self.replicas[replica].score(*args)

        results: list[TokenScores | None] = [None] * len(sequences)
        for batch, scored in zip(batches, self.failover.run(batches, score_batch)):
            for index, scores in zip(batch, scored):
                results[index] = scores
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # cannot happen unless a replica answered short; never hand on a silent gap
            raise TeacherError(f"teacher {self.name!r}: no scores for samples {missing[:10]}")
        self.counters.nonfinite_tokens += sum(mask_nonfinite(r) for r in results)
        self.counters.samples += len(sequences)
        self.counters.tokens += sum(len(r) for r in results)
        self.counters.computed_tokens += sum(r.computed_tokens for r in results)
        return results  # type: ignore[return-value]
