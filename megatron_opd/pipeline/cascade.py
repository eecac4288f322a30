"""Run a cascade: stages in order, each a normal ``opd run`` of its recipe in its own directory,
starting from the previous stage's output; every stage's output is evaluated on the held-out
splits, ``select`` stages pick per-domain teachers by measured eval, ``compare`` stages put methods
side by side at an equal compute budget, and a report is written.

A stage that finished is not run again when the cascade is re-run (its evaluation is kept in
``cascade_state.json``) as long as its inputs are unchanged; a finished stage whose config or input
files changed stops the re-run (its numbers would be stale). An interrupted stage resumes from its
own last checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from megatron_opd.config import CascadeConfig, CascadeStage, dump_config, load_stage_recipe, stage_recipe_path
from megatron_opd.pipeline.compare import (COSTS, as_dict, at_budget, common_reach, comparison_goals, cumulative_flops,
                                           cumulative_tokens, flops_by_part, specialist_rows, stage_checkpoints,
                                           stage_cost, teacher_share)
from megatron_opd.pipeline.inputs import input_changes, stage_inputs
from megatron_opd.pipeline.report import read_metrics, rises_verdict, teacher_goal_verdict, write_cascade_report
from megatron_opd.platform.local_ranks import die_with_parent, supervise
from megatron_opd.platform.signals import EXIT_STOPPED


class StageFailed(RuntimeError):
    """A stage's process exited non-zero; its log names the cause."""


class StageStopped(RuntimeError):
    """A stage stopped on a signal with a checkpoint (exit 75): running the cascade again resumes it."""


class StaleStage(StageFailed):
    """A stage finished in an earlier run from inputs that have changed since."""


def _hf(stage_dir: Path) -> Path:
    return stage_dir / "hf"


class CascadeRunner:
    def __init__(self, cfg: CascadeConfig, recipe_path: str | Path, evaluate: Callable[..., dict[str, Any]],
                 log: Callable[[str], None] = print) -> None:
        """``evaluate(model_dir, domains, offset, samples, sampled) -> {domain: scores}`` is injected
        (the eval layer's generator-based evaluation) so this module stays a thin orchestrator."""
        self.cfg, self.recipe_path, self.evaluate, self.log = cfg, Path(recipe_path), evaluate, log
        self.out = Path(cfg.run.output_dir)
        self.state_path = self.out / "cascade_state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    # -- helpers ----------------------------------------------------------------------------------
    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def _eval(self, model_dir: Path) -> dict[str, Any]:
        e = self.cfg.eval
        return self.evaluate(model_dir, e.domains or None, 0, e.samples, True)

    def _pick(self, ref: str) -> Path:
        stage, domain = ref.split("/", 1)
        return Path(self.state[stage]["picks"][domain]["path"])

    def _init_for(self, stage: CascadeStage, previous: Path) -> Path:
        if stage.init is None:
            return previous
        if stage.init == "start":
            return Path(self.cfg.start)
        if stage.init.startswith("select:"):
            return self._pick(stage.init[len("select:"):])
        if stage.init in self.state:
            return Path(self.state[stage.init]["hf"])
        return Path(stage.init)

    def _inputs(self, config: dict[str, Any], skip: Path | None = None) -> dict[str, Any]:
        return stage_inputs({**config, "cascade_eval": self.cfg.eval.model_dump(mode="json")}, skip)

    def _check_kept(self, name: str, now: dict[str, Any]) -> None:
        changed = input_changes(self.state[name].get("inputs"), now)
        if changed:
            shown = "\n  ".join(changed[:12]) + (f"\n  ... and {len(changed) - 12} more" if len(changed) > 12 else "")
            raise StaleStage(f"stage {name!r} finished in an earlier run of {self.out}, but its inputs changed since:\n  "
                             f"{shown}\nIts results would be stale: remove {self.out} (or set run.output_dir to a new "
                             "directory) to run the cascade again.")

    # -- stages ------------------------------------------------------------------------------------
    def _stage_args(self, stage: CascadeStage, init: Path) -> tuple[Any, list[str]]:
        """The stage's resolved config and the overrides the runner adds to its recipe."""
        extra = [f"run.output_dir={self.out / stage.name}", f"model.hf_path={init}",
                 *([f"train.seed={self.cfg.seed}"] if self.cfg.seed is not None else [])]
        tracking = self.cfg.run.wandb
        if tracking is not None:  # every training stage its own W&B run, named after the cascade and the stage
            extra += [f"run.wandb.project={tracking.project}", f"run.wandb.mode={tracking.mode}",
                      f"run.wandb.name={tracking.name or self.cfg.run.name}/{stage.name}",
                      *([f"run.wandb.entity={tracking.entity}"] if tracking.entity else []),
                      *([f"run.wandb.tags={json.dumps(tracking.tags)}"] if tracking.tags else [])]
        if stage.teachers_from:
            extra += [f"teachers.teachers.{d}.model={p['path']}" for d, p in self.state[stage.teachers_from]["picks"].items()]
        stage_cfg = load_stage_recipe(self.recipe_path, stage, extra)
        if stage_cfg.kind != "sft" and not any(o.startswith("eval.") for o in stage.overrides):
            extra.append("eval.world_dir=null")  # the cascade evaluates every stage's output itself
        return stage_cfg, extra

    def _train_stage(self, stage: CascadeStage, init: Path, stage_cfg: Any, extra: list[str],
                     inputs: dict[str, Any]) -> dict[str, Any]:
        stage_dir = self.out / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "megatron_opd.cli", "run", str(stage_recipe_path(self.recipe_path, stage)),
               *stage.overrides, *extra]
        self.log(f"[cascade] stage {stage.name} ({stage_cfg.kind}) from {init}: log {stage_dir / 'stage.log'}")
        began = time.perf_counter()
        with open(stage_dir / "stage.log", "a") as log:  # a signal here is passed on to the stage, which saves
            code = supervise([subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)],
                             grace_s=300.0, ranks=False)
        if code == EXIT_STOPPED:
            raise StageStopped(f"[cascade] stage {stage.name!r} stopped on a signal with a checkpoint ({stage_dir / 'stage.log'});"
                               f" run the same command to resume it (exit {EXIT_STOPPED})")
        if code != 0:
            tail = "\n".join((stage_dir / "stage.log").read_text().splitlines()[-15:])
            raise StageFailed(f"stage {stage.name!r} failed (exit {code}); last lines of {stage_dir / 'stage.log'}:\n{tail}")
        wall = time.perf_counter() - began
        table = self._eval(_hf(stage_dir))
        return {"name": stage.name, "kind": stage_cfg.kind, "dir": str(stage_dir), "hf": str(_hf(stage_dir)),
                "init": str(init), "wall_s": wall, "eval": table, "inputs": inputs}

    def _select_stage(self, stage: CascadeStage) -> dict[str, Any]:
        spec = stage.select
        assert spec is not None
        began = time.perf_counter()
        candidates: list[Path] = []
        for name in spec.candidates:
            done = self.state[name]
            if spec.include_inputs:
                candidates.append(Path(done["init"]))
            candidates += sorted((Path(done["dir"]) / "snapshots").glob("step-*")) + [Path(done["hf"])]
        unique = list(dict.fromkeys(c.resolve() for c in candidates))
        scores: dict[str, dict[str, float]] = {}
        for path in unique:
            table = self.evaluate(path, spec.domains, spec.offset, spec.samples, False)
            scores[str(path)] = {d: table[d][spec.metric] for d in spec.domains}
            self.log(f"[cascade] {stage.name}: {path} " + " ".join(f"{d} {v:.3f}" for d, v in scores[str(path)].items()))
        picks = {}
        for d in spec.domains:
            best = max(unique, key=lambda p: scores[str(p)][d])  # first (earliest) wins a tie
            picks[d] = {"path": str(best), "score": scores[str(best)][d], "scores": {p: s[d] for p, s in scores.items()}}
            self.log(f"[cascade] {stage.name}: {d} -> {best} ({spec.metric} {picks[d]['score']:.3f})")
        return {"name": stage.name, "kind": "select", "metric": spec.metric, "picks": picks,
                "rows": f"{spec.offset}..{spec.offset + spec.samples - 1}", "wall_s": time.perf_counter() - began}

    def _compare_stage(self, stage: CascadeStage) -> dict[str, Any]:
        spec = stage.compare
        assert spec is not None
        began, n = time.perf_counter(), self.cfg.eval.samples
        cache: dict[tuple[str, int, int], float] = {}

        def accuracy(path: str | Path, offset: int, samples: int) -> float:
            key = (str(Path(path).resolve()), offset, samples)
            if key not in cache:
                cache[key] = self.evaluate(Path(path), [spec.domain], offset, samples, False)[spec.domain]["accuracy"]
            return cache[key]

        unit, points, parts = spec.cost, {}, {}
        for grid in spec.methods.values():
            for name in grid:
                done = self.state[name]
                config = yaml.safe_load((Path(done["dir"]) / "config.yaml").read_text())
                steps, rows = int(config["train"]["steps"]), read_metrics(done["dir"])
                try:
                    tokens = cumulative_tokens(rows, steps, name)
                    cost = stage_cost(config, done["init"], spec.domain) if unit == "flops" else None
                    flops = cumulative_flops(rows, steps, name, cost) if cost else None
                except (ValueError, KeyError, OSError) as exc:
                    raise StageFailed(f"stage {stage.name!r}: {exc}") from None
                points[name] = stage_checkpoints(done["dir"], done["init"], steps, tokens, flops)
                parts[name] = (cost, rows)
        # every method can spend the budget with at least one grid point (a collapsed run that stopped
        # producing tokens does not shrink everyone's budget; it is judged at its own final checkpoint)
        budget = float(spec.budget or min(max(points[g][-1].cost(unit) for g in grid) for grid in spec.methods.values()))
        self.log(f"[cascade] {stage.name}: {spec.domain} at a budget of {budget:.4g} {COSTS[unit]}")
        methods: dict[str, dict[str, Any]] = {}
        for method, grid in spec.methods.items():
            tried = {}
            for name in grid:
                point = at_budget(points[name], budget, unit)
                tried[name] = {"checkpoint": as_dict(point), "choice_accuracy": accuracy(point.path, spec.offset, spec.samples)}
                self.log(f"[cascade] {stage.name}: {method} grid point {name}: {point.cost(unit):.4g} {COSTS[unit]}, "
                         f"accuracy {tried[name]['choice_accuracy']:.3f} on rows {spec.offset}..{spec.offset + spec.samples - 1}")
            pick = max(grid, key=lambda g: tried[g]["choice_accuracy"])  # the first listed wins a tie
            curve = [[p.cost(unit), accuracy(p.path, 0, n)] for p in points[pick] if p.cost(unit) <= budget]
            reported = at_budget(points[pick], budget, unit)
            methods[method] = {"pick": pick, "grid": tried, "cost": reported.cost(unit), "tokens": reported.tokens,
                               "flops": reported.flops, "checkpoint": reported.path,
                               "accuracy": accuracy(reported.path, 0, n), "curve": curve,
                               "flops_by_part": flops_by_part(*parts[pick], reported.step)}
            self.log(f"[cascade] {stage.name}: {method} -> {pick}: accuracy {methods[method]['accuracy']:.3f} "
                     f"after {reported.cost(unit):.4g} {COSTS[unit]} ({reported.cost(unit) / budget:.1%} of the budget)"
                     + "".join(f"; {k} {v:.3g}" for k, v in methods[method]["flops_by_part"].items()))
        teacher = accuracy(spec.teacher, 0, n) if spec.teacher else None
        goals = comparison_goals(methods, spec.focus, spec.reach, spec.reach_fraction, teacher, spec.teacher_fraction,
                                 "FLOPs" if unit == "flops" else "tokens")
        common = common_reach(methods, spec.focus)
        for other, pair in common["pairs"].items():
            self.log(f"[cascade] {stage.name}: {spec.focus} and {other} both reach {pair['accuracy']:.3f}: {spec.focus} after "
                     f"{pair['focus_cost']:.4g} {COSTS[unit]}, {other} after {pair['cost']:.4g}"
                     + (f" ({pair['ratio']:.3g}x)" if pair["ratio"] is not None else " (no gain over the start: no ratio)"))
        for goal in goals:
            self.log(f"[cascade] {stage.name}: goal {goal['goal']}: {_verdict(goal['met'])} ({goal['measured']})")
        return {"name": stage.name, "kind": "compare", "spec": spec.model_dump(mode="json"), "domain": spec.domain,
                "unit": unit, "budget": budget, "methods": methods,
                "common": common, "teacher": str(spec.teacher) if spec.teacher else None, "teacher_accuracy": teacher,
                "goals": goals, "rows": f"0..{n - 1}", "choice_rows": f"{spec.offset}..{spec.offset + spec.samples - 1}",
                "wall_s": time.perf_counter() - began}

    def _specialists_stage(self, stage: CascadeStage) -> dict[str, Any]:
        spec = stage.specialists
        assert spec is not None
        evals = {name: self.state[name]["eval"] for name in spec.stages()}
        rows = specialist_rows(evals, spec.consolidated, spec.specialists, spec.sequential, spec.margin)
        for r in rows:  # what each run's training gave the domain: its teacher's samples and the KL to it
            r["training"] = {name: self._teacher_share(name, r["domain"]) for name in (r["specialist"], spec.consolidated)}
        for r in rows:
            self.log(f"[cascade] {stage.name}: {r['domain']}: specialist {r['specialist_accuracy']:.3f}, "
                     f"{spec.consolidated} {r['consolidated_accuracy']:.3f}"
                     + (f", sequential {r['sequential_accuracy']:.3f}" if spec.sequential else "")
                     + f" -> within {spec.margin:.2f}: {'met' if r['met'] else 'NOT met'}")
        goals = [{"goal": f"{spec.consolidated} within {spec.margin:.2f} of the {r['domain']} specialist", "met": r["met"],
                  "measured": f"{r['consolidated_accuracy']:.3f} vs {r['specialist_accuracy']:.3f} ({r['gap']:+.3f})"}
                 for r in rows]
        return {"name": stage.name, "kind": "specialists", "spec": spec.model_dump(mode="json"), "consolidated": spec.consolidated, "sequential": spec.sequential,
                "margin": spec.margin, "rows": rows, "goals": goals, "wall_s": 0.0}

    def _teacher_share(self, name: str, domain: str) -> dict[str, float] | None:
        done = self.state[name]
        config = yaml.safe_load((Path(done["dir"]) / "config.yaml").read_text())
        route = (config.get("teachers") or {}).get("routes", {}).get(domain) or []
        if len(route) != 1:  # not an OPD stage, or a domain scored by a mix of teachers
            return None
        return teacher_share(read_metrics(done["dir"]), route[0]["teacher"], int(config["train"]["steps"]))

    # -- the run -----------------------------------------------------------------------------------
    def run(self, through: str | None = None) -> dict[str, Any] | None:
        """Run (or keep) every stage in order; with ``through``, stop after that stage (a job of a
        Slurm chain: the stages before it were done by the jobs before) and write the results only
        when it is the last stage."""
        names = [s.name for s in self.cfg.stages]
        if through is not None and through not in names:
            raise ValueError(f"--through {through!r}: not a stage of this cascade (stages: {names})")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        began = time.perf_counter()
        start_inputs = self._inputs({"start": str(self.cfg.start)})
        if "start" in self.state:
            self._check_kept("start", start_inputs)
        else:
            self.state["start"] = {"eval": self._eval(self.cfg.start), "inputs": start_inputs}
            self._save_state()
        previous, kept = Path(self.cfg.start), []
        for stage in self.cfg.stages:
            spec = stage.compare or stage.specialists
            if spec and self.state.get(stage.name, {}).get("spec") != spec.model_dump(mode="json"):
                self.state.pop(stage.name, None)  # a measuring stage is re-measured when its spec changed
            init = self._init_for(stage, previous) if stage.trains else None
            stage_cfg, extra = self._stage_args(stage, init) if init is not None else (None, [])
            inputs = self._inputs(stage_cfg.model_dump(mode="json"), self.out / stage.name) if stage_cfg else None
            if stage.name in self.state:
                if inputs is not None:
                    self._check_kept(stage.name, inputs)
                self.log(f"[cascade] stage {stage.name}: done in an earlier run, kept")
                kept.append(stage.name)
            else:
                self.state[stage.name] = (self._select_stage(stage) if stage.select else
                                          self._compare_stage(stage) if stage.compare else
                                          self._specialists_stage(stage) if stage.specialists else
                                          self._train_stage(stage, init, stage_cfg, extra, inputs))
                self._save_state()
            if stage.trains:
                previous = Path(self.state[stage.name]["hf"])
            if stage.name == through and through != names[-1]:
                self.log(f"[cascade] stopped after stage {through} (--through); state {self.state_path}")
                return None
        stages = [self.state[s.name] for s in self.cfg.stages]
        results = {"name": self.cfg.run.name, "recipe": str(self.recipe_path), "eval_samples": self.cfg.eval.samples,
                   "start_eval": self.state["start"]["eval"], "stages": stages,
                   "rises": _rises(str(Path(self.cfg.start)), self.state["start"]["eval"], stages),
                   "expect_rises": self.cfg.expect_rises, "teacher_goal": self._teacher_goal(stages),
                   "wall_time_s": time.perf_counter() - began, "kept_from_earlier_run": kept}
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        report = write_cascade_report(self.out, results)
        if results["rises"] and self.cfg.expect_rises:
            finals = {st["name"]: {d: r["accuracy"] for d, r in st["eval"].items()} for st in stages if st.get("eval")}
            self.log("[cascade] " + rises_verdict(results["rises"], finals))
        if results["teacher_goal"]:
            self.log("[cascade] " + teacher_goal_verdict(results["teacher_goal"]))
        self.log(f"[cascade] results: {self.out / 'results.json'}; report: {report}")
        return results


    def _teacher_goal(self, stages: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The final student's greedy accuracy against each domain's teacher (measured once, kept)."""
        goal = self.cfg.expect_of_teachers
        final = next((s for s in reversed(stages) if s.get("eval") and "hf" in s), None)
        if goal is None or final is None:
            return None
        e = self.cfg.eval
        measured = self.state.setdefault("teachers", {})
        rows = []
        for domain, teacher in goal.teachers.items():
            if str(teacher) not in measured.get(domain, {}):
                measured.setdefault(domain, {})[str(teacher)] = self.evaluate(Path(teacher), [domain], 0, e.samples, False)[domain]["accuracy"]
                self._save_state()
            teacher_acc, student_acc = measured[domain][str(teacher)], final["eval"][domain]["accuracy"]
            share = student_acc / teacher_acc if teacher_acc else None  # a teacher at 0 sets no bar
            rows.append({"domain": domain, "teacher": str(teacher), "teacher_accuracy": teacher_acc,
                         "student_accuracy": student_acc, "share": share,
                         "met": share is None or share >= goal.fraction})
        return {"fraction": goal.fraction, "student": final["name"], "rows": rows, "met": all(r["met"] for r in rows)}


def _rises(start: str, start_eval: dict[str, Any], stages: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Greedy accuracy change of every domain at each training stage vs the checkpoint it started from
    (the start or an earlier stage's output; a stage started from a picked snapshot is left out)."""
    evals, out = {start: start_eval}, {}
    for s in stages:
        if s.get("eval") and "init" in s:  # a training stage
            before = evals.get(s["init"])
            if before is not None:
                out[s["name"]] = {d: s["eval"][d]["accuracy"] - before[d]["accuracy"] for d in s["eval"] if d in before}
            evals[s["hf"]] = s["eval"]
    return out


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "NOT met"
