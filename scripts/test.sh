#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Default: everything but the slow end-to-end tests.
#   bash scripts/test.sh            # fast suite (< ~15 min on 2 CPU cores)
#   bash scripts/test.sh --slow     # also the slow end-to-end tests (SmolLM2, multi-process DeepSpeed)
#   bash scripts/test.sh -k dpo     # extra pytest arguments pass through
#   bash scripts/test.sh --vllm     # the vLLM engine's tests, in their own env (.venv-vllm, scripts/setup_vllm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--vllm" ]; then
  shift
  bash scripts/setup_vllm.sh
  . .venv-vllm/bin/activate
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv-vllm/torch_extensions}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
  exec python -m pytest -q tests/rl/test_vllm_engine.py "$@"
fi
bash scripts/setup.sh
. .venv/bin/activate
# DeepSpeed JIT-builds small C++ ops on first use; keep the builds with this venv (two checkouts on one
# machine would otherwise rebuild each other's ~/.cache/torch_extensions copy back and forth)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MARK=(-m "not slow")
if [ "${1:-}" = "--slow" ]; then MARK=(); shift; fi
exec python -m pytest -q "${MARK[@]}" "$@"
