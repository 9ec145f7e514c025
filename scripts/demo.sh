#!/usr/bin/env bash
# The main job: set up, train DPO on SmolLM2-135M-Instruct with the shipped demo task (data/demo/README.md:
# look the asked number up among similar facts), then evaluate the result against the starting model on the
# 300 held-out prompts and end with a three-line summary: what was trained, how held-out answer accuracy
# changed (with its 95% interval), where the report is.
#   bash scripts/demo.sh                 # recipe=dpo_smollm2
#   bash scripts/demo.sh recipe=simpo_smollm2 trainer.max_steps=50   # any recipe / overrides
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# DeepSpeed JIT-builds small C++ ops on first use; keep the builds with this venv (two checkouts on one
# machine would otherwise rebuild each other's ~/.cache/torch_extensions copy back and forth)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
run="demo-$(date +%Y%m%d-%H%M%S)"
args=("$@"); [ ${#args[@]} -eq 0 ] && args=(recipe=dpo_smollm2)
alignkit train "${args[@]}" output_dir=runs run_name="$run"
alignkit eval "runs/$run" --n 300
alignkit report "runs/$run"
echo
echo "== Summary =="
python scripts/answer_eval.py "runs/$run"
