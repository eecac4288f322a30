"""Multi-digit addition with a worked, column-by-column scratchpad (carries written out).

    user:      add 4827 + 9356
    assistant: 7+6+0=13
               2+5+1=8
               8+3+0=11
               4+9+1=14
               answer: 14183

Answers run 30-80 tokens, so one early slip compounds: the setting where on-policy distillation
beats imitation. Correct = the final ``answer:`` equals the true sum; format = every scratchpad line
is present and right.
"""

from __future__ import annotations

import random
import re
from typing import Any

from megatron_opd.data.domains.base import Problem, Verdict

_ANSWER = re.compile(r"answer: (-?\d+)\s*$")


def column_steps(a: int, b: int) -> list[str]:
    """``a + b`` column by column from the units: ``x+y+carry=total`` per column."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return steps


def scratchpad(a: int, b: int) -> str:
    return "\n".join([*column_steps(a, b), f"answer: {a + b}"])


class Arithmetic:
    name = "arithmetic"

    def __init__(self, min_digits: int = 3, max_digits: int = 5) -> None:
        self.min_digits, self.max_digits = min_digits, max_digits

    def sample(self, rng: random.Random) -> Problem:
        def number() -> int:
            digits = rng.randint(self.min_digits, self.max_digits)
            return rng.randint(10 ** (digits - 1), 10**digits - 1)

        a, b = number(), number()
        return Problem(f"add {a} + {b}", scratchpad(a, b), {"a": a, "b": b})

    def verify(self, meta: dict[str, Any], response: str) -> Verdict:
        match = _ANSWER.search(response.strip())
        correct = bool(match) and int(match.group(1)) == meta["a"] + meta["b"]
        expected = scratchpad(meta["a"], meta["b"]).splitlines()
        got = response.strip().splitlines()
        lines_right = sum(1 for i, line in enumerate(expected) if i < len(got) and got[i].strip() == line)
        return Verdict(correct, lines_right / len(expected) if len(got) <= len(expected) else 0.0)
