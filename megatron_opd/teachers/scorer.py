"""A teacher endpoint's protocol and the error a scoring run stops with (the score records live
in :mod:`megatron_opd.records`)."""

from __future__ import annotations

from typing import Protocol

from megatron_opd.records import TokenScores


class TeacherError(RuntimeError):
    """Scoring cannot go on (every replica of a teacher failed, or a teacher answered nonsense)."""


class Scorer(Protocol):
    """One endpoint: score finished sequences from ``starts[i]`` (the first completion position)."""

    name: str

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int = 0) -> list[TokenScores]: ...

    def health(self) -> bool: ...
