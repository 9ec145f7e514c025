#!/usr/bin/env python
"""GRPO throughput, alignkit vs TRL's GRPOTrainer, on the same model, prompts, G, lengths and batch.

    python scripts/bench_grpo.py --steps 3 --repeats 2     # SmolLM2-135M-Instruct, each tool's fastest precision
    python scripts/bench_grpo.py --precision fp32          # both tools in fp32
    .venv-vllm/bin/python scripts/bench_grpo.py --engine hf,vllm   # alignkit's two engines (no TRL there)

``--engine`` picks alignkit's generation engine(s) (``generation.engine``: ``hf``, ``hf-bf16`` = hf with
``generation.decode_dtype=bf16``, ``vllm``; comma-separated; vllm needs the environment of ``bash scripts/setup_vllm.sh``, which has no TRL:
``--tools`` defaults to alignkit alone there). Besides s/step and completions/s of whole steps it prints the
generation phase alone (completion tokens/s while sampling: the run's ``response_length`` x completions per step
over its ``gen_seconds``).

Each repetition runs both in fresh subprocesses, alternating: ``--prompts`` prompts per step x
``--generations`` samples (G) each, completions of up to ``--max-new-tokens`` tokens, the demo judge
as the only reward, no KL term (beta 0, no reference model), one optimizer step per generation
batch, temperature 1, both tools in one precision (``--precision``, as bench_dpo.py: by default the fastest for
this CPU, TRL ``bf16=True`` and alignkit ``deepspeed.dtype=bf16_autocast`` where bf16 is faster, else fp32;
the header prints the CPU, its flags and both matmul peaks). Before this option alignkit ran its preset's
``deepspeed.dtype=auto`` while TRL ran fp32, which on a bf16 CPU compared mixed precision against fp32. It prints seconds/step (median over repetitions, the first step of each run
left out as warm-up, the spread shown), completions/s, and the ratio. Both sample, so their
completions differ; the per-step work is the same by construction (same counts and limits).
Needs TRL (``bash scripts/setup.sh --bench``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prompt_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "prompts_train.jsonl").read_text().splitlines()]
    return rows[:n]


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.models.smollm2 import smollm2_dir
    from alignkit.rewards.registry import resolve_reward

    judge = resolve_reward("judge")

    def judge_reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return judge([""] * len(texts), texts, answer=answer)

    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    rows = prompt_rows(args.prompts * args.steps)
    data = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    completions = args.prompts * args.generations
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=completions, gradient_accumulation_steps=1,
                            num_generations=args.generations, max_completion_length=args.max_new_tokens,
                            max_steps=args.steps, learning_rate=1e-5, beta=0.0, temperature=1.0, logging_steps=1,
                            report_to=[], use_cpu=True, bf16=args.precision == "bf16", save_strategy="no", gradient_checkpointing=False,
                            dataloader_num_workers=0, seed=0, log_completions=False)
        trainer = GRPOTrainer(model=model, reward_funcs=judge_reward, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"step_times": times, "mean_length": statistics.fmean(lengths) if lengths else float("nan")}


def worker_alignkit(args) -> dict:
    from alignkit.run import train_from_overrides

    marks = bench_common.time_alignkit_loop()
    with tempfile.TemporaryDirectory() as out:
        data_file = Path(out) / "prompts.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(args.prompts * args.steps)))
        code = train_from_overrides([
            "recipe=grpo_smollm2", f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.prompts}",
            f"trainer.micro_batch_size={args.prompts}", f"rl.num_generations={args.generations}",
            f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=1.0", "trainer.eval_every=0",
            "trainer.export=false", "trainer.warmup_steps=0", "trainer.lr=1e-5", "loss.beta=0.0",
            f"data.train=[{{path: {data_file}}}]", "data.eval=[]", f"data.layout={args.layout}",
            f"output_dir={out}", "run_name=bench", "logger.backends=[jsonl]",
            f"generation.engine={args.engine.removesuffix('-bf16')}",
            f"generation.decode_dtype={'bf16' if args.engine.endswith('-bf16') else 'auto'}",
            f"deepspeed.dtype={bench_common.ALIGNKIT_DTYPE[args.precision]}",  # the same precision as TRL's
        ])
        assert code == 0
        times, train = bench_common.step_times(marks["loop_start"], Path(out) / "bench" / "metrics.jsonl")
    from alignkit.engine.cpu_memory import block_cache_stats

    lengths = [r["response_length"] for r in train if "response_length" in r]
    completions = args.prompts * args.generations  # one process: every completion of the step
    gen = [r["response_length"] * completions / max(r["gen_seconds"], 1e-9)
           for r in train[1:] or train if "gen_seconds" in r]
    return {"step_times": times, "mean_length": statistics.fmean(lengths) if lengths else float("nan"),
            "gen_tokens_per_s": statistics.median(gen) if gen else float("nan"), "block_cache": block_cache_stats()}


def run_worker(tool: str, args) -> dict:
    worker, _, engine = tool.partition(":")  # "alignkit:vllm" -> the alignkit worker with that engine
    return bench_common.run_worker(__file__, worker, ["--steps", str(args.steps), "--prompts", str(args.prompts), "--generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens), "--layout", args.layout, "--engine", engine or "hf", "--precision", args.precision])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--layout", default="prefix_shared", choices=["padded", "packed", "prefix_shared"])
    parser.add_argument("--worker", choices=["trl", "alignkit"])
    parser.add_argument("--engine", default="hf", help="alignkit's generation engine(s), comma-separated: hf, hf-bf16 "
                        "(the hf engine with generation.decode_dtype=bf16), vllm")
    parser.add_argument("--tools", default=None,
                        help="trl,alignkit or alignkit (default: both where TRL is installed, else alignkit)")
    bench_common.add_threads_argument(parser)
    bench_common.add_precision_argument(parser)
    args = parser.parse_args()
    if not args.worker:
        bench_common.pin_threads(args.threads)
        args.precision, why = bench_common.bench_precision(args.precision)  # resolved once; workers get fp32|bf16
        print(bench_common.describe_machine(bench_common.matmul_peaks()))
        print(f"precision: {args.precision} ({why}): TRL bf16={args.precision == 'bf16'}, alignkit "
              f"deepspeed.dtype={bench_common.ALIGNKIT_DTYPE[args.precision]}")
    if args.worker:
        result = (worker_trl if args.worker == "trl" else worker_alignkit)(args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return
    completions = args.prompts * args.generations
    print(f"{args.prompts} prompts x G={args.generations} = {completions} completions/step, "
          f"up to {args.max_new_tokens} new tokens, {args.steps} steps x {args.repeats} repeats")
    if args.tools is None:
        import importlib.util

        args.tools = "trl,alignkit" if importlib.util.find_spec("trl") else "alignkit"
        if args.tools == "alignkit":
            print("TRL is not installed in this environment (e.g. .venv-vllm): alignkit only")
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    tools = tuple(t for t in ("trl",) if t in args.tools.split(","))
    tools += tuple(f"alignkit:{e}" for e in engines) if "alignkit" in args.tools.split(",") else ()
    if engines == ["hf"] and "trl" in tools:
        tools = tuple("alignkit" if t.startswith("alignkit") else t for t in tools)
    results = bench_common.alternate(
        tools, args.repeats, lambda tool: run_worker(tool, args),
        lambda r: f"steps {[round(t, 2) for t in r['step_times']]} rss {r['peak_rss_gb']:.2f} GB "
                  f"mean completion length {r['mean_length']:.1f} tokens{bench_common.describe_block_cache(r)}")
    engine = engines[0] if engines else "hf"
    summary = {}
    for tool, runs in results.items():
        per_step = [statistics.median(r["step_times"][1:] or r["step_times"]) for r in runs]
        s = statistics.median(per_step)
        summary[tool] = (s, min(per_step), max(per_step), completions / s,
                         statistics.median(r["peak_rss_gb"] for r in runs),
                         statistics.fmean(r["mean_length"] for r in runs),
                         statistics.median(r.get("gen_tokens_per_s", float("nan")) for r in runs))
    print(f"\n{'':<15}{'s/step':>20}{'completions/s':>15}{'gen tok/s':>11}{'RSS GB':>8}{'mean length':>13}")
    for tool, (s, lo, hi, cps, rss, length, gen) in summary.items():
        label = f"{tool} ({engine})" if tool == "alignkit" else tool
        print(f"{label:<15}{s:>8.2f} [{lo:.2f}-{hi:.2f}]{cps:>15.3f}{gen:>11.1f}{rss:>8.2f}{length:>13.1f}")
    for tool in summary:
        if "trl" in summary and tool.startswith("alignkit"):
            print(f"\n{tool} / TRL: {summary[tool][3] / summary['trl'][3]:.2f}x completions/s")
    if "alignkit:hf" in summary and "alignkit:hf-bf16" in summary:
        print(f"\nhf-bf16 / hf engine: {summary['alignkit:hf-bf16'][3] / summary['alignkit:hf'][3]:.2f}x completions/s, "
              f"{summary['alignkit:hf-bf16'][6] / summary['alignkit:hf'][6]:.2f}x generation tokens/s")
    if "alignkit:hf" in summary and "alignkit:vllm" in summary:
        print(f"\nvllm / hf engine: {summary['alignkit:vllm'][3] / summary['alignkit:hf'][3]:.2f}x completions/s, "
              f"{summary['alignkit:vllm'][6] / summary['alignkit:hf'][6]:.2f}x generation tokens/s")


if __name__ == "__main__":
    main()
