"""Write a domain's fixed train/test splits as ``datasets``-loadable jsonl chat rows.

Row: ``{"id", "domain", "messages": [user, assistant], "meta": "<json>"}``. ``meta`` is a JSON
string (domains differ in what their verifier needs; a string keeps one Arrow schema).
Test problems are drawn first from their own seed; train problems never repeat a test prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from megatron_opd.data import DataError
from megatron_opd.data.domains import Domain, Problem, get_domain


def draw(domain: Domain, n: int, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
    """``n`` problems with distinct prompts, none in ``exclude``; deterministic in ``seed``."""
    rng = random.Random(f"{domain.name}:{seed}")
    seen, out = set(exclude), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise DataError(f"domain {domain.name}: cannot draw {n} distinct problems (space too small)")
        problem = domain.sample(rng)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            out.append(problem)
    return out


def to_row(domain: str, index: int, split: str, problem: Problem) -> dict[str, Any]:
    return {
        "id": f"{domain}-{split}-{index}",
        "domain": domain,
        "messages": [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.response}],
        "meta": json.dumps(problem.meta, sort_keys=True),
    }


def make_splits(name: str, n_train: int, n_test: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    domain = get_domain(name)
    test = draw(domain, n_test, seed * 2 + 1)
    train = draw(domain, n_train, seed * 2, exclude={p.prompt for p in test})
    return {split: [to_row(name, i, split, p) for i, p in enumerate(problems)]
            for split, problems in (("train", train), ("test", test))}


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read world rows, checking the fields evaluation needs; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            meta = json.loads(row["meta"])
            prompt = row["messages"][0]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise DataError(f"{path}:{line_no}: malformed row ({type(exc).__name__}: {exc}); expected "
                            "id, domain, messages[0].content and a JSON 'meta' string") from None
        if not isinstance(prompt, str) or "domain" not in row:
            raise DataError(f"{path}:{line_no}: malformed row (missing domain or prompt)")
        rows.append({**row, "meta": meta})
    return rows


def available_domains(world_dir: str | Path) -> list[str]:
    """The domains of a world directory that have a held-out split (``data/<domain>/test.jsonl``)."""
    data = Path(world_dir) / "data"
    return sorted(p.name for p in data.iterdir() if (p / "test.jsonl").is_file()) if data.is_dir() else []
