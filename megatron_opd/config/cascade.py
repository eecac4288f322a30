"""Cascade recipes: stage recipes chained, plus ``select`` stages that pick checkpoints by measured eval."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from megatron_opd.config.base import Strict
from megatron_opd.config.stages import EvalConfig, RunConfig


class SelectSpec(Strict):
    """Pick, per domain, the strongest checkpoint among earlier stages' outputs and snapshots, by a
    held-out eval on rows disjoint from the reported ones (Cascade-RL teacher choice, recovery)."""

    candidates: list[str] = Field(min_length=1, description="earlier stages whose final and snapshot checkpoints compete")
    domains: list[str] = Field(min_length=1)
    metric: Literal["accuracy", "format_score"] = "accuracy"
    include_inputs: bool = Field(True, description="the candidates' starting checkpoints compete too")
    offset: int = Field(100, ge=0, description="selection rows: test[offset : offset + samples]")
    samples: int = Field(100, ge=1)


class CascadeStage(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    recipe: Path | None = Field(None, description="stage recipe (sft/opd/grpo), relative to the cascade file")
    overrides: list[str] = Field(default_factory=list)
    init: str | None = Field(None, description="student: None = the previous training stage's output; "
                             "a stage name = its output; 'select:<stage>/<domain>' = a pick; else an HF directory")
    teachers_from: str | None = Field(None, description="a select stage: its picks become teachers.teachers.<domain>.model")
    select: SelectSpec | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "CascadeStage":
        if (self.recipe is None) == (self.select is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of `recipe` or `select`")
        return self


class CascadeConfig(Strict):
    """A chain of stages run in order, each starting from the previous one's output (SFT -> OPD ->
    MOPD; GRPO per domain -> pick teachers -> MOPD; mid-train -> regression -> recovery OPD)."""

    kind: Literal["cascade"]
    run: RunConfig = RunConfig()
    start: Path = Field(description="HF directory of the first student")
    eval: EvalConfig
    stages: list[CascadeStage] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> "CascadeConfig":
        if self.eval.world_dir is None:
            raise ValueError("eval.world_dir: a cascade evaluates every stage; give the world directory")
        seen: dict[str, CascadeStage] = {}
        for i, stage in enumerate(self.stages):
            where = f"stages.{i} ({stage.name})"
            if stage.name in seen or stage.name == "start":
                raise ValueError(f"{where}: duplicate or reserved stage name")
            refs = list(stage.select.candidates) if stage.select else []
            if stage.teachers_from:
                refs.append(stage.teachers_from)
                if stage.teachers_from in seen and seen[stage.teachers_from].select is None:
                    raise ValueError(f"{where}: teachers_from {stage.teachers_from!r} is not a select stage")
            if stage.init and "/" not in stage.init and not stage.init.startswith("select:") and stage.init in seen:
                if seen[stage.init].select is not None:
                    raise ValueError(f"{where}: init {stage.init!r} is a select stage; "
                                     f"use 'select:{stage.init}/<domain>' to start from one of its picks")
                refs.append(stage.init)
            if stage.init and stage.init.startswith("select:"):
                refs.append(stage.init[len("select:"):].split("/")[0])
            missing = [r for r in refs if r not in seen]
            if missing:
                raise ValueError(f"{where}: refers to {missing}, which are not earlier stages")
            seen[stage.name] = stage
        return self
