#!/usr/bin/env bash
# gpu_check.sh: the GPU path of megatron-opd in one short run (< 8 minutes) on one NVIDIA GPU, offline.
#
# What it runs, in order, each step timed, and what it prints last (one figure per line):
#   1. installs megatron-opd and the packages it needs beyond an NGC PyTorch container from wheels
#      carried beside this script (a venv over the container's own CUDA torch; nothing from the network);
#   2. the tests that are skipped without CUDA (tests/gpu/: the student at TP1 on CUDA over an NCCL
#      process group equal to transformers, the embedded engine on CUDA equal to the CPU engine,
#      a few OPD steps with in-process weight sync);
#   3. `opd bench gpu`: OPD steps of a random Qwen3-shaped student in bf16 and prints its trainer
#      tokens/s, MFU against the GPU's bf16 peak, and peak GPU memory.
#
# Needs: one NVIDIA GPU, Python 3.12 with a CUDA torch, numpy, tensorboard and matplotlib (the NGC
# container nvcr.io/nvidia/pytorch:25.01-py3 has them all), and tools/gpu_wheels/ filled beforehand.
#
# Before going offline (a machine with internet, any Python >= 3.10, from the repository root):
#   bash tools/gpu_check.sh --fetch-wheels
# in an environment where megatron-opd is installed: writes tools/gpu_wheels/, this project's wheel and the
# CPython 3.12 manylinux wheels of the packages tools/gpu_wheels.txt names, at the versions installed there
# (the versions that environment tested; < 64 MiB in all; the script refuses a bigger set).
#
# Usage: bash tools/gpu_check.sh [--wheels DIR] [--out DIR] [--steps N] [--size 0.6B|1.7B] [--no-install]
#        bash tools/gpu_check.sh --fetch-wheels [--wheels DIR]
#        bash tools/gpu_check.sh --list-wheels        (the pinned set --fetch-wheels downloads)
#        bash tools/gpu_check.sh --check-wheels [--wheels DIR]   (names the wheels missing there; exit 1 if any)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
wheels="$here/gpu_wheels"
out="${TMPDIR:-/tmp}/opd-gpu-check"
steps=4
size="0.6B"
install=1
mode=check
max_mib=64

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; wheels="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] && [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "--steps needs a positive integer"; steps="$2"; shift 2 ;;
    --size) [ $# -ge 2 ] && [[ "$2" =~ ^(0\.6B|1\.7B)$ ]] || die "--size is 0.6B or 1.7B"; size="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --fetch-wheels) mode=fetch; shift ;;
    --list-wheels) mode=list; shift ;;
    --check-wheels) mode=check-wheels; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (--help lists them)" ;;
  esac
done

names() { grep -v '^\s*#' "$here/gpu_wheels.txt" | sed 's/\s*#.*//' | grep -v '^\s*$'; }

# the packages named in gpu_wheels.txt, pinned to the versions installed in this environment
requirements() {
  python3 - "$here/gpu_wheels.txt" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
names = [ln.split("#")[0].strip() for ln in open(sys.argv[1])]
missing = []
for name in filter(None, names):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_check: not installed here, so no tested version to pin: {missing} (run it where megatron-opd is installed)")
PY
}

# a wheel file's distribution name, normalised (PEP 503: lower case, runs of -_. as one -)
wheel_name() { basename "$1" | cut -d- -f1 | tr 'A-Z_.' 'a-z--'; }
req_name() { echo "${1%%==*}" | tr 'A-Z_.' 'a-z--'; }

missing_wheels() {
  local have=() req name found
  for w in "$wheels"/*.whl; do [ -e "$w" ] && have+=("$(wheel_name "$w")"); done
  for req in $(names) megatron-opd; do
    name="$(req_name "$req")"; found=0
    for h in "${have[@]:-}"; do [ "$h" = "$name" ] && found=1 && break; done
    [ $found = 1 ] || echo "$req"
  done
}

if [ "$mode" = list ]; then requirements; exit 0; fi
if [ "$mode" = check-wheels ]; then
  missing="$(missing_wheels)"
  [ -z "$missing" ] || { echo "gpu_check: missing in $wheels: $(echo $missing)" >&2; exit 1; }
  echo "gpu_check: every wheel is in $wheels"; exit 0
fi

if [ "$mode" = fetch ]; then
  mkdir -p "$wheels"
  python3 -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$repo"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$wheels" -r <(requirements)
  total=$(du -cm "$wheels"/*.whl | tail -1 | cut -f1)
  echo "gpu_check: $(ls "$wheels"/*.whl | wc -l) wheels, ${total} MiB in $wheels"
  [ "$total" -lt "$max_mib" ] || { echo "gpu_check: over ${max_mib} MiB" >&2; exit 1; }
  exit 0
fi

# ---- the check itself -----------------------------------------------------------------------------
began=$(date +%s)
step() { echo "[gpu_check $(( $(date +%s) - began ))s] $*"; }
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null \
  || die "no CUDA GPU: python3's torch sees none (torch.cuda.is_available() is False)"
python3 -c 'import sys; assert sys.version_info[:2] >= (3, 10)' || die "needs Python >= 3.10"
for module in numpy tensorboard matplotlib; do
  python3 -c "import $module" 2>/dev/null || die "python3 has no '$module' (the NGC PyTorch container has it; add its wheel to $wheels)"
done
mkdir -p "$out"
python=python3
if [ "$install" = 1 ]; then
  missing="$(missing_wheels)"
  [ -z "$missing" ] || die "missing wheels in $wheels (run --fetch-wheels where there is internet): $(echo $missing)"
  step "installing from $wheels into $out/venv (over the system's torch)"
  python3 -m venv --system-site-packages "$out/venv"
  "$out/venv/bin/pip" install --quiet --no-index --no-deps "$wheels"/*.whl
  python="$out/venv/bin/python"
fi
cd "$out"  # the installed package, not the source tree
"$python" -c 'import megatron_opd, torch; print("megatron-opd", megatron_opd.__version__, "from", megatron_opd.__file__, "| torch", torch.__version__, "| GPU", torch.cuda.get_device_name(0))'

step "tests skipped without CUDA (tests/gpu)"
set +e
(cd "$repo" && timeout 300 "$python" -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" \
   -p no:xdist tests/gpu 2>&1 | tail -25)
tests_rc=${PIPESTATUS[0]}
set -e

step "opd bench gpu: ${steps} OPD steps of a random Qwen3-${size}-shaped student (bf16)"
(cd "$repo" && timeout 300 "$python" -m megatron_opd.cli bench gpu --size "$size" --steps "$steps" --out "$out/bench")
step "done (tests exit code ${tests_rc})"
exit "$tests_rc"
