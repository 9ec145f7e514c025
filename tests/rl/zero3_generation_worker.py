"""One rank of the ZeRO-3 generation test (started twice by test_generation_zero3.py).

Builds the same tiny Llama on every rank, records greedy output of the plain model, wraps it in a
ZeRO-3 DeepSpeed engine (parameters partitioned across the 2 ranks), generates again through
HFGenerationEngine with a different max_new_tokens per rank (so the ranks decode a different number
of steps) and writes the comparison to OUT_DIR/rank{R}.json.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from tiny_llama import tiny_llama  # tests/ is on PYTHONPATH (test_generation_zero3.py)

from alignkit.rl.generation import HFGenerationEngine


def main(out_dir: str) -> None:
    import deepspeed

    from alignkit.engine.engine import setup_distributed, shutdown_distributed

    torch.set_num_threads(1)
    setup_distributed()  # gloo on CPU, and removes DeepSpeed's /dev/shm all-reduce files
    rank = torch.distributed.get_rank()
    model = tiny_llama(eos_token_id=99, pad_token_id=0).eval()
    prompts = [[5, 17, 33, 2], [8, 9]] if rank == 0 else [[40, 41, 42], [12], [7, 7, 7, 7, 7]]
    max_new = 3 if rank == 0 else 9
    plain = HFGenerationEngine(model).generate(
        prompts, num_samples=2, max_new_tokens=max_new, temperature=0.0
    )
    sampled_plain = HFGenerationEngine(model).generate(
        prompts, num_samples=2, max_new_tokens=max_new, seed=rank
    )

    # persistence threshold 0: even tiny parameters are partitioned (by default they would stay whole)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": False}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    partitioned = all(hasattr(p, "ds_id") for p in engine.module.parameters())
    shard_numel = sum(p.numel() for p in engine.module.parameters())  # 0 when partitioned away
    zero3 = HFGenerationEngine(engine).generate(
        prompts, num_samples=2, max_new_tokens=max_new, temperature=0.0
    )
    sampled_zero3 = HFGenerationEngine(engine).generate(
        prompts, num_samples=2, max_new_tokens=max_new, seed=rank
    )
    result = {
        "partitioned": partitioned,
        "shard_numel": shard_numel,
        "greedy_equal": [r.completion_ids for r in plain] == [r.completion_ids for r in zero3],
        "sampled_equal": [r.completion_ids for r in sampled_plain]
        == [r.completion_ids for r in sampled_zero3],
        "logprob_max_diff": max(
            abs(a - b) for x, y in zip(plain, zero3) for a, b in zip(x.logprobs, y.logprobs)
        ),
        "lengths": [len(r.completion_ids) for r in zero3],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
