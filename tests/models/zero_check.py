"""Run by test_zero.py in a fresh process: TargetLogProbs inside a DeepSpeed ZeRO engine (1 rank, CPU).

Prints JSON: the largest forward difference to the naive path on an unwrapped copy, and the largest
gradient difference relative to each parameter's largest gradient (full gradients gathered with
``safe_get_full_grad``, so ZeRO-3 partitioning is undone).
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(stage: int, tie: bool) -> None:
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from hand_batches import LAYOUTS

    from alignkit.engine.engine import setup_distributed, shutdown_distributed
    from alignkit.models import ModelConfig, TargetLogProbs, load_causal_lm, naive_target_logps
    from alignkit.models.config import TinyModelConfig

    model, _ = load_causal_lm(ModelConfig(tiny=TinyModelConfig(tie_word_embeddings=tie)))
    reference = copy.deepcopy(model)
    batch = LAYOUTS["prefix_shared"]()
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "zero_allow_untested_optimizer": True,
    }
    setup_distributed()  # before DeepSpeed initialises it itself: removes its /dev/shm all-reduce files
    engine, *_ = deepspeed.initialize(model=TargetLogProbs(model, 3), config=ds_config)
    logps = engine(batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index, batch.target_ids)["logps"]
    want = naive_target_logps(reference, batch)
    engine.backward(logps.sum())
    want.sum().backward()
    reference_grads = dict(reference.named_parameters())
    grad_diff = 0.0
    for name, param in engine.module.model.named_parameters():
        expected = reference_grads[name].grad
        got = safe_get_full_grad(param)
        grad_diff = max(grad_diff, float((got - expected).abs().max() / expected.abs().max()))
    print(json.dumps({"logps_diff": float((logps - want).abs().max()), "grad_rel_diff": grad_diff}))
    shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "tie")
