#!/usr/bin/env python
"""DPO throughput, alignkit vs TRL, side by side on the same model, data, batch and order.

    python scripts/bench_dpo.py --steps 4 --repeats 3            # SmolLM2-135M-Instruct, each tool's fastest precision
    python scripts/bench_dpo.py --precision fp32                 # both tools in fp32
    python scripts/bench_dpo.py --layout padded --reference separate   # alignkit's plain path
    python scripts/bench_dpo.py --profile --steps 3              # where alignkit's step time goes

Each repetition runs TRL's DPOTrainer and alignkit's trainer in fresh subprocesses, alternating,
on the same pairs in the same order (batch of ``--batch`` pairs, one optimizer step per batch,
in the precision ``--precision`` picks: by default each tool's fastest for this CPU, bf16 mixed
precision where the CPU has bf16 instructions and measures bf16 matmuls faster (TRL ``bf16=True``,
its CPU autocast; alignkit ``deepspeed.dtype=bf16_autocast``), fp32 elsewhere; gradient clipping ``--max-grad-norm``, activation checkpointing ``--gradient-checkpointing``
and the allocator setting ``--release-freed-memory`` apply to both alike). It prints per tool:
the CPU model and flags, the load average, both matmul peaks and the precision each tool ran in;
seconds/step (median and spread over repetitions; the first step of each run is left out as
warm-up) in wall time and in the process's CPU time (with one thread the CPU time is what a quiet
machine's wall time would be: a loaded machine preempts the process, which the CPU time does not
count), pairs/s, non-pad tokens/s (the tokens of prompt+chosen and prompt+rejected, counted the same way for both), peak RSS, MFU
(model FLOPs = 8 x parameters x tokens per step — policy forward+backward and the reference
forward — over the matmul peak, fp32 or bf16 as the tools ran, this script measures), the first step's mean log-probs of
chosen and rejected (they must agree: the same computation), and the ratios. alignkit's
reference pre-pass is added to its time, spread over the measured steps. For alignkit it also
prints the utilisation by executed matmul FLOPs, counted from the batches it actually ran
(``executed_gflops_per_step``): MFU's "model FLOPs" count every pair's prompt twice and the LM
head on every position, work that prefix sharing and target-only heads skip.
``--override KEY=VALUE`` (repeatable) passes extra overrides to alignkit's run. Both tools and the
matmul peak use ``--threads`` torch threads (default 1, the setting of the README's numbers).

``--profile`` runs alignkit alone under ``torch.profiler`` from the first training step to the
end and prints the self CPU time of its operators by kind (matmul, attention, log-sum-exp,
optimizer, element-wise, copies, other) next to the loop's wall time; the gap is time spent outside
torch operators (Python, DeepSpeed bookkeeping, logging).

Needs TRL (``bash scripts/setup.sh --bench`` or ``pip install trl==1.16.0``).
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


def bench_rows(steps: int, batch: int) -> list[dict]:
    """The pairs of the run in the order both tools will see them (TRL reads them sequentially)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "paired_train.jsonl").read_text().splitlines()]
    return rows[: steps * batch]


def alignkit_file_order(rows: list[dict], batch: int, seed: int = 0) -> list[dict]:
    """Arrange ``rows`` so that alignkit's seeded step schedule visits them in the given order."""
    from alignkit.trainers.common import step_groups

    order = [i for s in range(len(rows) // batch) for i in step_groups(len(rows), s, batch, seed)]
    arranged: list[dict] = [{}] * len(rows)
    for position, index in enumerate(order):
        arranged[index] = rows[position]
    return arranged


def worker_trl(args, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignkit.models.smollm2 import smollm2_dir

    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    times: list[float] = []
    cpu_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.cpu)

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                           max_steps=args.steps, learning_rate=5e-6, beta=0.1, max_length=args.max_length,
                           max_grad_norm=args.max_grad_norm,
                           logging_steps=1, report_to=[], use_cpu=True, bf16=args.precision == "bf16", save_strategy="no",
                           gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0, seed=0)
        trainer = Sequential(model=model, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[Timer()])
        trainer.train()
    first = trainer.state.log_history[0]
    return {"step_times": times, "cpu_step_times": cpu_times[1:], "prepass_s": 0.0, "prepass_cpu_s": 0.0,
            "first_logps_chosen": first.get("logps/chosen"), "first_logps_rejected": first.get("logps/rejected"),
            "first_loss": first.get("loss")}


def worker_alignkit(args, rows: list[dict]) -> dict:
    import alignkit.trainers.preference as preference
    from alignkit.run import train_from_overrides

    marks = bench_common.time_alignkit_loop(profile=args.profile)
    original_precompute = preference.precompute

    def timed_precompute(*a, **k):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return original_precompute(*a, **k)
        finally:
            marks["prepass_s"] = time.perf_counter() - start
            marks["prepass_cpu_s"] = time.process_time() - cpu

    preference.precompute = timed_precompute
    import alignkit.trainers.common as common

    original_collate, shapes = common.collate_groups, []

    def counted_collate(*a, **k):  # what alignkit's forward passes actually process
        batch = original_collate(*a, **k)
        shapes.append((*batch.input_ids.shape, batch.target_ids.numel()))
        return batch

    common.collate_groups = counted_collate
    with tempfile.TemporaryDirectory() as out:
        data_file = Path(out) / "pairs.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in alignkit_file_order(rows, args.batch)))
        code = train_from_overrides([
            "recipe=dpo_smollm2", f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch}",
            f"trainer.micro_batch_size={args.batch}", "trainer.eval_every=0", "trainer.export=false",
            "trainer.warmup_steps=0", "trainer.lr=5e-6", "trainer.scheduler=constant", f"data.layout={args.layout}",
            f"trainer.reference={args.reference}", f"data.train=[{{path: {data_file}}}]", "data.eval=[]",
            "data.max_length=256", f"output_dir={out}", "run_name=bench", "logger.backends=[jsonl]",
            f"trainer.reference_cache_dir={out}/ref", f"deepspeed.gradient_clipping={args.max_grad_norm}",
            f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
            f"deepspeed.dtype={bench_common.ALIGNKIT_DTYPE[args.precision]}", *args.override,
        ])
        assert code == 0
        times, train = bench_common.step_times(marks["loop_start"], Path(out) / "bench" / "metrics.jsonl")
    first = train[0]
    if args.profile:
        return {"profile": bench_common.profile_by_kind(marks.pop("profiler")), "loop_wall_s": sum(times),
                "loop_cpu_s": marks["loop_cpu_s"]}
    # the last `steps` collations are the training batches (one micro-batch per step), the rest the pre-pass
    from alignkit.engine.cpu_memory import block_cache_stats

    cpu = [r["cpu_time_s"] for r in train]
    return {"step_times": times, "cpu_step_times": [b - a for a, b in zip(cpu, cpu[1:])],
            "prepass_s": marks.get("prepass_s", 0.0), "prepass_cpu_s": marks.get("prepass_cpu_s", 0.0),
            "block_cache": block_cache_stats(),
            "train_shapes": shapes[-args.steps:], "prepass_shapes": shapes[:-args.steps],
            "first_logps_chosen": first["logps/chosen"], "first_logps_rejected": first["logps/rejected"],
            "first_loss": first["loss"]}


def executed_gflops_per_step(result: dict, config, steps: int) -> float:
    """Matmul FLOPs alignkit actually runs per step: decoder over every row position (padding
    included), dense attention over each row, the LM head on targets only; x3 for the training
    forward+backward, x1 for the pre-pass forward (spread over the steps). Embedding lookups,
    norms and element-wise ops are not counted."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size)  # q,o + k,v + MLP weights
    head = config.vocab_size * d

    def forward(rows: int, length: int, targets: int) -> float:
        return 2 * body * rows * length + 4 * layers * d * rows * length**2 + 2 * head * targets

    train = sum(3 * forward(*shape) for shape in result["train_shapes"][1:]) / max(len(result["train_shapes"]) - 1, 1)
    return (train + sum(forward(*shape) for shape in result["prepass_shapes"]) / steps) / 1e9


def count_tokens(rows: list[dict], steps: int, batch: int) -> float:
    """Non-pad tokens per step: prompt+chosen and prompt+rejected, with SmolLM2's chat template."""
    from transformers import AutoTokenizer

    from alignkit.models.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    total = 0
    for r in rows[: steps * batch]:
        for key in ("chosen", "rejected"):
            total += len(tokenizer.apply_chat_template(r["prompt"] + r[key], tokenize=True, return_dict=True)["input_ids"])
    return total / steps


def worker_argv(args) -> list[str]:
    return ["--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
            "--layout", args.layout, "--reference", args.reference, "--max-grad-norm", str(args.max_grad_norm),
            "--precision", args.precision,
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
            *(f"--override={o}" for o in args.override)]


def run_worker(tool: str, args) -> dict:
    # the same allocator setting for both processes: the glibc threshold alignkit falls back to without its
    # block cache (with MALLOC_MMAP_THRESHOLD_ set alignkit leaves the allocator alone)
    from alignkit.engine.cpu_memory import MMAP_THRESHOLD_BYTES

    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)} if args.release_freed_memory else None
    return bench_common.run_worker(__file__, tool, worker_argv(args), env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--layout", default="prefix_shared", choices=["padded", "packed", "prefix_shared"])
    parser.add_argument("--reference", default="precomputed", choices=["precomputed", "separate"])
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="global gradient clipping for both tools (0: none, needed by optimizer_in_backward)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing for both tools")
    parser.add_argument("--release-freed-memory", action="store_true",
                        help="both processes: glibc serves allocations >= 128 KiB with mmap (MALLOC_MMAP_THRESHOLD_); "
                             "alignkit then runs without its block cache")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra alignkit override (repeatable), e.g. data.max_tokens_per_row=1024")
    parser.add_argument("--worker", choices=["trl", "alignkit"])
    bench_common.add_threads_argument(parser)
    bench_common.add_precision_argument(parser)
    parser.add_argument("--profile", action="store_true", help="profile alignkit's training loop instead of comparing")
    args = parser.parse_args()
    if not args.worker:
        bench_common.pin_threads(args.threads)
    rows = bench_rows(args.steps, args.batch)
    if not args.worker:  # resolved once here; the workers get fp32 or bf16
        args.precision, why = bench_common.bench_precision(args.precision)
        print(f"precision: {args.precision} ({why}): TRL bf16={args.precision == 'bf16'}, alignkit "
              f"deepspeed.dtype={bench_common.ALIGNKIT_DTYPE[args.precision]}")
    if args.profile and not args.worker:
        result = bench_common.run_worker(__file__, "alignkit", [*worker_argv(args), "--profile"])
        bench_common.print_profile(result["profile"], result["loop_wall_s"], result["loop_cpu_s"])
        return
    if args.worker:
        result = (worker_trl if args.worker == "trl" else worker_alignkit)(args, rows)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return

    import torch

    from alignkit.models.smollm2 import smollm2_dir
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2_dir())
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    tokens = count_tokens(rows, args.steps, args.batch)
    peaks = bench_common.matmul_peaks()
    print(bench_common.describe_machine(peaks))
    peak = peaks[args.precision]  # the peak of the precision both tools run in (thread CPU time)
    print(f"model {params / 1e6:.1f} M params, {tokens:.0f} non-pad tokens/step, torch threads {torch.get_num_threads()}; "
          f"MFU and utilisation below are over the {args.precision} peak {peak:.1f} GFLOP/s")
    results = bench_common.alternate(
        ("trl", "alignkit"), args.repeats, lambda tool: run_worker(tool, args),
        lambda r: f"steps {[round(t, 2) for t in r['step_times']]} prepass {r['prepass_s']:.1f}s "
                  f"rss {r['peak_rss_gb']:.2f} GB{bench_common.describe_block_cache(r)}")
    summary = {}
    for tool, runs in results.items():
        per_step = [statistics.median(r["step_times"][1:] or r["step_times"]) + r["prepass_s"] / args.steps
                    for r in runs]
        s = statistics.median(per_step)
        cpu_per_step = [statistics.median(r["cpu_step_times"] or [float("nan")]) + r["prepass_cpu_s"] / args.steps
                        for r in runs]
        cpu_s = statistics.median(cpu_per_step)
        summary[tool] = {"cpu_s_per_step": cpu_s, "cpu_spread": (min(cpu_per_step), max(cpu_per_step)),
                         "per_repeat": per_step, "cpu_per_repeat": cpu_per_step,
            "s_per_step": s, "spread": (min(per_step), max(per_step)), "pairs_per_s": args.batch / s,
            "tokens_per_s": tokens / s, "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "mfu": 8 * params * tokens / s / (peak * 1e9),
            "hfu": (statistics.median(executed_gflops_per_step(r, config, args.steps) / run_s
                                      for r, run_s in zip(runs, per_step)) / peak) if tool == "alignkit" else None,
            "hfu_cpu": (statistics.median(executed_gflops_per_step(r, config, args.steps) / run_s
                                          for r, run_s in zip(runs, cpu_per_step)) / peak) if tool == "alignkit" else None,
            "first_logps": (runs[0]["first_logps_chosen"], runs[0]["first_logps_rejected"]),
            "first_loss": runs[0]["first_loss"],
        }
    print(f"\nprecision: TRL {'bf16=True (autocast)' if args.precision == 'bf16' else 'fp32'}, alignkit "
          f"deepspeed.dtype={bench_common.ALIGNKIT_DTYPE[args.precision]}")
    print(f"{'':<10}{'s/step':>16}{'CPU s/step':>20}{'pairs/s':>10}{'tok/s':>9}{'RSS GB':>8}{'MFU':>7}  "
          "first-step logps (chosen, rejected), loss")
    for tool, m in summary.items():
        lo, hi = m["spread"]
        clo, chi = m["cpu_spread"]
        print(f"{tool:<10}{m['s_per_step']:>7.2f} [{lo:.2f}-{hi:.2f}]{m['cpu_s_per_step']:>9.2f} [{clo:.2f}-{chi:.2f}]"
              f"{m['pairs_per_s']:>10.3f}{m['tokens_per_s']:>9.1f}"
              f"{m['peak_rss_gb']:>8.2f}{m['mfu']:>7.1%}  {m['first_logps']}, {m['first_loss']}")
    a, t = summary["alignkit"], summary["trl"]
    # the ratio of each repetition's alternating pair of runs, for its spread
    wall_ratios = [tr / al for tr, al in zip(t["per_repeat"], a["per_repeat"])]
    cpu_ratios = [tr / al for tr, al in zip(t["cpu_per_repeat"], a["cpu_per_repeat"])]
    print(f"\nalignkit / TRL per repetition: wall {min(wall_ratios):.2f}-{max(wall_ratios):.2f}x, "
          f"CPU time {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}x")
    print(f"alignkit / TRL: {a['pairs_per_s'] / t['pairs_per_s']:.2f}x pairs/s (wall), "
          f"{t['cpu_s_per_step'] / a['cpu_s_per_step']:.2f}x by CPU time per step, "
          f"{a['peak_rss_gb'] / t['peak_rss_gb']:.2f}x peak RSS")
    print(f"alignkit's executed matmul FLOPs (prompt once, padding and dense attention included, LM head on "
          f"targets only) over the {args.precision} peak: {a['hfu']:.1%} by wall time, {a['hfu_cpu']:.1%} by CPU time")


if __name__ == "__main__":
    main()
