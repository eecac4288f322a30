"""Methods compared at an equal compute budget (continued SFT vs OPD vs GRPO from one SFT checkpoint).

Pure functions over what training stages leave behind — per-step records in ``metrics.jsonl`` and HF
snapshots in ``snapshots/step-N`` — so the choices are testable without a model: what each step cost,
which checkpoint of a run is "at the budget", how much compute a curve needs to reach an accuracy, and
which goals a comparison meets. The cascade runner evaluates the checkpoints.

Compute is counted in FLOPs, as the on-policy distillation write-up counts it (Lu & Thinking Machines 2025,
"On-Policy Distillation": SFT vs OPD vs RL at equal compute, the SFT data's teacher sampling included),
with :class:`~megatron_opd.model.cost.Shape`'s model FLOPs (Kaplan et al. 2020: 2 x parameters per token read,
6 x per token trained; plus causal attention): every method's student training (forward + backward over
every position of the batch, prompts included); OPD's and GRPO's student sampling (one forward over each
sample's positions: prefill + decode with a KV cache) and OPD's teacher scoring (one forward over the same
positions); SFT's data, sampled by a teacher and kept if verified (the teacher's sampling FLOPs over every
sample it drew, rejected ones included, shared out over the rows kept; counted when a row is first
trained on, rows written by a program cost nothing). The verifier and recomputed activations are free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Callable

from megatron_opd.model.cost import Shape

COSTS = {"flops": "FLOPs", "tokens": "trained response tokens"}


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tokens: float  # trained response tokens before this checkpoint
    path: str
    flops: float = 0.0  # FLOPs spent before this checkpoint (StageCost)

    def cost(self, unit: str) -> float:
        return self.flops if unit == "flops" else self.tokens


@dataclass(frozen=True)
class StageCost:
    """FLOPs of one compared stage's steps, by part (see the module's docstring)."""

    kind: str  # sft / opd / grpo
    student: Shape
    teacher: Shape | None = None  # opd: the teacher that scores the compared domain
    data_flops_per_row: float = 0.0  # sft: the teacher's sampling FLOPs per kept row of the stage's data

    def step(self, record: dict[str, Any]) -> dict[str, float]:
        positions, squares = float(record["train/positions"]), float(record["train/positions_sq"])
        parts = {"student training": self.student.train_flops(positions, squares)}
        if self.kind in ("opd", "grpo"):
            parts["student sampling"] = self.student.forward_flops(positions, squares)
        if self.kind == "opd":
            assert self.teacher is not None
            parts["teacher scoring"] = self.teacher.forward_flops(positions, squares)
        if self.kind == "sft":
            parts["teacher sampling (SFT data)"] = float(record["data/new_rows"]) * self.data_flops_per_row
        return parts


def data_cost(path: str | Path) -> tuple[float, int]:
    """(teacher sampling FLOPs, rows) of one SFT data file: its ``<name>.cost.json`` beside it (written by the
    world build: the teacher, the positions it sampled, the rows kept); (0, rows) for rows without one."""
    path = Path(path)
    rows = sum(1 for line in path.open() if line.strip())
    sidecar = path.with_suffix(".cost.json")
    if not sidecar.is_file():
        return 0.0, rows
    stats = json.loads(sidecar.read_text())
    teacher = Shape.of(json.loads((sidecar.parent / stats["teacher_config"]).read_text()))
    return teacher.forward_flops(stats["positions"], stats["positions_sq"]), rows


def stage_cost(config: dict[str, Any], init: str | Path, domain: str) -> StageCost:
    """A finished stage's :class:`StageCost` from its resolved ``config.yaml``: the student from its init checkpoint,
    OPD's teachers from the route of ``domain``, SFT's data cost from its data files' ``.cost.json``."""
    def shape(hf_dir: str | Path) -> Shape:
        return Shape.of(json.loads((Path(hf_dir) / "config.json").read_text()))

    kind, student = config["kind"], shape(init)
    if kind == "opd":
        routing = config["teachers"]
        route = routing["routes"].get(domain) or routing.get("default") or []
        if len(route) != 1 or not routing["teachers"][route[0]["teacher"]].get("model"):
            raise ValueError(f"compare: the OPD stage routes {domain!r} to {[t['teacher'] for t in route]}: counting its "
                             "FLOPs needs exactly one teacher with a local `model` checkpoint")
        return StageCost(kind, student, teacher=shape(routing["teachers"][route[0]["teacher"]]["model"]))
    if kind == "sft":
        flops, rows = map(sum, zip(*(data_cost(path) for path in config["data"]["train"])))
        return StageCost(kind, student, data_flops_per_row=flops / max(rows, 1))
    return StageCost(kind, student)


def step_records(rows: list[dict[str, Any]], steps: int, stage: str) -> dict[int, dict[str, Any]]:
    """Each step's training record (1..steps); a resumed run's later record for a step wins. Every step must be logged."""
    per_step = {int(r["step"]): r for r in rows if "train/tokens" in r and 0 < int(r["step"]) <= steps}
    missing = [s for s in range(1, steps + 1) if s not in per_step]
    if missing:
        raise ValueError(f"compare: stage {stage!r} logged train/tokens at {steps - len(missing)} of {steps} steps "
                         f"(first missing: step {missing[0]}); compared stages need train.log_interval=1")
    return per_step


def cumulative(records: dict[int, dict[str, Any]], measure: Callable[[dict[str, Any]], float]) -> dict[int, float]:
    """``measure`` summed up to each step (step 0 -> 0)."""
    out, total = {0: 0.0}, 0.0
    for s in range(1, len(records) + 1):
        total += measure(records[s])
        out[s] = total
    return out


def cumulative_tokens(rows: list[dict[str, Any]], steps: int, stage: str) -> dict[int, float]:
    """Trained response tokens up to each step (step 0 -> 0) from per-step ``train/tokens`` records."""
    return cumulative(step_records(rows, steps, stage), lambda r: float(r["train/tokens"]))


def cumulative_flops(rows: list[dict[str, Any]], steps: int, stage: str, cost: StageCost) -> dict[int, float]:
    records = step_records(rows, steps, stage)
    lacking = [s for s, r in records.items() if "train/positions" not in r or (cost.kind == "sft" and "data/new_rows" not in r)]
    if lacking:
        raise ValueError(f"compare: stage {stage!r} did not log train/positions (or data/new_rows) at step {lacking[0]}: "
                         "its FLOPs cannot be counted (a run from before they were logged; compare.cost: tokens counts tokens)")
    return cumulative(records, lambda r: sum(cost.step(r).values()))


def flops_by_part(cost: StageCost | None, rows: list[dict[str, Any]], through: int) -> dict[str, float]:
    """A stage's FLOPs by part over its steps 1..``through`` (empty when the comparison counts tokens)."""
    out: dict[str, float] = {}
    if cost is None:
        return out
    for record in step_records(rows, through, "").values():
        for part, value in cost.step(record).items():
            out[part] = out.get(part, 0.0) + value
    return out


def stage_checkpoints(stage_dir: str | Path, init: str | Path, steps: int, tokens: dict[int, float],
                      flops: dict[int, float] | None = None) -> list[Checkpoint]:
    """The stage's starting checkpoint, its HF snapshots and its final output, in step order."""
    stage_dir = Path(stage_dir)
    flops = flops or {}
    points = [Checkpoint(0, 0.0, str(init), 0.0)]
    for snap in sorted((stage_dir / "snapshots").glob("step-*")):
        step = int(snap.name.split("-", 1)[1])
        if 0 < step <= steps:
            points.append(Checkpoint(step, tokens[step], str(snap), flops.get(step, 0.0)))
    if points[-1].step != steps:
        points.append(Checkpoint(steps, tokens[steps], str(stage_dir / "hf"), flops.get(steps, 0.0)))
    return points


def at_budget(points: list[Checkpoint], budget: float, unit: str = "tokens") -> Checkpoint:
    """The last checkpoint that cost no more than ``budget`` (step 0 always qualifies)."""
    return max((p for p in points if p.cost(unit) <= budget), key=lambda p: p.cost(unit))


def cost_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Cost of the first (cost, accuracy) point at or above ``target``; None if never reached."""
    for cost, accuracy in sorted(curve):
        if accuracy >= target - 1e-9:
            return cost
    return None


tokens_to_reach = cost_to_reach


def accuracy_within(curve: list[tuple[float, float]], cost: float) -> tuple[float, float]:
    """The (cost, accuracy) point of ``curve`` that cost the most, not above ``cost``."""
    return max((p for p in curve if p[0] <= cost), key=lambda p: p[0])


def common_reach(methods: dict[str, dict[str, Any]], focus: str) -> dict[str, Any]:
    """The source's "x times cheaper": the compute each method spends to first reach an accuracy another one
    reaches too. ``accuracy``: the best accuracy every method reaches, what each spent to first reach it
    and its cost over the focus method's; ``pairs``: the same for the focus method and each other one alone
    (the best accuracy both reach), so a method that never left the start does not hide the others' ratio.
    A target no better than the start (every curve's first point) has no ratio (None)."""
    start = max(sorted(m["curve"])[0][1] for m in methods.values())

    def reach(names: list[str]) -> dict[str, Any]:
        best = min(max(a for _, a in methods[n]["curve"]) for n in names)
        cost = {n: cost_to_reach(methods[n]["curve"], best) for n in names}
        base = cost[focus]
        gained = best > start + 1e-9
        return {"accuracy": best, "cost": cost,
                "ratio_to_focus": {n: (c / base if gained and base and c is not None else None) for n, c in cost.items()}}

    everyone = reach(list(methods))
    pairs = {name: reach([focus, name]) for name in methods if name != focus}
    return {**everyone, "start": start, "pairs": {name: {"accuracy": r["accuracy"], "focus_cost": r["cost"][focus],
                                                          "cost": r["cost"][name], "ratio": r["ratio_to_focus"][name]}
                                                   for name, r in pairs.items()}}


def comparison_goals(methods: dict[str, dict[str, Any]], focus: str, reach: str | None, reach_fraction: float,
                     teacher_accuracy: float | None, teacher_fraction: float, unit: str = "tokens") -> list[dict[str, Any]]:
    """The goals of the results table, each with its measured numbers; ``met`` is None where a goal
    says nothing (the reach method never beat the start). ``methods[m]`` holds the picked grid
    point's ``accuracy`` and ``cost`` at the budget and its ``curve`` of (cost, accuracy); ``unit``
    names the cost (tokens or FLOPs).

    "Above X at equal cost" compares X at its budget checkpoint with the focus method's checkpoint
    that cost no more than X's, so the focus method never wins by having spent more."""
    f = methods[focus]
    goals = []
    if teacher_accuracy is not None:
        goals.append({"goal": f"{focus} >= {teacher_fraction:.0%} of the teacher's accuracy",
                      "met": f["accuracy"] >= teacher_fraction * teacher_accuracy,
                      "measured": f"{f['accuracy']:.3f} vs teacher {teacher_accuracy:.3f}"
                                  + (f" ({f['accuracy'] / teacher_accuracy:.0%})" if teacher_accuracy else "")})
    for name, m in methods.items():
        if name != focus:
            cost, accuracy = accuracy_within(f["curve"], m["cost"])
            goals.append({"goal": f"{focus} above {name} at equal {unit}", "met": accuracy > m["accuracy"],
                          "measured": f"{focus} {accuracy:.3f} after {cost:.3g} {unit} vs {name} {m['accuracy']:.3f} "
                                      f"after {m['cost']:.3g}"})
    if reach is not None:
        r, start = methods[reach], sorted(f["curve"])[0][1]
        needed = cost_to_reach(f["curve"], r["accuracy"])
        goal = f"{focus} reaches {reach}'s final accuracy with <= {reach_fraction:.3g} of its {unit}"
        if r["accuracy"] <= start:
            goals.append({"goal": goal, "met": None, "measured": f"n/a: {reach} {r['accuracy']:.3f} after "
                          f"{r['cost']:.3g} {unit} is no better than the start ({start:.3f})"})
        else:
            share = None if needed is None else needed / max(r["cost"], 1.0)
            goals.append({"goal": goal, "met": share is not None and share <= reach_fraction + 1e-12,
                          "measured": f"{reach} {r['accuracy']:.3f} after {r['cost']:.3g} {unit}; {focus} "
                                      + (f"reaches it after {needed:.3g} ({share:.3f} of them)" if needed is not None
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


def teacher_share(records: list[dict[str, Any]], teacher: str, steps: int, window: int = 20) -> dict[str, float] | None:
    """One teacher's part of an OPD stage's training, from its logged steps (``metrics.jsonl``): the
    samples it scored (``teachers/NAME/samples`` is a running count since the process started: a count
    that falls marks a resume, and the counts before it are added) in all and per step, and the
    student's reverse KL to it on its own tokens, mean over the first and the last ``window`` logged
    steps that routed samples to it (a step logged again after a resume counts once, its later record,
    as in :func:`step_records`). None when no logged step routed a sample to this teacher."""
    records = [r for _, r in sorted({int(r["step"]): r for r in records if "step" in r}.items())]
    kl = [r[f"teacher/{teacher}/reverse_kl"] for r in records if f"teacher/{teacher}/reverse_kl" in r]
    if not kl:
        return None
    total = last = 0.0
    for count in (r[f"teachers/{teacher}/samples"] for r in records if f"teachers/{teacher}/samples" in r):
        total += count - last if count >= last else count
        last = count
    return {"samples": total, "samples_per_step": total / steps, "kl_first": mean(kl[:window]), "kl_last": mean(kl[-window:])}


def as_dict(point: Checkpoint) -> dict[str, Any]:
    return asdict(point)
