"""``alignkit eval``'s command: load the data (before any model), the model and its baseline, measure, write.

``run_eval`` reads the held-out records ``resolve_target`` names (pairs for preference accuracy,
unique prompts for greedy replies), loads the model and the baseline on the GPU when there is one,
computes the measures, and writes ``samples.jsonl`` and ``eval.json`` (never through a link inside a
run directory); ``format_table`` is the printed summary. One process, plain PyTorch, no DeepSpeed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from alignkit.config.schema import GenerationConfig, section
from alignkit.errors import ConfigError, DataError
from alignkit.evaluate.measures import preference_accuracy, reference_answer, reward_difference, reward_interval
from alignkit.evaluate.scoring import build_scoring, generate
from alignkit.evaluate.target import EvalTarget, resolve_target
from alignkit.stats import Interval, mean_interval, paired_difference, wilson


def eval_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

def _load(name_or_path: str, cfg: DictConfig, device: torch.device):
    from alignkit.models.load import load_causal_lm

    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.name_or_path = name_or_path
    model_cfg.lora.r = 0
    model, tokenizer = load_causal_lm(model_cfg, dtype=cfg.deepspeed.dtype)
    return model.eval().to(device), tokenizer

def _tokenizer(name_or_path: str, cfg: DictConfig):
    from alignkit.models.load import load_tokenizer_for

    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.name_or_path = name_or_path
    return load_tokenizer_for(model_cfg)

def _records(target: EvalTarget, view: str, tokenizer, limit: int) -> list:
    from alignkit.data.pipeline import prepare_data

    prepared = prepare_data(OmegaConf.to_object(target.cfg.data), view, tokenizer)
    groups = prepared.train if target.use_train_split else prepared.eval
    return list(groups[:limit]) if limit > 0 else list(groups)

def _unique_prompts(groups: list) -> tuple[list, int]:
    seen, out = set(), []
    for g in groups:
        key = tuple(g.prompt_ids)
        if key not in seen:
            seen.add(key)
            out.append(g)
    return out, len(groups) - len(out)

def run_eval(target: str, overrides: list[str], *, baseline: str | None, limit: int, out_dir: str | None) -> dict:
    plan = resolve_target(target, overrides, baseline)
    device = eval_device()
    tokenizer = _tokenizer(plan.model, plan.cfg)
    try:  # the data is read (and any problem in it reported) before a model loads
        pairs = _records(plan, "pairwise", tokenizer, limit)
    except ConfigError:  # sft / prompt data: no pairs to rank
        pairs = []
    all_prompts = _records(plan, "prompt", tokenizer, 0)
    model, tokenizer = _load(plan.model, plan.cfg, device)
    reference = _load(plan.baseline, plan.cfg, device)[0] if plan.baseline else None
    metrics: dict[str, Interval] = {}
    result: dict[str, Any] = {"model": plan.model, "baseline": plan.baseline, "data": plan.data_source,
                              "device": str(device)}

    if pairs and reference is not None:
        metrics.update(preference_accuracy(model, reference, pairs, plan.cfg, tokenizer.pad_token_id))
    prompts, duplicates = _unique_prompts(all_prompts)
    prompts = prompts[:limit] if limit > 0 else prompts
    if duplicates:
        plan.notes.append(f"{duplicates} duplicate prompts scored once")
    if not prompts:
        raise DataError(f"no prompts to evaluate on in {plan.data_source}")
    mix = build_scoring(plan, prompts[0], tokenizer)
    if plan.cfg.reward.model:
        plan.notes.append(f"the run's reward model ({plan.cfg.reward.model}) is not scored by eval: reward.fns only")
    generation = section(plan.cfg, "generation", GenerationConfig)
    texts, parts, total = generate(model, tokenizer, prompts, generation, mix)
    base_texts, base_parts, base_total = (generate(reference, tokenizer, prompts, generation, mix) if reference
                                          is not None else (None, {}, []))

    golds = [reference_answer(p) for p in prompts]
    with_ref = [i for i, g in enumerate(golds) if g is not None]
    correct = base_correct = None
    if with_ref:
        from alignkit.rewards.answer import is_correct

        correct = [is_correct(texts[i], golds[i]) for i in with_ref]
        metrics["answer_accuracy"] = wilson(sum(correct), len(correct))
        if base_texts is not None:
            base_correct = [is_correct(base_texts[i], golds[i]) for i in with_ref]
            metrics["baseline_answer_accuracy"] = wilson(sum(base_correct), len(base_correct))
            metrics["answer_accuracy_diff"] = paired_difference(correct, base_correct)
        if len(with_ref) < len(prompts):
            plan.notes.append(f"{len(prompts) - len(with_ref)} of {len(prompts)} prompts carry no reference answer: "
                              "left out of answer accuracy")
    else:
        plan.notes.append("no prompt carries a reference answer ('answer', 'reward_model.ground_truth', "
                          "'ground_truth', 'solution' or OpenRLHF's 'label' column): answer accuracy not measured")
    for name, values in parts.items():
        metrics[f"reward/{name}"] = reward_interval(values)
        if name in base_parts:
            metrics[f"baseline_reward/{name}"] = reward_interval(base_parts[name])
            pairs_ok = [(a, b) for a, b in zip(values, base_parts[name]) if not (math.isnan(a) or math.isnan(b))]
            metrics[f"reward/{name}_diff"] = reward_difference([a for a, _ in pairs_ok], [b for _, b in pairs_ok])
    if total and base_total:
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(total, base_total)]
        metrics["win_rate"] = mean_interval(wins, bounds=(0.0, 1.0))

    result["metrics"] = {k: v.as_dict() for k, v in metrics.items()}
    result["metrics"].get("answer_accuracy_diff", {}).update(method="Newcombe paired (method 10)")
    # the plain values at the top level too (read by scripts/write_card.py and earlier eval.json readers)
    legacy = {"judge_score": "reward/judge", "baseline_judge_score": "baseline_reward/judge",
              "format": "reward/format", "baseline_format": "baseline_reward/format",
              "concise": "reward/concise", "baseline_concise": "baseline_reward/concise"}
    for key, interval in metrics.items():
        result[key] = interval.rate
    for old, new in legacy.items():
        if new in metrics:
            result[old] = metrics[new].rate
    result["prompts"] = float(len(prompts))
    if pairs and reference is not None:
        result["pairs"] = float(len(pairs))
    result["notes"] = plan.notes

    out = Path(out_dir) if out_dir else (plan.run_dir / "eval" if plan.run_dir is not None else Path("eval"))
    from alignkit import runfiles

    if out_dir:
        out.mkdir(parents=True, exist_ok=True)  # typed by the user
    else:
        runfiles.make_dir(out, "eval folder")  # a planted link in a run directory is refused
    from alignkit.rewards.answer import gold_answer

    samples = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True), "answer": golds[i],
               "reference": gold_answer(golds[i]), "model": texts[i], "model_score": total[i] if total else None}
        if with_ref and golds[i] is not None:
            row["model_correct"] = correct[with_ref.index(i)]
        if base_texts is not None:
            row.update(baseline=base_texts[i], baseline_score=base_total[i] if base_total else None)
            if base_correct is not None and golds[i] is not None:
                row["baseline_correct"] = base_correct[with_ref.index(i)]
        samples.append(row)
    runfiles.write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    runfiles.write_text(out / "eval.json", json.dumps(result, indent=1))
    result["out_dir"] = str(out)
    result["intervals"] = metrics
    return result

def format_table(result: dict) -> list[str]:
    """The printed summary: answer accuracy first, then the other rates beside it, each with N and its interval."""
    metrics: dict[str, Interval] = result["intervals"]
    order = ["answer_accuracy", "baseline_answer_accuracy", "answer_accuracy_diff"]
    order += [k for k in metrics if k.startswith(("reward/", "baseline_reward/")) and k not in order]
    order += [k for k in ("win_rate", "preference_accuracy", "likelihood_accuracy") if k in metrics]
    lines = [f"model     {result['model']}", f"baseline  {result['baseline'] or '(none: --baseline MODEL to compare)'}",
             f"data      {result['data']}", f"device    {result['device']}", "",
             f"{'metric':<30} {'value':>8}  {'95% interval':<19} {'N':>6}"]
    for key in order:
        if key not in metrics:
            continue
        i = metrics[key]
        sign = "+" if key.endswith("_diff") else ""
        interval, value = f"[{i.ci_low:{sign}.3f}, {i.ci_high:{sign}.3f}]", f"{i.rate:{sign}.3f}"
        if math.isnan(i.ci_low) or math.isnan(i.ci_high):
            interval = "n/a (N < 2)" if i.n < 2 else "n/a"  # a normal interval needs a spread
        lines.append(f"{key:<30} {value:>8}  {interval:<19} {i.n:>6}")
    if "answer_accuracy_diff" in metrics:
        lines.append("(answer_accuracy_diff: model - baseline on the same prompts, Newcombe's paired interval; "
                     "rates: Wilson; rewards and win rate: mean +- 1.96 s/sqrt(N))")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    lines.append(f"samples and eval.json in {result['out_dir']}")
    return lines
