"""Cascade recipes: stage recipes chained, plus ``select`` stages that pick checkpoints by measured eval."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from megatron_opd.config.base import Strict
from megatron_opd.config.placement import LaunchConfig
from megatron_opd.config.stages import EvalConfig, RunConfig


class SelectSpec(Strict):
    """Pick, per domain, the strongest checkpoint among earlier stages' outputs and snapshots, by a
    held-out eval on rows disjoint from the reported ones (Cascade-RL teacher choice, recovery)."""

    candidates: list[str] = Field(min_length=1, description="earlier stages whose final and snapshot checkpoints compete")
    domains: list[str] = Field(min_length=1, description="the domains to pick a checkpoint for, one pick each")
    metric: Literal["accuracy", "format_score"] = Field(
        "accuracy", description="what the pick maximises on the selection rows: greedy accuracy or format score")
    include_inputs: bool = Field(True, description="the candidates' starting checkpoints compete too")
    offset: int = Field(100, ge=0, description="selection rows: test[offset : offset + samples]")
    samples: int = Field(100, ge=1, description="selection rows per domain (from offset)")


class CompareSpec(Strict):
    """Methods side by side on one domain at an equal compute budget (the results table: continued SFT vs
    OPD vs GRPO from one SFT checkpoint). Every method lists its grid points (earlier training stages
    from the same init); the grid point is picked on held-out rows ``offset..offset+samples-1`` and
    reported on the cascade's eval rows, with an accuracy-vs-compute curve from its HF snapshots
    (training stages need ``train.hf_snapshots`` and ``log_interval=1``)."""

    domain: str = Field(description="the domain the methods are compared on")
    methods: dict[str, list[str]] = Field(min_length=2, description="method -> its grid: earlier training stages")
    focus: str = Field("opd", description="the method whose goals are checked against the others")
    reach: str | None = Field("grpo", description="compute for `focus` to reach this method's accuracy at the budget")
    reach_fraction: float = Field(1 / 9, gt=0, le=1, description="goal: focus needs <= this share of reach's compute")
    teacher: Path | None = Field(None, description="HF dir of the focus method's teacher (goal: >= teacher_fraction of it)")
    teacher_fraction: float = Field(0.9, gt=0, le=1, description="goal (with `teacher`): focus reaches >= this "
                                    "share of the teacher's accuracy")
    cost: Literal["flops", "tokens"] = Field("flops", description="what the budget and the curves count: FLOPs "
                                             "(student training, sampling, teacher scoring and the SFT data's teacher "
                                             "sampling; pipeline/compare.py) or trained response tokens")
    budget: float | None = Field(None, gt=0, description="in `cost`'s unit; None: the largest total any grid point of "
                                 "the method that spent least reached")
    offset: int = Field(100, ge=0, description="grid-choice rows: test[offset : offset + samples]")
    samples: int = Field(100, ge=1, description="grid-choice rows (from offset)")

    @model_validator(mode="after")
    def _names(self) -> "CompareSpec":
        for key, value in (("focus", self.focus), ("reach", self.reach)):
            if value is not None and value not in self.methods:
                raise ValueError(f"{key}: {value!r} is not one of methods {sorted(self.methods)}")
        if self.reach == self.focus:
            raise ValueError(f"reach: {self.reach!r} is the focus method; name another method or null")
        bad = [m for m in self.methods if not m.replace("_", "").replace("-", "").isalnum()]
        empty = [m for m, grid in self.methods.items() if not grid]
        if bad or empty:
            raise ValueError(f"methods: {bad or empty} " + ("are not plain names (letters, digits, _ or -)" if bad else "list no stages"))
        listed = [name for grid in self.methods.values() for name in grid]
        twice = sorted({n for n in listed if listed.count(n) > 1})
        if twice:
            raise ValueError(f"methods: {twice} listed more than once")
        return self

    def stages(self) -> list[str]:
        return [name for grid in self.methods.values() for name in grid]


class SpecialistsSpec(Strict):
    """A consolidated multi-domain student (MOPD) against each domain's single-domain specialist, with
    sequential single-domain OPD beside it (the see-saw), from the stages' own evaluations."""

    consolidated: str = Field(description="the multi-domain stage (MOPD)")
    specialists: dict[str, str] = Field(min_length=1, description="domain -> its specialist stage")
    sequential: str | None = Field(None, description="the last stage of a chain of single-domain stages")
    margin: float = Field(0.02, ge=0, description="goal: consolidated >= specialist - margin on each domain")

    def stages(self) -> list[str]:
        return [self.consolidated, *self.specialists.values(), *([self.sequential] if self.sequential else [])]


class CascadeStage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="the stage's name (unique; not 'start'): its run "
                      "directory under run.output_dir, and how later stages and `<name>.key=value` overrides "
                      "refer to it")
    recipe: Path | None = Field(None, description="stage recipe (sft/opd/grpo), relative to the cascade file")
    overrides: list[str] = Field(default_factory=list, description="dotted key=value overrides of the stage "
                                 "recipe (training stages only)")
    init: str | None = Field(None, description="student: None = the previous training stage's output; "
                             "a stage name = its output; 'start' = the cascade's start; 'select:<stage>/<domain>' = a pick; "
                             "else an HF directory")
    teachers_from: str | None = Field(None, description="a select stage: its picks become teachers.teachers.<domain>.model")
    select: SelectSpec | None = Field(None, description="a select stage: picks a checkpoint per domain by held-out "
                                      "eval")
    compare: CompareSpec | None = Field(None, description="a compare stage: methods side by side at an equal token "
                                        "budget")
    specialists: SpecialistsSpec | None = Field(None, description="a specialists stage: a multi-domain student "
                                                "against single-domain specialists")

    @model_validator(mode="after")
    def _one_kind(self) -> "CascadeStage":
        if sum(x is not None for x in (self.recipe, self.select, self.compare, self.specialists)) != 1:
            raise ValueError(f"stage {self.name!r}: give exactly one of `recipe`, `select`, `compare` or `specialists`")
        unused = [k for k in ("init", "teachers_from") if getattr(self, k) is not None] + (["overrides"] if self.overrides else [])
        if not self.trains and unused:
            raise ValueError(f"stage {self.name!r}: {unused} only apply to training stages (`recipe`)")
        return self

    @property
    def trains(self) -> bool:
        return self.recipe is not None

    @property
    def measured(self) -> list[str]:
        """The earlier training stages a select/compare/specialists stage reads."""
        spec = self.select or self.compare or self.specialists
        return (spec.candidates if isinstance(spec, SelectSpec) else spec.stages()) if spec else []


class TeacherGoal(Strict):
    """The goal that the cascade's final student reaches ``fraction`` of each domain's teacher in
    held-out greedy accuracy (each teacher measured on its own domain, on the reported rows)."""

    fraction: float = Field(0.9, gt=0, le=1, description="goal: the final student's accuracy >= this share of "
                            "each teacher's")
    teachers: dict[str, Path] = Field(min_length=1, description="domain -> the HF teacher it is held to")


class CascadeConfig(Strict):
    """A chain of stages run in order, each starting from the previous one's output (SFT -> OPD ->
    MOPD; GRPO per domain -> pick teachers -> MOPD; mid-train -> regression -> recovery OPD)."""

    kind: Literal["cascade"] = Field(description="cascade: a chain of stages (a stage recipe's kind is sft, opd "
                                     "or grpo)")
    run: RunConfig = Field(RunConfig(), description="the cascade's name and run directory (its state, results and "
                           "one subdirectory per stage)")
    start: Path = Field(description="HF directory of the first student")
    eval: EvalConfig = Field(description="the held-out eval of the start and of every training stage's output "
                             "(world_dir required)")
    stages: list[CascadeStage] = Field(min_length=1, description="the stages, run in order")
    seed: int | None = Field(None, description="every training stage's train.seed (the whole cascade repeated at "
                             "another seed: `seed=2 run.output_dir=...`); None: each stage recipe's own")
    expect_rises: bool = Field(False, description="goal: every domain's greedy accuracy rises at every training "
                               "stage; the run prints and reports whether it did (leave off for cascades with a "
                               "stage built to fall, such as recovery's regression, or side-by-side comparisons)")
    expect_of_teachers: TeacherGoal | None = Field(None, description="goal: the final student reaches a share of each "
                                                   "domain's teacher; the run prints and reports met / missed")
    launch: LaunchConfig = Field(LaunchConfig(), description="launch.slurm: each stage's job in the chain that "
                                 "`opd launch --executor slurm` submits (one allocation per stage)")

    @model_validator(mode="after")
    def _chain(self) -> "CascadeConfig":
        slurm = self.launch.slurm
        if slurm is not None:
            if slurm.rollout is not None or slurm.teachers:
                raise ValueError("launch.slurm.rollout / launch.slurm.teachers: a cascade on Slurm is a chain of one "
                                 "job per stage, each stage starting its own servers inside its allocation; "
                                 "server groups are placed by a stage recipe launched on its own")
            if slurm.trainer.nodes != 1:
                raise ValueError(f"launch.slurm.trainer.nodes: {slurm.trainer.nodes}; a cascade stage's job runs on one "
                                 "node (launch a multi-node stage recipe on its own with `opd launch`)")
        return self

    @model_validator(mode="after")
    def _references(self) -> "CascadeConfig":
        if self.eval.world_dir is None:
            raise ValueError("eval.world_dir: a cascade evaluates every stage; give the world directory")
        seen: dict[str, CascadeStage] = {}
        for i, stage in enumerate(self.stages):
            where = f"stages.{i} ({stage.name})"
            if stage.name in seen or stage.name == "start":
                raise ValueError(f"{where}: duplicate or reserved stage name")
            refs = list(stage.measured)
            not_training = [n for n in refs if n in seen and not seen[n].trains]
            if not_training:
                what = "select candidates" if stage.select else "compare methods" if stage.compare else "specialists"
                raise ValueError(f"{where}: {what} list {not_training}, which are not training stages")
            rows = stage.select or stage.compare
            if rows and rows.offset < self.eval.samples:  # the choice must not see the reported rows
                raise ValueError(f"{where}: offset {rows.offset} overlaps the reported rows 0..{self.eval.samples - 1} "
                                 f"(eval.samples); choose on rows from {self.eval.samples} on")
            if stage.specialists and self.eval.domains:
                unevaluated = [d for d in stage.specialists.specialists if d not in self.eval.domains]
                if unevaluated:
                    raise ValueError(f"{where}: specialists for {unevaluated}, which eval.domains does not evaluate")
            if stage.teachers_from:
                refs.append(stage.teachers_from)
                if stage.teachers_from in seen and seen[stage.teachers_from].select is None:
                    raise ValueError(f"{where}: teachers_from {stage.teachers_from!r} is not a select stage")
            if stage.init and stage.init.startswith("select:"):
                target = stage.init[len("select:"):].split("/")[0]
                if target in seen and seen[target].select is None:
                    raise ValueError(f"{where}: init {stage.init!r}: {target!r} is not a select stage")
                refs.append(target)
            elif stage.init and "/" not in stage.init and stage.init in seen:
                if seen[stage.init].select is not None:
                    raise ValueError(f"{where}: init {stage.init!r} is a select stage; "
                                     f"use 'select:{stage.init}/<domain>' to start from one of its picks")
                if not seen[stage.init].trains:
                    raise ValueError(f"{where}: init {stage.init!r} is a comparison stage, which makes no checkpoint")
                refs.append(stage.init)
            missing = [r for r in refs if r not in seen]
            if missing:
                raise ValueError(f"{where}: refers to {missing}, which are not earlier stages")
            seen[stage.name] = stage
        return self
