"""Two quick toy chat tasks (count a range, reverse a word) for fast SFT tests; the tiny world's
verifiable domains live in ``data/domains``."""

from __future__ import annotations

import random
import string
from typing import Any


def reverse_problem(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
    return f"reverse: {word}", word[::-1]


def count_problem(rng: random.Random) -> tuple[str, str]:
    start = rng.randint(0, 80)
    stop = start + rng.randint(3, 15)
    return f"count from {start} to {stop}", ", ".join(str(i) for i in range(start, stop + 1))


PROBLEMS = {"count": count_problem, "reverse": reverse_problem}


def chat_rows(domain: str, n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """``n`` distinct problems of ``domain`` as chat rows; prompts in ``exclude`` are never produced."""
    make = PROBLEMS[domain]
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    while len(rows) < n:
        prompt, answer = make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"domain": domain, "messages": [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows
