"""Pieces shared by the side-by-side benchmarks (bench_dpo.py, bench_grpo.py).

``run_worker`` starts ``python SCRIPT --worker TOOL ...`` in a fresh process (so each tool's peak
RSS and warm-up are its own) and returns the JSON line it prints; ``time_alignkit_loop`` patches
the trainer so the worker knows when the training loop started (after model load, data and the
reference pre-pass, which the DPO bench times separately); ``step_times`` turns the loop start and
the metrics' timestamps into per-step seconds (and returns the train records).

``describe_machine`` is the header every bench prints: the CPU model, the flags that decide the
precision (``amx_bf16``, ``avx512_bf16``, ``avx512f``, ``avx2``), the load average, and both matmul
peaks (fp32 and bf16, one 1024^3 matmul, in this thread's CPU time, so a loaded machine does not
lower them; the wall-clock peak is printed beside). ``bench_precision`` picks each tool's fastest
precision for this CPU (``--precision auto``): bf16 where the CPU has bf16 instructions and the
probe of ``alignkit.engine.precision`` measured bf16 matmuls faster, else fp32; TRL then runs with
``bf16=True`` (its CPU autocast) and alignkit with ``deepspeed.dtype=bf16_autocast``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


MACHINE_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def matmul_peaks(size: int = 1024, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s of a ``size``-cubed matmul: fp32 and bf16 in thread CPU time, fp32 also in wall time."""
    import torch

    from alignkit.engine.precision import _measure

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 2:
        a @ b
        count += 1
    wall = 2 * size**3 * count / (time.perf_counter() - start) / 1e9
    return {"fp32": _measure(size, size, size, torch.float32, seconds), "fp32_wall": wall,
            "bf16": _measure(size, size, size, torch.bfloat16, seconds)}


def describe_machine(peaks: dict[str, float]) -> str:
    """CPU model, the precision flags it has, load average, both matmul peaks (see the module docstring)."""
    from alignkit.engine.precision import read_cpu_info

    cpu = read_cpu_info()
    flags = " ".join(f for f in MACHINE_FLAGS if f in cpu.flags) or "none of " + ", ".join(MACHINE_FLAGS)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU {cpu.model} ({os.cpu_count()} cores), flags: {flags}; load average {load}\n"
            f"matmul peak 1024^3, thread CPU time: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s "
            f"(fp32 wall clock {peaks['fp32_wall']:.1f})")


def add_precision_argument(parser) -> None:
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: each tool in its fastest precision for this CPU (bf16 where the CPU has bf16 "
                             "instructions and measures bf16 matmuls faster; TRL bf16=True, alignkit "
                             "deepspeed.dtype=bf16_autocast), else fp32")


def bench_precision(requested: str) -> tuple[str, str]:
    """``(fp32|bf16, why)`` for both tools; ``auto`` asks ``alignkit.engine.precision`` (switch or not)."""
    if requested != "auto":
        return requested, "set with --precision"
    from alignkit.engine import precision

    cpu = precision.read_cpu_info()
    speedup = precision.cached_probe(cpu)[0].speedup if cpu.bf16_flags else None
    choice = precision.choose_dtype("auto", has_cuda=False, cpu_flags=cpu.flags, probe_speedup=speedup,
                                    cpu_auto_bf16=True)
    return ("bf16" if choice.dtype == "bf16_autocast" else "fp32"), choice.reason


ALIGNKIT_DTYPE = {"fp32": "fp32", "bf16": "bf16_autocast"}  # the bench's precision -> deepspeed.dtype


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
    """Record ``loop_start`` when ``trainers.loop.begin`` returns (training steps start then).

    With ``profile``, a ``torch.profiler`` starts there too (``marks["profiler"]``), and stops when
    the run completes."""
    import alignkit.trainers.loop as loop

    marks: dict = {}
    original = loop.begin

    def timed_begin(*a, **k):
        done = original(*a, **k)
        if profile:
            import torch

            marks["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            marks["profiler"].start()
        marks["loop_start"], marks["loop_cpu_start"] = time.time(), time.process_time()
        return done

    if profile:
        original_complete = loop.Loop.complete

        def profiled_complete(*a, **k):
            marks["profiler"].stop()
            marks["loop_cpu_s"] = time.process_time() - marks["loop_cpu_start"]
            return original_complete(*a, **k)

        loop.Loop.complete = profiled_complete

    loop.begin = timed_begin
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
