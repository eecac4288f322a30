"""String manipulation with a stated rule: reverse, uppercase or double the letters of a word.

    user:      reverse: garden
    assistant: nedrag

Correct = exact string; format = the response is a single word of letters (no spaces or markup).
"""

from __future__ import annotations

import random
import string
from typing import Any

from megatron_opd.data.domains.base import Problem, Verdict

OPERATIONS = {
    "reverse": lambda word: word[::-1],
    "upper": str.upper,
    "double": lambda word: "".join(ch * 2 for ch in word),
}


class Strings:
    name = "strings"

    def __init__(self, min_len: int = 3, max_len: int = 7) -> None:
        self.min_len, self.max_len = min_len, max_len

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(sorted(OPERATIONS))
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Problem(f"{op}: {word}", OPERATIONS[op](word), {"op": op, "word": word})

    def verify(self, meta: dict[str, Any], response: str) -> Verdict:
        text = response.strip()
        return Verdict(text == OPERATIONS[meta["op"]](meta["word"]), 1.0 if text.isalpha() else 0.0)
