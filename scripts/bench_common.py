"""Pieces shared by the side-by-side benchmarks (bench_dpo.py, bench_grpo.py).

``run_worker`` starts ``python SCRIPT --worker TOOL ...`` in a fresh process (so each tool's peak
RSS and warm-up are its own) and returns the JSON line it prints; ``time_alignkit_loop`` patches
the trainer so the worker knows when the training loop started (after model load, data and the
reference pre-pass, which the DPO bench times separately); ``step_times`` turns the loop start and
the metrics' timestamps into per-step seconds (and returns the train records).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def add_threads_argument(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both tools' processes and the matmul peak (default 1, as in the README)")


def pin_threads(threads: int) -> None:
    """Both tools' worker processes (and this one) run ``threads`` torch/OpenMP threads."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def run_worker(script: str, tool: str, argv: list[str], extra_env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    proc = subprocess.run([sys.executable, script, "--worker", tool, *argv], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{tool} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def describe_block_cache(result: dict) -> str:
    """alignkit's block cache counters from a worker's result ("" when it was not in use)."""
    stats = result.get("block_cache") or {}
    if not stats.get("peak_live_bytes"):
        return ""
    return (f"; block cache: {stats['hits']} hits, {stats['resizes']} resizes, {stats['fresh_mappings']} fresh "
            f"mappings, live peak {stats['peak_live_bytes'] / 2**30:.2f} GiB")


def time_alignkit_loop(profile: bool = False) -> dict:
    """Record ``loop_start`` when ``trainers.common.begin`` returns (training steps start then).

    With ``profile``, a ``torch.profiler`` starts there too (``marks["profiler"]``), and stops when
    the run completes."""
    import alignkit.trainers.common as common

    marks: dict = {}
    original = common.begin

    def timed_begin(*a, **k):
        done = original(*a, **k)
        if profile:
            import torch

            marks["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            marks["profiler"].start()
        marks["loop_start"], marks["loop_cpu_start"] = time.time(), time.process_time()
        return done

    if profile:
        original_complete = common.complete

        def profiled_complete(*a, **k):
            marks["profiler"].stop()
            marks["loop_cpu_s"] = time.process_time() - marks["loop_cpu_start"]
            return original_complete(*a, **k)

        common.complete = profiled_complete

    common.begin = timed_begin
    return marks


# operator name fragments -> kind, first match wins (self CPU time, so parents are not double counted)
OPERATOR_KINDS = (
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax_backward", "_softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::dot")),
    ("log-sum-exp", ("logsumexp", "log_softmax")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("copies", ("copy_", "aten::cat", "aten::index", "gather", "scatter", "aten::to", "contiguous", "clone",
                "aten::stack", "aten::where", "empty", "fill_", "zero_", "masked_fill")),
    ("element-wise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "aten::neg", "aten::exp",
                      "aten::pow", "rsqrt", "aten::mean", "aten::sum", "sigmoid", "aten::cos", "aten::sin",
                      "threshold", "aten::log", "aten::max", "aten::clamp", "aten::norm")),
)


def profile_by_kind(profiler) -> dict:
    """Self CPU seconds per operator kind, and the 12 most expensive operators."""
    kinds: dict[str, float] = {}
    ops = []
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        kind = next((k for k, frags in OPERATOR_KINDS if any(f in event.key for f in frags)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        ops.append((seconds, event.key, event.count))
    return {"kinds": kinds, "top": sorted(ops, reverse=True)[:12]}


def print_profile(profile: dict, wall_s: float, cpu_s: float) -> None:
    """Operator time by kind, as a share of all torch-operator time.

    The profiler's times are wall-clock, so on a loaded machine they include waiting for a core;
    the shares stay meaningful, the absolute seconds do not. ``wall - operators`` is the time spent
    outside torch operators (Python, DeepSpeed bookkeeping, logging)."""
    kinds = profile["kinds"]
    total = sum(kinds.values())
    print(f"training loop: wall {wall_s:.1f} s, process CPU {cpu_s:.1f} s; inside torch operators {total:.1f} s "
          f"(wall); outside {max(wall_s - total, 0.0):.1f} s")
    print("\n| kind | seconds | share of operator time |\n|---|---|---|")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {seconds:.2f} | {seconds / total:.1%} |")
    print("\n| operator | calls | seconds |\n|---|---|---|")
    for seconds, name, count in profile["top"]:
        print(f"| `{name}` | {count} | {seconds:.2f} |")


def step_times(loop_start: float, metrics_path) -> tuple[list[float], list[dict]]:
    """Seconds of each train step from the metrics' timestamps, and the train records themselves."""
    records = [json.loads(line) for line in open(metrics_path).read().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    stamps = [loop_start] + [r["time"] for r in train]
    return [b - a for a, b in zip(stamps, stamps[1:])], train


def alternate(tools: tuple[str, ...], repeats: int, run, describe) -> dict[str, list[dict]]:
    """Run each tool once per repetition, alternating (so load drift hits both alike); print each run."""
    results: dict[str, list[dict]] = {tool: [] for tool in tools}
    for repeat in range(repeats):
        for tool in tools:
            results[tool].append(run(tool))
            print(f"  repeat {repeat + 1} {tool:<8} {describe(results[tool][-1])}", flush=True)
    return results
