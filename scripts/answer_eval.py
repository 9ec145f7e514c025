#!/usr/bin/env python
"""Held-out answer accuracy of a trained model vs its starting model, with 95% intervals.

    python scripts/answer_eval.py runs/demo-...            # after `alignkit eval RUN --n 300`
    python scripts/answer_eval.py --generate MODEL [--n 300] [--out DIR]   # one model alone (greedy)
    python scripts/answer_eval.py --generate RUN/final --baseline-samples BASE/samples.jsonl --out RUN/eval

The first form reads ``RUN/eval/samples.jsonl`` (greedy replies of the model and of the baseline to
the same held-out prompts, written by ``alignkit eval``), scores both sides with the *same* parser
(``alignkit.rewards.answer.is_correct``, through the judge) and writes ``RUN/eval/answer_summary.json``:

* answer accuracy of each model with its Wilson 95% interval, N the number of prompts;
* the paired difference (model - baseline) with Newcombe's 95% interval for paired proportions
  (method 10, Wilson-based) and the discordant counts (prompts only the model / only the
  baseline got right);
* beside it, never instead of it: the judge's format and concise components, the share of replies
  that hold any answer at all (parsable), the accuracy on the prompts where *both* replies are
  parsable (a gain there is not a parsing gain), and accuracy by the asked fact's position and by
  the number of facts (joined with ``data/demo/prompts_eval.jsonl`` by prompt text).

It prints the three-line summary that ``scripts/demo.sh`` ends with. ``--generate`` measures one
model's greedy replies with the library's generation engine (the base model before any run);
with ``--baseline-samples`` (an earlier ``--generate`` of the starting model: greedy decoding is
deterministic, so its replies need not be generated again) the two are paired prompt by prompt.
Left out: sampling-based metrics (pass@k) and anything not on the demo task's prompts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
Z = 1.959963984540054
EVAL_MAX_NEW_TOKENS = 48  # the library default, what `alignkit eval` uses for the offline recipes


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of k successes in n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(model: list[bool], baseline: list[bool]) -> dict[str, float]:
    """p_model - p_baseline on the same prompts, Newcombe's (1998) method-10 95% interval."""
    n = len(model)
    both = sum(m and b for m, b in zip(model, baseline))
    only_model = sum(m and not b for m, b in zip(model, baseline))
    only_base = sum(b and not m for m, b in zip(model, baseline))
    neither = n - both - only_model - only_base
    p1, p2 = (both + only_model) / n, (both + only_base) / n
    l1, u1 = wilson(both + only_model, n)
    l2, u2 = wilson(both + only_base, n)
    denom = (both + only_model) * (neither + only_base) * (both + only_base) * (neither + only_model)
    phi = (both * neither - only_model * only_base) / math.sqrt(denom) if denom > 0 else 0.0
    delta = p1 - p2
    low = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return {"difference": delta, "difference_low": max(-1.0, low), "difference_high": min(1.0, high),
            "only_model_right": only_model, "only_baseline_right": only_base}


def _prompt_info() -> dict[str, dict]:
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "prompts_eval.jsonl").read_text().splitlines()]
    return {r["prompt"][-1]["content"]: r for r in rows}


def _lookup(prompt: str, info: dict[str, dict]) -> dict:
    for content, row in info.items():
        if content in prompt:
            return row
    return {}


def side_metrics(replies: list[str], answers: list[str]) -> dict[str, float]:
    from alignkit.rewards.judge import extract_answer, score

    parts = [score(r, a) for r, a in zip(replies, answers)]
    n = len(parts)
    k = int(sum(p.accuracy for p in parts))
    low, high = wilson(k, n)
    return {"answer_accuracy": k / n, "answer_accuracy_low": low, "answer_accuracy_high": high, "n": n,
            "format": sum(p.format for p in parts) / n, "concise": sum(p.concise for p in parts) / n,
            "parsable": sum(extract_answer(r) is not None for r in replies) / n}


def summarise(samples: list[dict]) -> dict:
    from alignkit.rewards.judge import accuracy_score, extract_answer

    rows = [s for s in samples if s.get("answer") is not None]
    answers = [s["answer"] for s in rows]
    out: dict = {"model": side_metrics([s["model"] for s in rows], answers),
                 "baseline": side_metrics([s["baseline"] for s in rows], answers)}
    right_m = [bool(accuracy_score(s["model"], s["answer"])) for s in rows]
    right_b = [bool(accuracy_score(s["baseline"], s["answer"])) for s in rows]
    out["paired"] = paired_difference(right_m, right_b)
    both_parse = [i for i, s in enumerate(rows) if extract_answer(s["model"]) is not None and extract_answer(s["baseline"]) is not None]
    if both_parse:
        out["both_parsable"] = {"n": len(both_parse), **paired_difference([right_m[i] for i in both_parse], [right_b[i] for i in both_parse]),
                                "model": sum(right_m[i] for i in both_parse) / len(both_parse),
                                "baseline": sum(right_b[i] for i in both_parse) / len(both_parse)}
    info = _prompt_info()
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(rows):
        row = _lookup(s["prompt"], info)
        if row:
            groups.setdefault(f"position {row['position'] + 1} of {row['facts']}", []).append(i)
            groups.setdefault(f"{row['facts']} facts", []).append(i)
            groups.setdefault(f"task {row['task']}", []).append(i)
    out["by_group"] = {name: {"n": len(ix), "model": sum(right_m[i] for i in ix) / len(ix),
                              "baseline": sum(right_b[i] for i in ix) / len(ix)} for name, ix in sorted(groups.items())}
    return out


def headline(summary: dict, what: str, where: str) -> list[str]:
    m, b, d = summary["model"], summary["baseline"], summary["paired"]
    return [
        f"Trained: {what}.",
        f"Held-out answer accuracy (final answer exactly right, N={m['n']} unseen prompts): "
        f"{b['answer_accuracy']:.1%} -> {m['answer_accuracy']:.1%}, a change of {d['difference'] * 100:+.1f} points "
        f"(95% CI {d['difference_low'] * 100:+.1f} to {d['difference_high'] * 100:+.1f}); "
        f"format {b['format']:.2f} -> {m['format']:.2f} (format counts only for right answers).",
        f"Report: {where}",
    ]


def held_out_engine(model_path: str, n: int) -> tuple:
    """``(engine, tokenizer, prompts)``: the library's HF generation engine on ``model_path`` (no LoRA) and the
    first ``n`` held-out demo prompts, prepared as the SmolLM2 presets prepare their data."""
    from omegaconf import OmegaConf

    from alignkit.config.compose import compose
    from alignkit.data.config import SourceConfig
    from alignkit.data.pipeline import prepare_data
    from alignkit.models.load import load_causal_lm
    from alignkit.rl.generation import HFGenerationEngine

    cfg = compose(["recipe=dpo_smollm2"])
    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.name_or_path, model_cfg.lora.r = model_path, 0
    model, tokenizer = load_causal_lm(model_cfg)
    model.eval()
    data_cfg = OmegaConf.to_object(cfg.data)
    data_cfg.train = [SourceConfig(path=str(ROOT / "data" / "demo" / "prompts_eval.jsonl"))]
    data_cfg.eval, data_cfg.eval_fraction, data_cfg.max_records = [], 0.0, n
    prompts = prepare_data(data_cfg, "prompt", tokenizer).train
    return HFGenerationEngine(model, tokenizer), tokenizer, prompts


def generate(model_path: str, n: int) -> list[dict]:
    """Greedy replies (up to 48 new tokens) of one model to the first ``n`` held-out prompts, with the library's engine."""
    import torch

    engine, tokenizer, prompts = held_out_engine(model_path, n)
    texts = []
    with torch.no_grad():
        for i in range(0, len(prompts), 16):
            chunk = prompts[i : i + 16]
            rollouts = sorted(engine.generate([p.prompt_ids for p in chunk], num_samples=1, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                              temperature=0.0, seed=0), key=lambda r: r.prompt_index)
            texts += [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in rollouts]
    return [{"prompt": tokenizer.decode(p.prompt_ids, skip_special_tokens=True), "answer": p.extra.get("answer"),
             "model": t, "baseline": t} for p, t in zip(prompts, texts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--generate", metavar="MODEL", help="measure this model alone (e.g. the base model folder)")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--baseline-samples", type=Path, default=None, help="samples.jsonl of the starting model")
    args = parser.parse_args()
    if args.generate:
        samples = generate(args.generate, args.n)
        if args.baseline_samples:
            base = {s["prompt"]: s["model"] for s in map(json.loads, args.baseline_samples.read_text().splitlines())}
            missing = [s["prompt"] for s in samples if s["prompt"] not in base]
            if missing:
                raise SystemExit(f"{args.baseline_samples} has no reply to {len(missing)} of the prompts, e.g. {missing[0][-80:]!r}")
            for s in samples:
                s["baseline"] = base[s["prompt"]]
        out = args.out or Path("eval-base")
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
        summary = summarise(samples)
        (out / "answer_summary.json").write_text(json.dumps(summary, indent=1))
        if args.baseline_samples:
            for line in headline(summary, args.generate, f"{out}/answer_summary.json"):
                print(line)
        m = summary["model"]
        print(f"{args.generate}: answer accuracy {m['answer_accuracy']:.3f} "
              f"[{m['answer_accuracy_low']:.3f}, {m['answer_accuracy_high']:.3f}] N={m['n']}, format {m['format']:.3f}, "
              f"parsable {m['parsable']:.3f}")
        for name, g in summary["by_group"].items():
            print(f"  {name:<16} n={g['n']:<4} {g['baseline']:.3f} -> {g['model']:.3f}")
        return
    if not args.run_dir:
        parser.error("give a run directory (after `alignkit eval RUN`) or --generate MODEL")
    run = Path(args.run_dir)
    samples_path = run / "eval" / "samples.jsonl"
    if not samples_path.is_file():
        raise SystemExit(f"{samples_path} not found: run `alignkit eval {run} --n {args.n}` first")
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()]
    summary = summarise(samples)
    (run / "eval" / "answer_summary.json").write_text(json.dumps(summary, indent=1))
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    steps = (cfg.get("trainer") or {}).get("max_steps")
    what = f"{cfg.get('recipe', run.name)}: {cfg.get('description', '')}" + (f", {steps} optimizer steps" if steps else "")
    for line in headline(summary, what, f"{run}/report/report.md, numbers in {run}/eval/answer_summary.json"):
        print(line)


if __name__ == "__main__":
    main()
