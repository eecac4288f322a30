"""Imports run one way: lower layers never import higher ones (DESIGN.md's data flow)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_opd"
# layer -> packages it must never import
FORBIDDEN = {
    "platform": {"config", "data", "model", "train", "cli"},
    "data": {"model", "train", "cli", "platform"},
    "model": {"train", "cli", "data", "config"},
    "rollout": {"model", "train", "eval", "cli"},
    "serve": {"model", "train", "eval", "cli", "teachers"},
    "teachers": {"model", "train", "eval", "cli", "algo"},
    "algo": {"platform", "config", "data", "model", "rollout", "teachers", "serve", "train", "eval", "cli"},
    "eval": {"train", "cli"},
    "train": {"cli", "eval"},
    "config": {"model", "train", "cli", "platform", "data"},
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
