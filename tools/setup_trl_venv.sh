#!/usr/bin/env bash
# TRL in its own venv (never a dependency of megatron-opd): the peer of `opd bench e2e --vs trl`.
# Versions as checked in ../shared/PLATFORM.md: CPU torch first, so TRL's resolver keeps it.
#   bash tools/setup_trl_venv.sh [VENV_DIR]      (default: .venv-trl in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-trl}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "trl==1.16.0" "transformers==5.23.0" "accelerate==1.15.0" "datasets==5.2.0" "tokenizers==0.23.3"
echo "TRL venv ready: $venv/bin/python (opd bench e2e --vs trl finds .venv-trl by itself; else --trl-python)"
