"""Methods compared at an equal budget of trained response tokens (continued SFT vs OPD vs GRPO).

Pure functions over what training stages leave behind — per-step ``train/tokens`` in
``metrics.jsonl`` and HF snapshots in ``snapshots/step-N`` — so the choices are testable without
a model: which checkpoint of a run is "at the budget", how many tokens a curve needs to reach an
accuracy, and which goals a comparison meets. The cascade runner evaluates the checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tokens: float  # trained response tokens before this checkpoint
    path: str


def cumulative_tokens(rows: list[dict[str, Any]], steps: int, stage: str) -> dict[int, float]:
    """Trained response tokens up to each step (step 0 -> 0) from per-step ``train/tokens`` records;
    a resumed run's later record for a step wins. Every step must be logged."""
    per_step = {int(r["step"]): float(r["train/tokens"]) for r in rows if "train/tokens" in r}
    missing = [s for s in range(1, steps + 1) if s not in per_step]
    if missing:
        raise ValueError(f"compare: stage {stage!r} logged train/tokens at {steps - len(missing)} of {steps} steps "
                         f"(first missing: step {missing[0]}); compared stages need train.log_interval=1")
    out, total = {0: 0.0}, 0.0
    for s in range(1, steps + 1):
        total += per_step[s]
        out[s] = total
    return out


def stage_checkpoints(stage_dir: str | Path, init: str | Path, steps: int, tokens: dict[int, float]) -> list[Checkpoint]:
    """The stage's starting checkpoint, its HF snapshots and its final output, in step order."""
    stage_dir = Path(stage_dir)
    points = [Checkpoint(0, 0.0, str(init))]
    for snap in sorted((stage_dir / "snapshots").glob("step-*")):
        step = int(snap.name.split("-", 1)[1])
        if 0 < step <= steps:
            points.append(Checkpoint(step, tokens[step], str(snap)))
    if points[-1].step != steps:
        points.append(Checkpoint(steps, tokens[steps], str(stage_dir / "hf")))
    return points


def at_budget(points: list[Checkpoint], budget: float) -> Checkpoint:
    """The last checkpoint trained on no more than ``budget`` tokens (step 0 always qualifies)."""
    return max((p for p in points if p.tokens <= budget), key=lambda p: p.tokens)


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Tokens of the first (tokens, accuracy) point at or above ``target``; None if never reached."""
    for tokens, accuracy in sorted(curve):
        if accuracy >= target - 1e-9:
            return tokens
    return None


def accuracy_within(curve: list[tuple[float, float]], tokens: float) -> tuple[float, float]:
    """The (tokens, accuracy) point of ``curve`` trained on the most tokens not above ``tokens``."""
    return max((p for p in curve if p[0] <= tokens), key=lambda p: p[0])


def comparison_goals(methods: dict[str, dict[str, Any]], focus: str, reach: str | None, reach_fraction: float,
                     teacher_accuracy: float | None, teacher_fraction: float) -> list[dict[str, Any]]:
    """The goals of the results table, each with its measured numbers; ``met`` is None where a goal
    says nothing (the reach method never beat the start). ``methods[m]`` holds the picked grid
    point's ``accuracy`` and ``tokens`` at the budget and its ``curve`` of (tokens, accuracy).

    "Above X at equal tokens" compares X at its budget checkpoint with the focus method's checkpoint
    trained on no more tokens than X's, so the focus method never wins by having seen more."""
    f = methods[focus]
    goals = []
    if teacher_accuracy is not None:
        goals.append({"goal": f"{focus} >= {teacher_fraction:.0%} of the teacher's accuracy",
                      "met": f["accuracy"] >= teacher_fraction * teacher_accuracy,
                      "measured": f"{f['accuracy']:.3f} vs teacher {teacher_accuracy:.3f}"
                                  + (f" ({f['accuracy'] / teacher_accuracy:.0%})" if teacher_accuracy else "")})
    for name, m in methods.items():
        if name != focus:
            tokens, accuracy = accuracy_within(f["curve"], m["tokens"])
            goals.append({"goal": f"{focus} above {name} at equal tokens", "met": accuracy > m["accuracy"],
                          "measured": f"{focus} {accuracy:.3f} after {tokens:.0f} tokens vs {name} {m['accuracy']:.3f} "
                                      f"after {m['tokens']:.0f}"})
    if reach is not None:
        r, start = methods[reach], sorted(f["curve"])[0][1]
        needed = tokens_to_reach(f["curve"], r["accuracy"])
        goal = f"{focus} reaches {reach}'s final accuracy with <= {reach_fraction:.3g} of its tokens"
        if r["accuracy"] <= start:
            goals.append({"goal": goal, "met": None, "measured": f"n/a: {reach} {r['accuracy']:.3f} after "
                          f"{r['tokens']:.0f} tokens is no better than the start ({start:.3f})"})
        else:
            share = None if needed is None else needed / max(r["tokens"], 1.0)
            goals.append({"goal": goal, "met": share is not None and share <= reach_fraction + 1e-12,
                          "measured": f"{reach} {r['accuracy']:.3f} after {r['tokens']:.0f} tokens; {focus} "
                                      + (f"reaches it after {needed:.0f} tokens ({share:.3f} of them)" if needed is not None
                                         else "never reaches it within the budget")})
    return goals


def specialist_rows(evals: dict[str, dict[str, dict[str, Any]]], consolidated: str, specialists: dict[str, str],
                    sequential: str | None, margin: float) -> list[dict[str, Any]]:
    """Per domain: its specialist's greedy accuracy, the consolidated student's and the sequential
    chain's, and whether the consolidated one is within ``margin`` of the specialist."""
    rows = []
    for domain, stage in specialists.items():
        best, mine = evals[stage][domain]["accuracy"], evals[consolidated][domain]["accuracy"]
        rows.append({"domain": domain, "specialist": stage, "specialist_accuracy": best, "consolidated_accuracy": mine,
                     "sequential_accuracy": evals[sequential][domain]["accuracy"] if sequential else None,
                     "gap": mine - best, "met": mine >= best - margin - 1e-9})
    return rows


def as_dict(point: Checkpoint) -> dict[str, Any]:
    return asdict(point)
