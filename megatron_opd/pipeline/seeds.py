"""One cascade run at several seeds, side by side: what a met / missed verdict rests on.

    opd seeds outputs/tiny/compare_methods outputs/tiny/compare_methods_s2 outputs/tiny/compare_methods_s3

Pure functions over the runs' ``results.json`` (the cascade's own record, :mod:`megatron_opd.pipeline.cascade`):
every training stage's greedy accuracy per domain as mean and spread (min..max) with each seed's value; a
compare stage's accuracy and cost of every method at the budget and the cost ratio at the best accuracy all
methods reach; and every goal with the number of runs that met it. A goal met by some seeds and not others is
reported as such, never as met.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "results.json"
        if not path.is_file():
            raise ValueError(f"{run_dir}: no results.json (a cascade run that finished)")
        data = json.loads(path.read_text())
        if "stages" not in data:
            raise ValueError(f"{path}: not a cascade's results (no stages)")
        runs.append(data)
    return runs


def spread(values: list[float | None]) -> str:
    """``mean [min..max] (each)``; a value a run could not measure shows as n/a and is left out of the mean."""
    known = [v for v in values if v is not None]
    each = ", ".join("n/a" if v is None else f"{v:.3g}" for v in values)
    if not known:
        return f"n/a ({each})"
    return f"{mean(known):.3g} [{min(known):.3g}..{max(known):.3g}] ({each})"


def _stages(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in run["stages"]}


def compare_stages(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each compare stage's name -> that stage in every run, in run order."""
    by_run = [_stages(r) for r in runs]
    return {s["name"]: [stages[s["name"]] for stages in by_run] for s in runs[0]["stages"] if s["kind"] == "compare"}


def seeds_summary(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown: accuracy per training stage and domain, each compare stage's methods, every goal's met count."""
    if len(runs) < 2:
        raise ValueError(f"{len(runs)} run given: a spread needs at least two (three for a verdict)")
    names = [s["name"] for s in runs[0]["stages"]]
    for i, run in enumerate(runs[1:], 2):
        if [s["name"] for s in run["stages"]] != names:
            raise ValueError(f"run {i} has stages {[s['name'] for s in run['stages']]}, run 1 has {names}: not repeats")
    by_run = [_stages(r) for r in runs]
    lines = [f"# {runs[0].get('name', 'cascade')} over {len(runs)} runs", "",
             "Greedy accuracy and format score: mean [min..max] (each run in order).", "",
             "| stage | domain | accuracy | format score |", "|---|---|---|---|"]

    def row(name: str, evals: list[dict[str, Any]]) -> str:
        return (f"| {name} | {spread([e['accuracy'] for e in evals])} "
                f"| {spread([e.get('format_score') for e in evals])} |")

    for domain in runs[0]["start_eval"]:
        lines.append(row(f"start | {domain}", [r["start_eval"][domain] for r in runs]))
    for name in names:
        if by_run[0][name].get("eval"):
            for domain in by_run[0][name]["eval"]:
                lines.append(row(f"{name} | {domain}", [s[name]["eval"][domain] for s in by_run]))
    for name in names:
        first = by_run[0][name]
        if first["kind"] == "compare":
            lines += _compare_lines(name, [s[name] for s in by_run])
        elif first["kind"] == "specialists":
            lines += _specialists_lines(name, [s[name] for s in by_run])
    goals: dict[str, list[bool | None]] = {}
    for stages in by_run:
        for name in names:
            for goal in stages[name].get("goals", []):
                goals.setdefault(f"{name}: {goal['goal']}", []).append(goal["met"])
    if goals:
        lines += ["", "| goal | runs that met it | verdict |", "|---|---|---|"]
        for goal, met in goals.items():
            decided = [m for m in met if m is not None]
            verdict = ("n/a" if not decided else "met" if all(decided) and len(decided) == len(met)
                       else "missed" if not any(decided) else "mixed")
            lines.append(f"| {goal} | {sum(bool(m) for m in met)} of {len(met)} | {verdict} |")
    return lines + [""]


def _compare_lines(name: str, stages: list[dict[str, Any]]) -> list[str]:
    unit = "FLOPs" if stages[0].get("unit") == "flops" else "tokens"
    lines = ["", f"## `{name}`: {stages[0]['domain']}, cost in {unit}", "",
             f"| method | accuracy at the budget | {unit} at the budget | picks | best accuracy it and the focus method "
             f"both reach | its {unit} to reach it over the focus method's |", "|---|---|---|---|---|---|"]
    for method in stages[0]["methods"]:
        ms = [s["methods"][method] for s in stages]
        pairs = [s.get("common", {}).get("pairs", {}).get(method) for s in stages]
        reach = [p["accuracy"] if p else None for p in pairs]
        ratio = [p["ratio"] if p else None for p in pairs]
        lines.append(f"| {method} | {spread([m['accuracy'] for m in ms])} | {spread([m.get('cost', m.get('tokens')) for m in ms])} "
                     f"| {', '.join(m['pick'] for m in ms)} | {spread(reach)} | {spread(ratio)} |")
    common = [s.get("common", {}).get("accuracy") for s in stages]
    teacher = [s.get("teacher_accuracy") for s in stages]
    lines += ["", f"Best accuracy every method reaches: {spread(common)}"
              + (f"; teacher {spread(teacher)}" if any(t is not None for t in teacher) else "")]
    return lines + curve_lines(stages, unit)


def curve_lines(stages: list[dict[str, Any]], unit: str) -> list[str]:
    """Each method's accuracy-vs-cost curve over the runs: its picks' snapshots taken at the same steps, so
    point i is each run's i-th snapshot (cost as the runs' mean; a curve some run lacks a point of ends there)."""
    lines = ["", f"Accuracy vs {unit} of each method's pick, snapshot by snapshot (accuracy on the reported rows):", "",
             f"| method | {unit} (mean over runs) | accuracy |", "|---|---|---|"]
    for method in stages[0]["methods"]:
        curves = [s["methods"][method].get("curve") or [] for s in stages]
        for i in range(min(len(c) for c in curves)):
            lines.append(f"| {method} | {mean(c[i][0] for c in curves):.3g} | {spread([c[i][1] for c in curves])} |")
    return lines


def _specialists_lines(name: str, stages: list[dict[str, Any]]) -> list[str]:
    consolidated = stages[0]["consolidated"]
    lines = ["", f"## `{name}`: `{consolidated}` vs each specialist", "",
             f"| domain | specialist | {consolidated} | gap | runs within {stages[0]['margin']:.2f} |", "|---|---|---|---|---|"]
    for i, row in enumerate(stages[0]["rows"]):
        rows = [s["rows"][i] for s in stages]
        lines.append(f"| {row['domain']} | {spread([r['specialist_accuracy'] for r in rows])} "
                     f"| {spread([r['consolidated_accuracy'] for r in rows])} | {spread([r['gap'] for r in rows])} "
                     f"| {sum(r['met'] for r in rows)} of {len(rows)} |")
    return lines
