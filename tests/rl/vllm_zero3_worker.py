"""One rank of the 2-process vLLM test (started twice by test_vllm_engine.py).

Every rank builds the same tiny Llama (head size 32, as vLLM's CPU attention needs), wraps it in a
ZeRO-3 DeepSpeed engine (parameters partitioned across the 2 ranks), starts its own colocated vLLM
engine (``external_launcher``), and compares vLLM's greedy output on this rank's prompts with the
HF engine's (which gathers the parameters) before and after one optimizer step. Writes
OUT_DIR/rank{R}.json.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from tiny_llama import tiny_llama  # tests/ is on PYTHONPATH (test_vllm_engine.py)

from alignkit.rl.generation import HFGenerationEngine
from alignkit.rl.vllm_engine import VLLMGenerationEngine


def main(out_dir: str) -> None:
    import deepspeed

    from alignkit.engine.engine import setup_distributed, shutdown_distributed

    torch.set_num_threads(1)
    setup_distributed()
    rank = torch.distributed.get_rank()
    model = tiny_llama(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                       num_key_value_heads=1, eos_token_id=99, pad_token_id=0, bos_token_id=1).eval()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    partitioned = all(hasattr(p, "ds_id") for p in engine.module.parameters())
    vllm = VLLMGenerationEngine(engine.module, eos_token_id=99, max_model_len=128, cpu_kv_cache_gib=0.05,
                                trainer_engine=engine)
    hf = HFGenerationEngine(engine.module, eos_token_id=99)
    prompts = [[5, 17, 33, 2], [8, 9]] if rank == 0 else [[40, 41, 42], [12], [7, 7, 7, 7, 7]]

    def greedy(gen):
        return [r.completion_ids for r in gen.generate(prompts, max_new_tokens=10, temperature=0.0)]

    before_hf, before_vllm = greedy(hf), greedy(vllm)
    engine.train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]]) + rank
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.eval()
    after_hf, after_vllm = greedy(hf), greedy(vllm)
    result = {"partitioned": partitioned, "before_equal": before_hf == before_vllm,
              "after_equal": after_hf == after_vllm, "changed": after_hf != before_hf, "pushes": vllm.pushes}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    vllm.close()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
