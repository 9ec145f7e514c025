"""The measures of ``alignkit eval``, each with N and a 95% interval (``alignkit.stats``).

Preference accuracy of held-out pairs (implicit reward against the baseline, and likelihood), the
reference answer of a record, plain answer accuracy of saved samples (``answer_metrics``, read by
``scripts/write_card.py``), and the interval and paired difference of a reward's values (a 0/1
reward as a proportion, any other as a mean). Left out: loading models and writing files.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.data.batch import TokenizedGroup
from alignkit.errors import DataError
from alignkit.evaluate.scoring import JUDGE_PARTS
from alignkit.stats import Interval, mean_interval, paired_difference, paired_mean_difference, wilson


@torch.no_grad()
def preference_accuracy(model: torch.nn.Module, reference: torch.nn.Module, groups: list[TokenizedGroup],
                        cfg: DictConfig, pad_id: int) -> dict[str, Interval]:
    """The share of held-out pairs whose implicit reward margin against ``reference`` is positive, and
    whose chosen log-likelihood exceeds the rejected one (Wilson intervals); batches in ``cfg.data``'s layout."""
    from alignkit.data.batch import sum_per_slot
    from alignkit.data.collate import collate
    from alignkit.models.logprobs import TargetLogProbs, forward_logps

    device = next(model.parameters()).device
    policy, ref = TargetLogProbs(model), TargetLogProbs(reference)
    implicit, likelihood = [], []
    for i in range(0, len(groups), 8):
        batch = collate(groups[i : i + 8], layout=cfg.data.layout, pad_token_id=pad_id,
                        max_tokens_per_row=cfg.data.max_tokens_per_row).to(device)
        lp = sum_per_slot(forward_logps(policy, batch)["logps"].float(), batch)
        lr = sum_per_slot(forward_logps(ref, batch)["logps"].float(), batch)
        margin = (lp[:, 0] - lr[:, 0]) - (lp[:, 1] - lr[:, 1])
        implicit += (margin > 0).tolist()
        likelihood += (lp[:, 0] > lp[:, 1]).tolist()
    return {"preference_accuracy": wilson(sum(implicit), len(implicit)),
            "likelihood_accuracy": wilson(sum(likelihood), len(likelihood))}


def reference_answer(group: TokenizedGroup) -> Any:
    """The record's reference answer (``alignkit.rewards.math.reference_of``), None when it has none."""
    from alignkit.rewards.math import reference_of

    try:
        return reference_of({k: [v] for k, v in group.extra.items()}, 0)
    except DataError:
        return None

def answer_metrics(samples: list[dict]) -> dict[str, float]:
    """Plain answer accuracy of the model's and the baseline's replies (samples with an ``answer``),
    scored with the same parser (``alignkit.rewards.answer.is_correct``) on both sides, and beside it
    the demo judge's ``format`` and ``concise`` means (for ``scripts/write_card.py`` and old samples)."""
    from alignkit.rewards.answer import is_correct

    from alignkit.rewards.registry import resolve_reward, reward_names

    rows = [r for r in samples if r.get("answer") is not None]
    out: dict[str, float] = {}
    if not rows:
        return out
    parts = [name for name in JUDGE_PARTS if name in reward_names()]  # the demo judge's format and brevity
    answers = [r["answer"] for r in rows]
    for side, prefix in (("model", ""), ("baseline", "baseline_")):
        if all(side in r and r[side] is not None for r in rows):
            replies = [r[side] for r in rows]
            out[f"{prefix}answer_accuracy"] = sum(is_correct(c, a) for c, a in zip(replies, answers)) / len(rows)
            for name in parts:
                values = resolve_reward(name)([""] * len(rows), replies, answer=answers)
                out[f"{prefix}{name}"] = sum(values) / len(values)
    return out

def _binary(values: list[float]) -> bool:
    return bool(values) and all(v in (0.0, 1.0) for v in values)

def reward_interval(values: list[float]) -> Interval:
    """A 0/1 reward is a proportion (Wilson); any other a mean (normal interval); NaN (not applicable) left out."""
    kept = [v for v in values if not math.isnan(v)]
    return wilson(sum(kept), len(kept)) if _binary(kept) else mean_interval(kept)

def reward_difference(model: list[float], baseline: list[float]) -> Interval:
    if _binary(model) and _binary(baseline):
        return paired_difference(model, baseline)
    return paired_mean_difference(model, baseline)
