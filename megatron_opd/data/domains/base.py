"""What every verifiable domain provides: a seeded problem generator and an exact verifier."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    prompt: str
    response: str  # the reference (teacher-quality) response, scratchpad included
    meta: dict[str, Any] = field(default_factory=dict)  # what the verifier needs


@dataclass(frozen=True)
class Verdict:
    correct: bool  # the task is solved (final answer / all constraints)
    format_score: float  # fraction of format constraints met, in [0, 1]


class Domain(Protocol):
    name: str

    def sample(self, rng: random.Random) -> Problem: ...

    def verify(self, meta: dict[str, Any], response: str) -> Verdict: ...
