"""YAML + dotted overrides -> validated models; errors name the field (with a "did you mean")."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from megatron_opd.config.base import ConfigError
from megatron_opd.config.cascade import CascadeConfig, CascadeStage
from megatron_opd.config.stages import OPDStageConfig, SFTStageConfig, StageConfig


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
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not YAML ({problem}); quote a string that holds "
                              f"braces or colons: {key}='\"...\"'") from None
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
    compared = {name: s.name for s in cascade.stages if s.compare for name in s.compare.stages()}
    for i, stage in enumerate(cascade.stages):
        if stage.recipe is not None:
            # teachers picked at run time stand in as placeholders for validation
            placeholders = [f"teachers.teachers.{d}.model=<picked by {stage.teachers_from}>"
                            for d in picks.get(stage.teachers_from or "", [])]
            try:
                stage_cfg = load_stage_recipe(path, stage, placeholders)
            except ConfigError as exc:
                raise ConfigError(f"stages.{i} ({stage.name}): {stage.recipe}: {exc}") from None
            t = stage_cfg.train
            if stage.name in compared and (t.log_interval != 1 or not t.hf_snapshots or not t.save_interval):
                # the comparison needs every step's token count and checkpoints along the way
                raise ConfigError(f"stages.{i} ({stage.name}): compared by {compared[stage.name]!r}, so it needs "
                                  f"train.log_interval=1, train.hf_snapshots=true and train.save_interval > 0 (has "
                                  f"{t.log_interval}, {str(t.hf_snapshots).lower()}, {t.save_interval})")
    return cascade


def _route_stage_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Cascade overrides: ``<stage>.key=value`` goes to that stage's recipe (or, for a select/compare
    stage, to its own spec), ``stages.key=value`` to every training stage's; the rest apply to the
    cascade itself."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    names = {s.get("name"): s for s in stages if isinstance(s, dict)}
    rest = []
    for item in overrides:
        head, _, tail = item.partition(".")
        if head in names and tail and names[head].get("recipe") is None:
            apply_overrides(names[head], [tail])  # a measuring stage: the override edits its own spec
        elif head in names and tail:
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
