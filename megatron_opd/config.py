"""Typed recipe configuration: YAML + dotted CLI overrides -> validated pydantic models.

Every user-facing default lives here, once. Unknown keys are errors (with a "did you mean").
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_opd.teachers.router import RoutingSpec


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Strict):
    hf_path: Path = Field(description="HF checkpoint directory (config, safetensors, tokenizer) to start from")
    dtype: Literal["float32", "bfloat16"] = "float32"
    vocab_divisible_by: int = Field(128, ge=1, description="pad the vocabulary to a multiple of this")


class ParallelConfig(Strict):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


class ChatDataConfig(Strict):
    train: str | list[str] = Field(description="jsonl/json/parquet file(s) (or hub id when online) with chat 'messages'")
    eval: str | None = Field(None, description="held-out file for eval loss")
    messages_field: str = "messages"
    max_length: int = Field(512, ge=2)
    overlong: Literal["truncate", "drop"] = "drop"
    eval_max_rows: int = Field(256, ge=1)


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"


class TrainConfig(Strict):
    steps: int = Field(ge=1)
    global_batch_size: int = Field(ge=1)
    micro_batch_size: int = Field(1, ge=1)
    seed: int = 1234
    save_interval: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept on disk")
    eval_interval: int = Field(0, ge=0, description="eval every N steps (0: only before and after)")
    log_interval: int = Field(1, ge=1)
    resume: bool = True
    hf_snapshots: bool = Field(False, description="also export an HF directory at every save (snapshots/step-N), "
                               "kept for a later stage to evaluate and pick from")


class RunConfig(Strict):
    name: str = "run"
    output_dir: Path = Path("outputs/run")


class ServerGroup(Strict):
    """SGLang servers on their own nodes of a Slurm job (rollout engines or one teacher)."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    servers_per_node: int = Field(1, ge=1, description="SGLang servers per node, each on gpus_per_node / servers_per_node GPUs")
    port: int = Field(30000, ge=1024, le=65535, description="first port; server i on a node listens on port + i")
    model: str | None = Field(None, description="checkpoint to serve (default: the student / the teacher's `model`)")
    extra_args: list[str] = Field(default_factory=list, description="more `sglang.launch_server` arguments")

    @model_validator(mode="after")
    def _split(self) -> "ServerGroup":
        if self.gpus_per_node % self.servers_per_node:
            raise ValueError(f"gpus_per_node ({self.gpus_per_node}) must be a multiple of servers_per_node ({self.servers_per_node})")
        return self


class TrainerGroup(Strict):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)


class SlurmConfig(Strict):
    """One heterogeneous Slurm job: trainer nodes (torchrun), rollout servers, teacher servers."""

    account: str | None = None
    partition: str | None = None
    time: str = "04:00:00"
    container_image: str | None = None
    container_mounts: list[str] = Field(default_factory=list)
    workdir: str = Field(".", description="this repository on the cluster (inside the container)")
    env: dict[str, str] = Field(default_factory=dict)
    job_dir: str = Field("slurm_jobs", description="where the sbatch script and logs go (on the submitting host)")
    trainer: TrainerGroup = TrainerGroup()
    rollout: ServerGroup | None = Field(None, description="rollout.engine 'servers': SGLang rollout servers")
    teachers: dict[str, ServerGroup] = Field(default_factory=dict, description="teacher name -> its SGLang servers")
    server_timeout_s: int = Field(1800, ge=1, description="how long the trainer waits for every server's /health")


class LaunchConfig(Strict):
    slurm: SlurmConfig | None = None


class StageBase(Strict):
    """What every training stage has: where it writes, the student, its layout and optimizer."""

    run: RunConfig = RunConfig()
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    optim: OptimConfig = OptimConfig()
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _placement(self) -> "StageBase":
        slurm = self.launch.slurm
        if slurm is not None:
            gpus = slurm.trainer.nodes * slurm.trainer.gpus_per_node
            if gpus != self.parallel.world_size:
                raise ValueError(f"launch.slurm.trainer: {slurm.trainer.nodes} nodes x {slurm.trainer.gpus_per_node} GPUs = {gpus} "
                                 f"processes, but parallel tp x pp x dp = {self.parallel.world_size}")
        return self


class SFTStageConfig(StageBase):
    kind: Literal["sft"]
    data: ChatDataConfig
    train: TrainConfig

    @model_validator(mode="after")
    def _batch_layout(self) -> "SFTStageConfig":
        per_step = self.train.micro_batch_size * self.parallel.dp
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x parallel.dp ({per_step})"
            )
        return self


class PromptDataConfig(Strict):
    train: list[str] = Field(min_length=1, description="jsonl/json/parquet files with chat 'messages' (+ 'domain' tags)")
    messages_field: str = "messages"
    domain_field: str = "domain"
    max_prompt_length: int = Field(256, ge=2)


class RolloutConfig(Strict):
    engine: Literal["embedded", "servers"] = Field("embedded", description="embedded: in-process on trainer rank 0; "
                                                   "servers: SGLang / `opd serve --role rollout` at `urls`")
    urls: list[str] = Field(default_factory=list)
    sync: Literal["in_process", "disk", "distributed"] = "in_process"
    n: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(64, ge=1, description="sequences per generation batch (embedded engine)")
    bucket_mb: int = Field(64, ge=1, description="weight-sync bucket size")

    @model_validator(mode="after")
    def _engine(self) -> "RolloutConfig":
        if self.engine == "embedded" and self.sync != "in_process":
            raise ValueError("rollout.engine 'embedded' lives in the trainer: use rollout.sync 'in_process'")
        if self.engine == "servers" and self.sync == "in_process":
            raise ValueError("rollout.engine 'servers' needs rollout.sync 'disk' or 'distributed'")
        return self


class LossConfig(Strict):
    kind: Literal["sampled_token", "topk_forward_kl", "topk_reverse_kl", "jsd"] = Field(
        "sampled_token", description="sampled_token: policy gradient on A_t = log p_T - log p_S; the others: "
        "differentiable divergences over the teacher's top-k (jsd: over the full vocabulary of the student vs top-k teacher)")
    top_k: int = Field(0, ge=0, description="teacher top-k to request (needed by top-k losses and confidence weights)")
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.2, ge=0)
    dual_clip: float | None = Field(None, gt=1)
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance sampling cap (None: off)")
    kl_discount: float = Field(0.0, ge=0, le=1)
    logratio_clamp: float | None = Field(20.0, gt=0)
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    epochs: int = Field(1, ge=1, description="optimizer steps on each rollout batch")
    normalize: Literal["token", "domain"] = Field(
        "token", description="token: every completion token of the step weighs the same; domain: each domain's tokens "
        "share an equal part of the loss (MOPD: short-answer domains are not drowned by long ones)")

    @model_validator(mode="after")
    def _topk(self) -> "LossConfig":
        if self.kind != "sampled_token" and self.top_k < 1:
            raise ValueError(f"loss.kind {self.kind!r} needs loss.top_k >= 1")
        return self


class RewardConfig(Strict):
    """Verifiable rewards (GRPO): each completion is checked by its domain's verifier."""

    kind: Literal["verifier"] = "verifier"
    normalize_std: bool = Field(True, description="GRPO: divide group-centred rewards by the group std")
    lambda_opd: float = Field(0.0, ge=0, description="with teachers too: A = A_task + lambda_opd * A_opd")
    format_weight: float = Field(0.0, ge=0, description="reward = correct + format_weight * format_score")


class GuardConfig(Strict):
    min_abs_advantage: float = Field(1e-4, ge=0, description="warn when mean |A| stays below this (teacher == student?)")
    patience: int = Field(3, ge=1)
    max_truncation_rate: float = Field(0.9, gt=0, le=1, description="stop when this share of samples hits max_new_tokens ...")
    stop_on_guard: bool = Field(False, description="... for `patience` steps (else warn)")


class OPDTrainConfig(Strict):
    steps: int = Field(ge=1)
    prompts_per_step: int = Field(ge=1)
    micro_batch_size: int = Field(4, ge=1)
    seed: int = 1234
    save_interval: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    eval_interval: int = Field(0, ge=0, description="eval every N steps (0: before and after only)")
    log_interval: int = Field(1, ge=1)
    resume: bool = True
    hf_snapshots: bool = Field(False, description="also export an HF directory at every save (snapshots/step-N)")


class EvalConfig(Strict):
    world_dir: Path | None = Field(None, description="tiny-world directory with data/<domain>/test.jsonl (None: no eval)")
    domains: list[str] = Field(default_factory=list)
    samples: int = Field(100, ge=1)
    max_new_tokens: int = Field(96, ge=1)


class OPDStageConfig(StageBase):
    """On-policy distillation (one teacher), MOPD (several, routed by domain tag), or GRPO
    (``kind: grpo``: verifier rewards, optionally plus a teacher's advantage)."""

    kind: Literal["opd", "grpo"]
    data: PromptDataConfig
    rollout: RolloutConfig = RolloutConfig()
    teachers: RoutingSpec | None = None
    reward: RewardConfig | None = None
    loss: LossConfig = LossConfig()
    guard: GuardConfig = GuardConfig()
    train: OPDTrainConfig
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _layout(self) -> "OPDStageConfig":
        samples = self.train.prompts_per_step * self.rollout.n
        per_step = self.train.micro_batch_size * self.parallel.dp
        if samples % per_step:
            raise ValueError(f"train.prompts_per_step x rollout.n ({samples}) must be a multiple of "
                             f"train.micro_batch_size x parallel.dp ({per_step})")
        if self.teachers is not None and self.teachers.weighting == "confidence" and self.loss.top_k < 1:
            raise ValueError("teachers.weighting 'confidence' needs loss.top_k >= 1")
        if self.kind == "opd" and self.teachers is None:
            raise ValueError("kind 'opd' needs `teachers`")
        if self.kind == "grpo" and self.reward is None:
            raise ValueError("kind 'grpo' needs `reward`")
        if self.kind == "grpo" and self.loss.kind != "sampled_token":
            raise ValueError("kind 'grpo' trains with loss.kind 'sampled_token' (a policy gradient)")
        if self.reward is not None and self.reward.lambda_opd > 0 and self.teachers is None:
            raise ValueError("reward.lambda_opd > 0 needs `teachers`")
        slurm = self.launch.slurm
        if self.rollout.engine == "servers" and not self.rollout.urls and (slurm is None or slurm.rollout is None):
            raise ValueError("rollout.engine 'servers' needs rollout.urls (or launch.slurm.rollout, whose servers fill them)")
        if slurm is not None:
            if slurm.rollout is not None and self.rollout.engine != "servers":
                raise ValueError("launch.slurm.rollout places SGLang rollout servers: set rollout.engine 'servers'")
            unknown = sorted(set(slurm.teachers) - set(self.teachers.teachers if self.teachers else {}))
            if unknown:
                raise ValueError(f"launch.slurm.teachers: {unknown} are not in teachers.teachers")
            for name in slurm.teachers:
                spec = self.teachers.teachers[name]  # type: ignore[union-attr]
                if spec.model is None and slurm.teachers[name].model is None:
                    raise ValueError(f"launch.slurm.teachers.{name}: no checkpoint to serve (give `model` here or in teachers)")
        return self


StageConfig = Union[SFTStageConfig, OPDStageConfig]


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
                refs.append(stage.init)
            if stage.init and stage.init.startswith("select:"):
                refs.append(stage.init[len("select:"):].split("/")[0])
            missing = [r for r in refs if r not in seen]
            if missing:
                raise ValueError(f"{where}: refers to {missing}, which are not earlier stages")
            seen[stage.name] = stage
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_errors(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            known = _known_fields(model, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
            lines.append(f"{where}: unknown key{extra}")
        else:
            got = err.get("input")
            lines.append(f"{where}: {err['msg']}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return "invalid recipe:\n  " + "\n  ".join(lines)


STAGE_KINDS: dict[str, type[BaseModel]] = {"sft": SFTStageConfig, "opd": OPDStageConfig, "grpo": OPDStageConfig}


def parse_stage(raw: dict[str, Any]) -> StageConfig:
    kind = raw.get("kind")
    if kind not in STAGE_KINDS:
        raise ConfigError(f"kind: expected one of {sorted(STAGE_KINDS) + ['cascade']}, got {kind!r}")
    model = STAGE_KINDS[kind]
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> StageConfig | CascadeConfig:
    """A stage recipe, or a cascade (``kind: cascade``) whose every stage recipe is validated too."""
    path = Path(path)
    raw = _read_yaml(path)
    if raw.get("kind") != "cascade":
        return parse_stage(apply_overrides(raw, list(overrides or [])))
    raw = apply_overrides(raw, _route_stage_overrides(raw, list(overrides or [])))
    try:
        cascade = CascadeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, CascadeConfig)) from None
    picks = {s.name: s.select.domains for s in cascade.stages if s.select}
    for i, stage in enumerate(cascade.stages):
        if stage.recipe is not None:
            # teachers picked at run time stand in as placeholders for validation
            placeholders = [f"teachers.teachers.{d}.model=<picked by {stage.teachers_from}>"
                            for d in picks.get(stage.teachers_from or "", [])]
            try:
                load_stage_recipe(path, stage, placeholders)
            except ConfigError as exc:
                raise ConfigError(f"stages.{i} ({stage.name}): {stage.recipe}: {exc}") from None
    return cascade


def _route_stage_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Cascade overrides: ``<stage>.key=value`` goes to that stage's recipe, ``stages.key=value`` to
    every training stage's; the rest apply to the cascade itself."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    names = {s.get("name"): s for s in stages if isinstance(s, dict)}
    rest = []
    for item in overrides:
        head, _, tail = item.partition(".")
        if head in names and tail:
            names[head].setdefault("overrides", []).append(tail)
        elif head == "stages" and tail and "=" in tail and not tail.split("=", 1)[0].isdigit():
            for stage in names.values():
                if stage.get("recipe") is not None:
                    stage.setdefault("overrides", []).append(tail)
        else:
            rest.append(item)
    return rest


def stage_recipe_path(cascade_path: str | Path, stage: CascadeStage) -> Path:
    return (Path(cascade_path).parent / stage.recipe).resolve() if stage.recipe else Path()


def load_stage_recipe(cascade_path: str | Path, stage: CascadeStage, extra: list[str] | None = None) -> StageConfig:
    """A cascade stage's recipe with its overrides (and the runner's ``extra`` ones) applied."""
    raw = apply_overrides(_read_yaml(stage_recipe_path(cascade_path, stage)), [*stage.overrides, *(extra or [])])
    return parse_stage(raw)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
