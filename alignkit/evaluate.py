"""``alignkit eval``: held-out preference accuracy, judge scores of generations, win-rate vs a baseline.

Given a run directory (its ``final/`` model is evaluated against the run's starting model) or a
model path plus overrides, it measures on held-out data:

* preference accuracy: the fraction of held-out pairs whose implicit reward
  ``(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))`` is positive,
  the reference being the baseline model (as DPO's reward is defined), plus the plain
  likelihood accuracy ``log p(chosen) > log p(rejected)``;
* generations: greedy replies of the model and of the baseline to held-out prompts, scored by the
  reward mix (the demo judge by default); the mean score of each and the win-rate of the model
  (ties count one half). Samples go to ``samples.jsonl``; a summary to ``eval.json``.
* when the prompts carry a reference ``answer`` (the demo task), the judge's components apart for
  both models: ``answer_accuracy`` (the fraction of correct final answers), ``format`` and
  ``concise`` — a judge-score gain can come from format alone, and this says which it was.

One process, plain PyTorch: evaluation needs no optimizer, so no DeepSpeed engine is started.
Left out: reward-model accuracy for ``rm`` runs (their eval metrics are in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignkit.config.compose import compose, load_frozen
from alignkit.errors import UserError


def resolve_target(target: str, overrides: list[str]) -> tuple[DictConfig, str, str]:
    """(config, model to evaluate, baseline model) for a run directory or a model path."""
    path = Path(target)
    if (path / "config.yaml").is_file():
        cfg = load_frozen(path / "config.yaml")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
        final = path / "final"
        if not final.is_dir():
            raise UserError(f"{path} has no final/ model yet (the run did not finish); evaluate a checkpoint's export.")
        return cfg, str(final), str(cfg.model.name_or_path)
    cfg = compose(overrides)
    return cfg, target, str(cfg.model.name_or_path)


def _load(name_or_path: str, cfg: DictConfig):
    from alignkit.models.load import load_causal_lm

    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.name_or_path = name_or_path
    model_cfg.lora.r = 0
    model, tokenizer = load_causal_lm(model_cfg)
    return model.eval(), tokenizer


@torch.no_grad()
def preference_accuracy(model, reference, groups, cfg: DictConfig, pad_id: int) -> dict[str, float]:
    from alignkit.data.batch import sum_per_slot
    from alignkit.models.logprobs import TargetLogProbs
    from alignkit.trainers.common import collate_groups
    from alignkit.trainers.reference import forward_logps

    policy, ref = TargetLogProbs(model), TargetLogProbs(reference)
    implicit, likelihood = [], []
    for i in range(0, len(groups), 8):
        batch = collate_groups(groups[i : i + 8], cfg, pad_id)
        lp = sum_per_slot(forward_logps(policy, batch)["logps"].float(), batch)
        lr = sum_per_slot(forward_logps(ref, batch)["logps"].float(), batch)
        margin = (lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1])
        implicit += (margin > 0).float().tolist()
        likelihood += (lp[:, 0] > lp[:, 1]).float().tolist()
    return {"preference_accuracy": sum(implicit) / len(implicit),
            "likelihood_accuracy": sum(likelihood) / len(likelihood), "pairs": float(len(implicit))}


@torch.no_grad()
def generation_scores(model, tokenizer, prompts, cfg: DictConfig) -> tuple[list[str], list[float]]:
    from alignkit.rl.generation import HFGenerationEngine
    from alignkit.trainers.rollout import build_reward_mix, sample_groups

    engine, mix = HFGenerationEngine(model, tokenizer), build_reward_mix(cfg)
    texts, scores = [], []
    for i in range(0, len(prompts), 16):
        sampled = sample_groups(engine, tokenizer, prompts[i : i + 16], mix, cfg, num_samples=1, seed=0, greedy=True)
        texts += [tokenizer.decode(g.completion_ids[0], skip_special_tokens=True) for g in sampled.groups]
        scores += sampled.rewards.tolist()
    return texts, scores


def answer_metrics(samples: list[dict]) -> dict[str, float]:
    """Mean judge components of the model's and the baseline's replies (samples with an ``answer``)."""
    from alignkit.rewards.judge import score

    rows = [r for r in samples if r.get("answer") is not None]
    if not rows:
        return {}
    out: dict[str, float] = {}
    for side, prefix in (("model", ""), ("baseline", "baseline_")):
        parts = [score(r[side], r["answer"]) for r in rows]
        out[f"{prefix}answer_accuracy"] = sum(p.accuracy for p in parts) / len(parts)
        out[f"{prefix}format"] = sum(p.format for p in parts) / len(parts)
        out[f"{prefix}concise"] = sum(p.concise for p in parts) / len(parts)
    return out


def run_eval(target: str, overrides: list[str], *, baseline: str | None, limit: int, out_dir: str | None) -> dict:
    from alignkit.config.compose import demo_data_dir
    from alignkit.data.config import DataConfig, SourceConfig
    from alignkit.data.pipeline import prepare_data

    cfg, model_path, base_path = resolve_target(target, overrides)
    base_path = baseline or base_path
    model, tokenizer = _load(model_path, cfg)
    reference, _ = _load(base_path, cfg)
    data_cfg = OmegaConf.to_object(cfg.data)
    demo = demo_data_dir()

    def held_out(kind: str) -> DataConfig:
        copy = DataConfig(**{**data_cfg.__dict__})
        copy.train = [SourceConfig(path=str(demo / f"{kind}_eval.jsonl"))]
        copy.eval, copy.eval_fraction, copy.max_records = [], 0.0, limit
        return copy

    result: dict = {"model": model_path, "baseline": base_path}
    pairs = prepare_data(held_out("paired"), "pairwise", tokenizer).train
    result.update(preference_accuracy(model, reference, pairs, cfg, tokenizer.pad_token_id))
    prompts = prepare_data(held_out("prompts"), "prompt", tokenizer).train
    texts, scores = generation_scores(model, tokenizer, prompts, cfg)
    base_texts, base_scores = generation_scores(reference, tokenizer, prompts, cfg)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base_scores)]
    result.update({"judge_score": sum(scores) / len(scores), "baseline_judge_score": sum(base_scores) / len(base_scores),
                   "win_rate": sum(wins) / len(wins), "prompts": float(len(prompts))})
    out = Path(out_dir) if out_dir else (Path(target) / "eval" if (Path(target) / "config.yaml").is_file() else Path("eval"))
    out.mkdir(parents=True, exist_ok=True)
    samples = [{"prompt": tokenizer.decode(prompt.prompt_ids, skip_special_tokens=True),
                "answer": prompt.extra.get("answer"), "model": text, "model_score": score,
                "baseline": base_text, "baseline_score": base_score}
               for prompt, text, score, base_text, base_score in zip(prompts, texts, scores, base_texts, base_scores)]
    result.update(answer_metrics(samples))
    with open(out / "samples.jsonl", "w") as handle:
        handle.writelines(json.dumps(sample) + "\n" for sample in samples)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return result
