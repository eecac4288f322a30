"""Imports run one way: lower layers never import higher ones (DESIGN.md's data flow)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_opd"
# layer -> packages it must never import
FORBIDDEN = {
    "platform": {"config", "data", "model", "train", "cli", "pipeline", "launch"},
    "data": {"model", "train", "cli", "platform", "pipeline", "launch"},
    "model": {"train", "cli", "data", "config", "pipeline", "launch"},
    "rollout": {"model", "train", "eval", "cli", "pipeline", "launch"},
    "serve": {"model", "train", "eval", "cli", "teachers", "pipeline", "launch"},
    "teachers": {"model", "train", "eval", "cli", "algo", "pipeline", "launch"},
    "algo": {"platform", "config", "data", "model", "rollout", "teachers", "serve", "train", "eval", "cli", "pipeline", "launch"},
    "eval": {"train", "cli", "pipeline", "launch"},
    "train": {"cli", "eval", "pipeline", "launch"},
    "config": {"model", "train", "cli", "platform", "data", "rollout", "serve", "teachers", "algo", "eval", "pipeline", "launch"},
    "pipeline": {"cli", "launch"},
    "launch": {"cli", "train", "pipeline", "model"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("megatron_opd.")}


def test_no_upward_imports():
    violations = []
    for layer, forbidden in FORBIDDEN.items():
        files = [PKG / f"{layer}.py"] if (PKG / f"{layer}.py").exists() else list((PKG / layer).rglob("*.py"))
        assert files, layer
        for f in files:
            bad = _imports(f) & forbidden
            if bad:
                violations.append(f"{f.relative_to(PKG)} imports {sorted(bad)}")
    assert not violations, violations
