#!/usr/bin/env python
"""Decoding speed of the HF generation engine: transformers' fp32 forward vs the bf16 lean decoder.

    python scripts/bench_decode.py --repeats 3            # SmolLM2-135M-Instruct, fp32 weights, 1 thread

One ``HFGenerationEngine.generate`` call per measurement: ``--prompts`` demo prompts x ``--samples``
samples, exactly ``--max-new-tokens`` tokens each (no EOS can stop them: the EOS id is set to an
unused one), temperature 1, a fixed seed; the variants run alternately in one process, with
alignkit's CPU block cache installed as in a training run. Prints the CPU, each variant's median
seconds per call (its spread), decode ms per token step, and the ratio to transformers' forward;
and whether each variant's first 16 greedy tokens equal transformers' fp32 ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"transformers": None, "bf16": "bf16"}  # generation.decode_dtype of each: None = the weights' (fp32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--variants", default="transformers,bf16")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.engine.cpu_memory import install_block_cache
    from alignkit.models.smollm2 import smollm2_dir
    from alignkit.rl.generation import HFGenerationEngine

    torch.set_num_threads(1)
    install_block_cache()
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "prompts_train.jsonl").read_text().splitlines()]
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)
               for r in rows[: args.prompts]]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    unused_eos = len(tokenizer) - 1
    names = args.variants.split(",")
    engines = {n: HFGenerationEngine(model, tokenizer, eos_token_id=unused_eos,
                                     decode_dtype=torch.bfloat16 if VARIANTS[n] == "bf16" else None) for n in names}
    print(bench_common.describe_machine(bench_common.matmul_peaks()))
    print(f"{args.prompts} prompts (lengths {[len(p) for p in prompts]}) x {args.samples} samples x "
          f"{args.max_new_tokens} new tokens, fp32, 1 thread, load average {os.getloadavg()[0]:.2f}")
    greedy = {n: [r.completion_ids for r in e.generate(prompts, num_samples=1, max_new_tokens=16, temperature=0.0)]
              for n, e in engines.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for n, engine in engines.items():
            tick = time.perf_counter()
            engine.generate(prompts, num_samples=args.samples, max_new_tokens=args.max_new_tokens, seed=1)
            times[n].append(time.perf_counter() - tick)
    base = statistics.median(times[names[0]])
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:>14}: {med:6.2f} s/call [{min(times[n]):.2f}-{max(times[n]):.2f}]  "
              f"{1e3 * med / args.max_new_tokens:6.1f} ms/token step  x{base / med:.2f} vs {names[0]}  "
              f"({engines[n].decoder}); greedy tokens == {names[0]}'s: {greedy[n] == greedy[names[0]]}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
