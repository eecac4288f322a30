"""What a cascade stage was made from, so a re-run keeps a finished stage only when nothing changed.

A stage's inputs are its resolved config (flattened to dotted keys) and the size and modification
time of every file under each existing path that config names (data files, the init checkpoint,
teachers, the evaluation world), as ``make`` judges staleness. Rebuilding the world or changing a
learning rate therefore stops a re-run instead of silently reporting the old stage's numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [x, y]}`` -> ``{"a.b": 1, "c.0": x, "c.1": y}``."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def stage_inputs(config: dict[str, Any], skip: Path | None = None) -> dict[str, Any]:
    """The config (dotted keys) and ``{file: [size, mtime_ns]}`` for every file it names, except
    those under ``skip`` (the stage's own directory, which the stage itself writes)."""
    flat = flatten(config)
    skip = skip.resolve() if skip is not None else None
    files: dict[str, list[int]] = {}
    for value in flat.values():
        if not isinstance(value, str) or not value or len(value) > 4096:
            continue
        root = Path(value)
        if not root.exists() or Path.cwd().resolve().is_relative_to(root.resolve()):
            continue  # not a path, or the working directory itself (".")
        for f in _files(root):
            resolved = f.resolve()
            if skip is not None and resolved.is_relative_to(skip):
                continue
            stat = resolved.stat()
            files[str(resolved)] = [stat.st_size, stat.st_mtime_ns]
    return {"config": flat, "files": files}


def input_changes(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What differs between two ``stage_inputs`` records, in words (empty: nothing changed)."""
    if before is None:
        return ["no record of its inputs (written by an older version)"]
    out = []
    old_cfg, new_cfg = before["config"], now["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key, "<unset>") != new_cfg.get(key, "<unset>"):
            out.append(f"config {key}: {old_cfg.get(key, '<unset>')!r} -> {new_cfg.get(key, '<unset>')!r}")
    old_files, new_files = before["files"], now["files"]
    for path in sorted(set(old_files) | set(new_files)):
        if path not in new_files:
            out.append(f"file {path}: gone")
        elif path not in old_files:
            out.append(f"file {path}: new")
        elif old_files[path] != new_files[path]:
            out.append(f"file {path}: changed")
    return out
