"""Every package of this environment, at its installed version, installable on CPython 3.12 from a
wheel (no interpreter 3.12 needed): ``pip install --dry-run --no-deps --only-binary=:all:
--python-version 3.12`` over ``pip freeze``, then each chosen wheel classified by its tags.

    python tools/check_py312_wheels.py [--python-version 3.12] [--report FILE]

Exits 1 naming the first package pip finds no 3.12 wheel for. A local version label (``+cpu``) is
dropped: PyTorch's CPU builds live on download.pytorch.org, the same version's PyPI wheel stands in.
The project itself (editable) is not checked: it is pure Python (``py3-none-any``, see the wheel CI builds)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]


def frozen_requirements() -> list[str]:
    """``name==version`` of every installed distribution but editable ones, local labels dropped."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split("+")[0] for line in out.splitlines() if "==" in line and not line.startswith("#")]


def wheel_kind(filename: str, python_version: str) -> str:
    """'pure' (py3-none-any), 'cpXY' (built for that interpreter), 'abi3' (stable ABI) or 'any-python' (a
    binary with no Python ABI, e.g. ruff), from a wheel's file name; 'sdist' for anything else."""
    if not filename.endswith(".whl"):
        return "sdist"
    python_tag, abi_tag, platform_tag = filename[:-4].split("-")[-3:]
    cp = "cp" + python_version.replace(".", "")
    if platform_tag == "any":
        return "pure"
    if abi_tag == "abi3":
        return "abi3"
    if cp in python_tag.split(".") and abi_tag.startswith(cp):
        return cp
    return "any-python" if abi_tag == "none" else f"other ({python_tag}-{abi_tag})"


def check(requirements: list[str], python_version: str, report_path: Path) -> dict[str, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(requirements) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
               "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
               *[arg for p in PLATFORMS for arg in ("--platform", p)], "--report", str(report_path), "-r", str(reqs)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if "ERROR" in ln] or done.stderr.splitlines()[-5:]
        raise SystemExit(f"no CPython {python_version} wheel for a pinned package:\n" + "\n".join(lines))
    kinds: dict[str, list[str]] = {}
    for item in json.loads(report_path.read_text())["install"]:
        name = f"{item['metadata']['name']}=={item['metadata']['version']}"
        kinds.setdefault(wheel_kind(item["download_info"]["url"].rsplit("/", 1)[-1], python_version), []).append(name)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--report", type=Path, default=None, help="keep pip's JSON report here")
    args = parser.parse_args()
    requirements = frozen_requirements()
    with tempfile.TemporaryDirectory() as tmp:
        kinds = check(requirements, args.python_version, args.report or Path(tmp) / "report.json")
    bad = {k: v for k, v in kinds.items() if k == "sdist" or k.startswith("other")}
    for kind, names in sorted(kinds.items()):
        print(f"{kind}: {len(names)}" + (f" ({', '.join(sorted(names))})" if kind not in ("pure",) and len(names) < 12 else ""))
    if bad:
        raise SystemExit(f"not installable from a CPython {args.python_version} wheel: {bad}")
    print(f"python {args.python_version} wheels: {sum(map(len, kinds.values()))} of {len(requirements)} packages")


if __name__ == "__main__":
    main()
