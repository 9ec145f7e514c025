#!/usr/bin/env python
"""Write a recipe card (recipes/<recipe>.md + a plot) from a finished run, so every number is measured.

    python scripts/write_card.py runs/demo-dpo_smollm2 [--command "alignkit train recipe=dpo_smollm2"]

Reads the run's config.yaml, metrics.jsonl, eval/answer_summary.json (``scripts/answer_eval.py``:
held-out answer accuracy of the trained and the starting model, Wilson intervals, the paired
difference with its interval -- the card leads with these) and (if ``alignkit eval`` ran)
eval/eval.json, and writes the held-out metrics at every evaluation, the training reward/loss at the start and
end (mean and spread over the first/last 10 steps), the wall and process CPU time, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS_EVAL = ["rewards/accuracy", "rewards/margin", "loss", "reward/mean", "reward/accuracy", "reward/format",
             "reward/concise", "reward/prm", "response_length", "prm/step_accuracy", "prm/first_error_accuracy",
             "prm/positive_rate", "prm/prob_correct"]  # prm/*: a process reward model's held-out steps
KEYS_TRAIN = ["loss", "rewards/accuracy", "rewards/margin", "reward/mean", "reward/winners", "kept_fraction", "kl",
              "response_length", "clip_fraction", "reward/prm", "prm/step_accuracy"]  # reward/winners, kept_fraction: raft


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--command", default=None)
    parser.add_argument("--eval-command", default="python scripts/answer_eval.py --generate RUN_DIR/final "
                        "--baseline-samples BASE/samples.jsonl --out RUN_DIR/eval")
    parser.add_argument("--note", default="", help="a paragraph appended under the run (what to read into it)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    recipe = cfg.get("recipe") or run.name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    wall = train[-1]["time"] - (run / "config.yaml").stat().st_mtime if train else 0.0
    overrides = (run / "overrides.txt").read_text().split() if (run / "overrides.txt").exists() else []
    command = args.command or "alignkit train " + " ".join(o for o in overrides if not o.startswith(("output_dir", "run_name")))
    lines = [f"# {recipe}", "", cfg.get("description", ""), ""]
    summary_path = run / "eval" / "answer_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        m, b, d = summary["model"], summary["baseline"], summary["paired"]
        lines += ["## Held-out answer accuracy (the final answer exactly right)", "",
                  "| | starting model | trained | difference (paired) |", "|---|---|---|---|",
                  f"| answer accuracy, N={m['n']} held-out prompts | {b['answer_accuracy']:.3f} "
                  f"[{b['answer_accuracy_low']:.3f}, {b['answer_accuracy_high']:.3f}] | {m['answer_accuracy']:.3f} "
                  f"[{m['answer_accuracy_low']:.3f}, {m['answer_accuracy_high']:.3f}] | **{d['difference'] * 100:+.1f} points** "
                  f"[{d['difference_low'] * 100:+.1f}, {d['difference_high'] * 100:+.1f}] |"]
        if "both_parsable" in summary:
            bp = summary["both_parsable"]
            lines.append(f"| same, only prompts where both replies hold a number (N={bp['n']}) | {bp['baseline']:.3f} | "
                         f"{bp['model']:.3f} | {bp['difference'] * 100:+.1f} [{bp['difference_low'] * 100:+.1f}, "
                         f"{bp['difference_high'] * 100:+.1f}] |")
        lines += [f"| format (only right answers count) | {b['format']:.3f} | {m['format']:.3f} | |",
                  f"| concise (only right answers count) | {b['concise']:.3f} | {m['concise']:.3f} | |",
                  f"| replies holding any answer | {b['parsable']:.3f} | {m['parsable']:.3f} | |", "",
                  f"95% intervals: Wilson for each rate, Newcombe's paired interval for the difference; "
                  f"{d['only_model_right']} prompts only the trained model got right, {d['only_baseline_right']} only the "
                  "starting model. Greedy replies, the same parser (`alignkit.rewards.answer`) for both.", ""]
        groups = summary.get("by_group", {})
        if groups:
            lines += ["| held-out subset | N | starting | trained |", "|---|---|---|---|"]
            lines += [f"| {name} | {g['n']} | {g['baseline']:.3f} | {g['model']:.3f} |" for name, g in groups.items()]
            lines.append("")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    lines += ["## Recorded run", "",
             "```bash", command, f"{args.eval_command}   # held-out answer accuracy vs the start",
             "```", "",
             f"Machine: {cpu} ({platform.machine()}, {_vector_unit()}), {os.cpu_count()} CPU cores, "
             f"{_dtype(cfg, run)}, 1 process "
             f"(DeepSpeed ZeRO-{cfg['deepspeed']['zero_stage']}); wall time {wall / 60:.1f} min for "
             f"{len(train)} optimizer steps (model load and reference pre-pass included)"
             + (f"; process CPU time {rows[-1]['cpu_time_s'] / 60:.1f} min." if "cpu_time_s" in rows[-1] else "."), ""]
    if evals:
        lines += ["### Held-out evaluation", "", "| metric | " + " | ".join(f"step {e['step']}" for e in evals) + " |",
                  "|---|" + "---|" * len(evals)]
        for key in KEYS_EVAL:
            if key in evals[0]:
                lines.append(f"| {key} | " + " | ".join(f"{e[key]:.3f}" if key in e else "-" for e in evals) + " |")
        lines.append("")
    window = min(10, max(1, len(train) // 2))
    lines += [f"### Training (mean ± std over the first / last {window} steps)", "", "| metric | first | last |", "|---|---|---|"]
    for key in KEYS_TRAIN:
        head = [r[key] for r in train[:window] if key in r]
        tail = [r[key] for r in train[-window:] if key in r]
        if head:
            lines.append(f"| {key} | {spread(head)} | {spread(tail)} |")
    lines.append("")
    eval_json = run / "eval" / "eval.json"
    if eval_json.exists():
        result = json.loads(eval_json.read_text())
        samples = run / "eval" / "samples.jsonl"
        if "answer_accuracy" not in result and samples.exists():  # an eval.json from before these keys
            from alignkit.evaluate import answer_metrics

            result.update(answer_metrics([json.loads(line) for line in samples.read_text().splitlines()]))
        lines += ["### `alignkit eval` against the starting model", "", "| metric | value |", "|---|---|"]
        for key in ("preference_accuracy", "likelihood_accuracy", "judge_score", "baseline_judge_score", "win_rate",
                    "answer_accuracy", "baseline_answer_accuracy", "format", "baseline_format", "pairs", "prompts"):
            if key in result:
                lines.append(f"| {key} | {result[key]:.3f} |")
        lines.append("")
    png = run / "report" / "metrics.png"
    if png.exists():
        target = ROOT / "recipes" / "cards" / f"{recipe}.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(png, target)
        lines += [f"![metrics](cards/{recipe}.png)", ""]
    if args.note:
        lines += ["### Notes", "", args.note, ""]
    (ROOT / "recipes" / f"{recipe}.md").write_text("\n".join(lines))
    print(f"wrote recipes/{recipe}.md")


def _vector_unit() -> str:
    """AMX (bf16 matmuls fast) or not: the two CPU kinds this project's figures come from."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        return "unknown ISA"
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX-512, no AMX" if "avx512f" in flags else "AVX2, no AMX"


def _dtype(cfg: dict, run: Path) -> str:
    """The precision the run trained in: its precision.json (what ``auto`` became, per start), else the config's
    explicit value; a run from before precision.json with ``auto`` is said as such, not guessed."""
    from alignkit.engine.precision import RUN_PRECISION

    record = run / RUN_PRECISION
    if record.exists():
        history = json.loads(record.read_text()).get("history", [])
        resolved = list(dict.fromkeys(str(h.get("resolved")) for h in history)) or ["?"]
        return " then ".join(resolved) + (" (deepspeed.dtype=auto)" if history and history[0].get("requested") == "auto"
                                          else "")
    dtype = str(cfg.get("deepspeed", {}).get("dtype", "auto"))
    return dtype if dtype != "auto" else "deepspeed.dtype=auto (resolved precision not recorded)"


if __name__ == "__main__":
    main()
