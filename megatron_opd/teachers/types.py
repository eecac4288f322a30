"""What a teacher returns for one finished sample, and the errors a scoring run can stop with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class TokenScores:
    """A teacher's view of one sample's completion tokens (positions ``start`` .. end).

    ``logprobs[t]`` is log p_T(y_t | y_<t); with top-k, ``top_ids``/``top_logprobs`` [T, k] are the
    teacher's k most likely tokens at that position (descending). ``computed_tokens`` counts the
    positions the teacher actually ran (prefix reuse makes it smaller than prompt + completion).
    """

    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    computed_tokens: int = 0
    cached_tokens: int = 0

    def __len__(self) -> int:
        return int(self.logprobs.numel())


class TeacherError(RuntimeError):
    """Scoring cannot go on (every replica of a teacher failed, or a teacher answered nonsense)."""


class Scorer(Protocol):
    """One endpoint: score finished sequences from ``starts[i]`` (the first completion position)."""

    name: str

    def score(self, sequences: list[list[int]], starts: list[int], top_k: int = 0) -> list[TokenScores]: ...

    def health(self) -> bool: ...
