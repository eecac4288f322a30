"""Instruction / format following, checked programmatically (case, brackets, count, separator, JSON).

    user:      write "lamp" upper 3 times in [] sep " | "
    assistant: [LAMP] | [LAMP] | [LAMP]

    user:      json word "lamp" n 2
    assistant: {"word": "lamp", "n": 2}

This is the behaviour a regression-recovery run restores. Correct = every constraint met;
format score = fraction of constraints met.
"""

from __future__ import annotations

import json
import random
from typing import Any

from megatron_opd.data.domains.base import Problem, Verdict

WORDS = ["lamp", "tree", "bird", "rock", "fish", "moon", "star", "leaf", "door", "cake", "ship", "wolf",
         "rain", "salt", "gold", "frog", "bell", "kite", "milk", "sand", "coat", "nest", "ring", "seed"]
BRACKETS = {"[]": ("[", "]"), "()": ("(", ")"), "{}": ("{", "}"), "<>": ("<", ">")}
SEPARATORS = [" | ", ", ", "; ", " - "]
# json prompts vary only in word and n, so n gets a wide range: with 24 words x n 2-5 there were only
# 96 json prompts, the test split took 44 of them first and train was left with 2.6% json (vs 22%).
JSON_COUNTS = (2, 40)


def render_repeat(word: str, case: str, count: int, brackets: str, sep: str) -> str:
    left, right = BRACKETS[brackets]
    token = word.upper() if case == "upper" else word.lower()
    return sep.join(f"{left}{token}{right}" for _ in range(count))


def _check_repeat(meta: dict[str, Any], text: str) -> list[bool]:
    left, right = BRACKETS[meta["brackets"]]
    parts = text.split(meta["sep"])
    inner = [p[1:-1] if len(p) >= 2 else "" for p in parts]
    target = meta["word"].upper() if meta["case"] == "upper" else meta["word"].lower()
    return [
        len(parts) == meta["count"],
        all(len(p) >= 2 and p[0] == left and p[-1] == right for p in parts),
        all(w == target for w in inner),
        all(w.isupper() if meta["case"] == "upper" else w.islower() for w in inner if w),
    ]


def _check_json(meta: dict[str, Any], text: str) -> list[bool]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [False, False, False]
    is_obj = isinstance(value, dict) and set(value) == {"word", "n"}
    return [is_obj, is_obj and value["word"] == meta["word"], is_obj and value["n"] == meta["count"]]


class Format:
    name = "format"

    def sample(self, rng: random.Random) -> Problem:
        word = rng.choice(WORDS)
        if rng.random() < 0.25:
            count = rng.randint(*JSON_COUNTS)
            meta = {"kind": "json", "word": word, "count": count}
            return Problem(f'json word "{word}" n {count}', json.dumps({"word": word, "n": count}), meta)
        count = rng.randint(2, 5)
        case, brackets, sep = rng.choice(["upper", "lower"]), rng.choice(sorted(BRACKETS)), rng.choice(SEPARATORS)
        meta = {"kind": "repeat", "word": word, "case": case, "count": count, "brackets": brackets, "sep": sep}
        prompt = f'write "{word}" {case} {count} times in {brackets} sep "{sep}"'
        return Problem(prompt, render_repeat(word, case, count, brackets, sep), meta)

    def verify(self, meta: dict[str, Any], response: str) -> Verdict:
        text = response.strip()
        checks = _check_json(meta, text) if meta["kind"] == "json" else _check_repeat(meta, text)
        return Verdict(all(checks), sum(checks) / len(checks))
