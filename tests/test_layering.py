"""Imports run one way (README, Architecture: the data flow): every package is a layer in one ordered list and
may import only the layers before it; megatron-core (and mbridge, its bridge) only in the layers
that drive the student."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_opd"
# lowest first: records (the shared dataclasses), then data -> rollout -> teachers -> algo -> train ->
# pipeline, with the pieces they stand on (platform, wire: the SGLang wire, config, model) below them
LAYERS = ["records", "platform", "wire", "config", "data", "model", "rollout", "serve", "teachers", "algo", "eval", "train",
          "pipeline", "launch", "bench", "cli"]
MEGATRON_LAYERS = {"model", "platform", "train"}


def _layer(path: Path) -> str:
    top = path.relative_to(PKG).parts[0]
    return top[:-3] if top.endswith(".py") else top


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _modules() -> list[Path]:
    return [f for f in PKG.rglob("*.py") if f.relative_to(PKG).parts != ("__init__.py",)]


def test_every_package_is_a_layer():
    assert sorted({_layer(f) for f in _modules()}) == sorted(LAYERS)


def test_no_upward_imports():
    violations = []
    for f in _modules():
        rank = LAYERS.index(_layer(f))
        for name in _imports(f):
            if name.startswith("megatron_opd."):
                target = name.split(".")[1]
                if LAYERS.index(target) > rank:
                    violations.append(f"{f.relative_to(PKG)} imports {name} (layer {target!r} is above {_layer(f)!r})")
    assert not violations, violations


def test_megatron_core_only_where_the_student_is_driven():
    stray = [f"{f.relative_to(PKG)}: {name}" for f in _modules() for name in _imports(f)
             if name.split(".")[0] in ("megatron", "mbridge") and _layer(f) not in MEGATRON_LAYERS]
    assert not stray, stray
