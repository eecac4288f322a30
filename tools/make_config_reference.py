"""Write the recipe configuration reference (docs/configuration.md) from the pydantic models themselves.

    python tools/make_config_reference.py            # (re)write docs/configuration.md
    python tools/make_config_reference.py --check    # exit 1 if the committed file is stale, or a field has no description

One section per recipe kind (``sft``, ``opd`` / ``grpo``, ``cascade``): every field by its dotted key, with its type,
default, constraints and description. tests/test_tools.py runs ``--check``.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "configuration.md"
sys.path.insert(0, str(REPO))

from megatron_opd.config import CascadeConfig, OPDStageConfig, SFTStageConfig  # noqa: E402

KINDS = [("sft", "SFT stage (`kind: sft`)", SFTStageConfig),
         ("opd", "OPD / MOPD / GRPO stage (`kind: opd` or `kind: grpo`)", OPDStageConfig),
         ("cascade", "Cascade (`kind: cascade`)", CascadeConfig)]


def _models(annotation) -> list[type[BaseModel]]:
    """The recipe models a field's type holds (itself, or inside Optional / list / dict / Union / Annotated)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _type(annotation) -> str:
    """A field's type as a reader writes it: ``list[RouteTarget]`` (Annotated constraints and module paths dropped)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value!r}`" if value not in (None, "") else ("`None`" if value is None else "`''`")


def _constraints(field) -> str:
    shown = []
    for item in field.metadata:
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None:
                shown.append(f"{ {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}.get(name, name + ' ')}{value}")
    return ", ".join(shown)


def _md(text: str) -> str:
    """Table-cell safe: pipes escaped, and ``<`` / ``>`` outside code spans as entities (else HTML tags)."""
    parts = text.replace("\n", " ").replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def _container_suffix(annotation) -> str:
    """How a key continues into a nested section: ``.<name>`` for a mapping, ``[]`` for a list (nested as typed)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _container_suffix(args[0])
    if origin in (typing.Union, types.UnionType):
        return next((suffix for suffix in map(_container_suffix, args) if suffix), "")
    if origin is dict:
        return ".<name>" + _container_suffix(args[1])
    if origin is list:
        return "[]" + _container_suffix(args[0])
    return ""


def rows(model: type[BaseModel], prefix: str = "", seen: tuple = ()) -> list[tuple[str, str, str, str, str]]:
    """(dotted key, type, default, constraints, description) of every field, depth first."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append((key, _md(_type(field.annotation)), _default(field), _constraints(field), _md(field.description or "")))
        for sub in _models(field.annotation):
            if sub not in seen:
                out += rows(sub, f"{key}{_container_suffix(field.annotation)}.", seen + (model,))
    return out


def undescribed() -> list[str]:
    return sorted({key for _, _, model in KINDS for key, _, _, _, text in rows(model) if not text})


def render() -> str:
    lines = ["# Configuration reference", "",
             "Every field of every recipe model, generated from the pydantic models by `tools/make_config_reference.py`",
             "(a test fails when this file is stale). Keys are dotted as the command line takes them",
             "(`opd run RECIPE key.sub=value`); `[]` marks a list of sections, `<name>` a mapping of them.", ""]
    for kind, title, model in KINDS:
        lines += [f"## {title}", "", "| key | type | default | constraints | description |", "|---|---|---|---|---|"]
        lines += [f"| `{key}` | {kind_} | {default} | {constraints} | {text} |"
                  for key, kind_, default, constraints, text in rows(model)]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/configuration.md is stale or a field lacks a description")
    args = parser.parse_args()
    missing = undescribed()
    if missing:
        print(f"fields without a description: {missing}")
        return 1
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is stale: run python tools/make_config_reference.py")
            return 1
        print(f"{OUT.relative_to(REPO)} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
