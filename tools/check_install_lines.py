"""Every ``pip install ...`` line the README and docs give resolves: each is run as
``pip install --dry-run --ignore-installed`` from the repository root (nothing is installed).

    python tools/check_install_lines.py [--installed LINE ...] [FILE.md ...]   (default: README.md, docs/**/*.md)

``--installed LINE``: a line the caller has just run for real (CI's own install): reported, not dry-run again.

Prints one line per install line with its result; exits 1 if any fails to resolve, showing pip's error."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install_lines(text: str) -> list[str]:
    """The ``pip install`` commands of a Markdown text: from ``pip install`` to the end of the command
    (a comment, ``&&``, ``;`` or the end of the line)."""
    found = []
    for line in text.splitlines():
        starts = [m.end() for m in re.finditer(r"\bpip install\b", line)]
        for start, end in zip(starts, starts[1:] + [len(line)]):
            rest = re.split(r"\s+#|&&|;|`", line[start:end])[0].strip()
            found.append(f"pip install {rest}")
    return found


def dry_run(line: str) -> subprocess.CompletedProcess:
    args = shlex.split(line)[2:]
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", *args],
                          capture_output=True, text=True, cwd=REPO)


def main() -> None:
    args, installed = sys.argv[1:], set()
    while "--installed" in args:
        at = args.index("--installed")
        installed.add(args[at + 1].strip())
        del args[at:at + 2]
    files = [Path(a) for a in args] or [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    lines = [(f, line) for f in files for line in install_lines(f.read_text())]
    checked: set[str] = set()
    if not lines:
        raise SystemExit(f"no `pip install` line in {[str(f) for f in files]}")
    failed = 0
    for file, line in lines:
        if line in installed:
            print(f"installed for real by the caller: {line}   [{file.relative_to(REPO)}]")
            continue
        if line in checked:
            print(f"resolves (checked above): {line}   [{file.relative_to(REPO)}]")
            continue
        checked.add(line)
        began = time.perf_counter()
        done = dry_run(line)
        ok = done.returncode == 0
        failed += not ok
        print(f"{'resolves' if ok else 'FAILS'} ({time.perf_counter() - began:.0f} s): {line}   [{file.relative_to(REPO)}]")
        if not ok:
            print("\n".join(ln for ln in done.stderr.splitlines() if "WARNING" not in ln)[-3000:])
    if failed:
        raise SystemExit(f"{failed} of {len(lines)} install lines do not resolve")


if __name__ == "__main__":
    main()
