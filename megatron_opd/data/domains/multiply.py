"""Long multiplication with a worked scratchpad: the tiny world's long-horizon domain.

    user:      mul 4827 x 36
    assistant: 4827*6: 7*6+0=42 2*6+4=16 8*6+1=49 4*6+4=28 -> 28962
               4827*3: 7*3+0=21 2*3+2=8 8*3+0=24 4*3+2=14 -> 14481
               28962+144810: 2+0+0=2 6+1+0=7 9+8+0=17 8+4+1=13 2+4+1=7 0+1+0=1 -> 173772
               answer: 173772

One partial product per digit of the multiplier (each digit's product with its carry written out),
then a running sum of the partials shifted into place (column by column, as in ``arithmetic``).
Answers run 130-340 tokens, every line built on the lines above it: a slip early in a partial
product is copied into every sum after it, the compounding error that imitation suffers from and
on-policy training exists to fix. Correct = the final ``answer:`` equals a x b; format = the share
of scratchpad lines present and right.
"""

from __future__ import annotations

import random
import re
from typing import Any

from megatron_opd.data.domains.arithmetic import column_steps
from megatron_opd.data.domains.base import Problem, Verdict

_ANSWER = re.compile(r"answer: (-?\d+)\s*$")


def _partial(a: int, digit: int) -> tuple[str, int]:
    carry, steps = 0, []
    for x in map(int, str(a)[::-1]):
        total = x * digit + carry
        steps.append(f"{x}*{digit}+{carry}={total}")
        carry = total // 10
    return f"{a}*{digit}: {' '.join(steps)} -> {a * digit}", a * digit


def _column_sum(x: int, y: int) -> str:
    return f"{x}+{y}: {' '.join(column_steps(x, y))} -> {x + y}"


def scratchpad(a: int, b: int) -> str:
    lines, partials = [], []
    for digit in map(int, str(b)[::-1]):
        line, value = _partial(a, digit)
        lines.append(line)
        partials.append(value)
    running = partials[0]
    for shift, value in enumerate(partials[1:], 1):
        lines.append(_column_sum(running, value * 10**shift))
        running += value * 10**shift
    lines.append(f"answer: {a * b}")
    return "\n".join(lines)


class Multiply:
    name = "multiply"

    def __init__(self, a_digits: tuple[int, int] = (3, 4), b_digits: tuple[int, int] = (2, 3)) -> None:
        self.a_digits, self.b_digits = a_digits, b_digits

    def sample(self, rng: random.Random) -> Problem:
        def number(digits: tuple[int, int]) -> int:
            n = rng.randint(*digits)
            return rng.randint(10 ** (n - 1), 10**n - 1)

        a, b = number(self.a_digits), number(self.b_digits)
        return Problem(f"mul {a} x {b}", scratchpad(a, b), {"a": a, "b": b})

    def verify(self, meta: dict[str, Any], response: str) -> Verdict:
        match = _ANSWER.search(response.strip())
        correct = bool(match) and int(match.group(1)) == meta["a"] * meta["b"]
        expected = scratchpad(meta["a"], meta["b"]).splitlines()
        got = response.strip().splitlines()
        lines_right = sum(1 for i, line in enumerate(expected) if i < len(got) and got[i].strip() == line)
        return Verdict(correct, lines_right / len(expected) if len(got) <= len(expected) else 0.0)
