"""Pieces shared by the side-by-side benchmarks (bench_dpo.py, bench_grpo.py).

``run_worker`` starts ``python SCRIPT --worker TOOL ...`` in a fresh process (so each tool's peak
RSS and warm-up are its own) and returns the JSON line it prints; ``time_alignkit_loop`` patches
the trainer so the worker knows when the training loop started (after model load, data and the
reference pre-pass, which the DPO bench times separately); ``step_times`` turns the loop start and
the metrics' timestamps into per-step seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def run_worker(script: str, tool: str, argv: list[str]) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, script, "--worker", tool, *argv], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"{tool} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def time_alignkit_loop() -> dict[str, float]:
    """Record ``loop_start`` when ``trainers.common.begin`` returns (training steps start then)."""
    import alignkit.trainers.common as common

    marks: dict[str, float] = {}
    original = common.begin

    def timed_begin(*a, **k):
        done = original(*a, **k)
        marks["loop_start"] = time.time()
        return done

    common.begin = timed_begin
    return marks


def step_times(loop_start: float, metrics_path) -> tuple[list[float], dict]:
    """Seconds of each train step from the metrics' timestamps, and the first train record."""
    records = [json.loads(line) for line in open(metrics_path).read().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    stamps = [loop_start] + [r["time"] for r in train]
    return [b - a for a, b in zip(stamps, stamps[1:])], train[0]


def alternate(tools: tuple[str, ...], repeats: int, run, describe) -> dict[str, list[dict]]:
    """Run each tool once per repetition, alternating (so load drift hits both alike); print each run."""
    results: dict[str, list[dict]] = {tool: [] for tool in tools}
    for repeat in range(repeats):
        for tool in tools:
            results[tool].append(run(tool))
            print(f"  repeat {repeat + 1} {tool:<8} {describe(results[tool][-1])}", flush=True)
    return results
