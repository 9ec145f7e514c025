#!/usr/bin/env bash
# One command on a machine with one GPU: bf16 SFT/DPO/GRPO steps on SmolLM2 through DeepSpeed, packed and
# prefix-shared log-probs against padded rows on CUDA, export and reload; one PASS/FAIL line per check.
# Usage: bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--only sft,dpo,...] [--steps N]
# (--dry-run: the same checks on the CPU with the tiny model; tests/test_gpu_check.py runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$PY" scripts/gpu_check.py "$@"
