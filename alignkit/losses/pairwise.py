"""The pairwise preference model's objective: binary cross-entropy on P(a > b) (``runner=pm``).

For the pm runner, ``SequenceLogps.logps`` holds ``[G, 2]`` logits of the pairwise model: slot 0 is
the logit that the first-listed response wins when the input lists (chosen, rejected), slot 1 the
same logit for the input listing (rejected, chosen) (``alignkit.models.pair_input``). The targets
of the two orders are ``(1, 0)`` for a preference and ``(0.5, 0.5)`` for a tie: a pair whose
``scores`` (the record's ``[score_chosen, score_rejected]``, when it has them) are equal
(``ties``). The loss is the mean over the existing slots of
``-(t * log sigmoid(s) + (1 - t) * log sigmoid(-s))`` (PairRM's symmetric training: each pair in
both orders, so the model is antisymmetric in expectation; Jiang et al. 2023, LLM-Blender).

Metrics: ``rewards/accuracy`` (the share of decisive pairs whose order-averaged
``P = (sigmoid(s0) + 1 - sigmoid(s1)) / 2`` is on the preferred side of 0.5; ties are left out),
``pm/antisymmetry`` (mean ``|sigmoid(s0) + sigmoid(s1) - 1|``, 0 for a perfectly antisymmetric
model), ``pm/prob_chosen`` (mean ``P``), ``rewards/chosen`` / ``rewards/rejected`` /
``rewards/margin`` (mean ``s0``, mean ``s1``, mean ``s0 - s1``). Left out: label smoothing and
PairRM's multi-candidate ranking aggregation (the judge in ``alignkit/rl/judges.py`` compares pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.registry import SequenceLogps, register_loss


def ties(scores: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``[G]`` bool: the pairs whose two scores are equal (none without scores)."""
    if scores is None:
        return torch.zeros(groups, dtype=torch.bool)
    return scores[:, 0] == scores[:, 1]


@register_loss(view="pairwise", runner="pm", needs_reference=False)
def pairwise_bce(inputs: SequenceLogps):
    """BCE of the pairwise model's logits (both orders of each pair) against their targets (0.5 = tie)."""
    logits = inputs.logps
    mask = inputs.mask.to(logits.dtype)
    first = torch.where(ties(inputs.scores, logits.shape[0]).to(logits.device), 0.5, 1.0).to(logits.dtype)
    targets = torch.stack([first, 1.0 - first], dim=1)
    per_slot = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = (per_slot * mask).sum() / mask.sum().clamp(min=1.0)
    s0, s1 = logits[:, 0].detach(), logits[:, 1].detach()
    p0, p1 = torch.sigmoid(s0), torch.sigmoid(s1)
    prob = (p0 + 1.0 - p1) / 2.0  # P(first-listed of order 0 wins), order-averaged
    t0, t1 = targets[:, 0].detach(), targets[:, 1].detach()
    decisive = t0 != t1
    right = torch.where(t0 > t1, prob > 0.5, prob < 0.5) & decisive
    metrics = {
        "rewards/chosen": s0.mean(),
        "rewards/rejected": s1.mean(),
        "rewards/margin": (s0 - s1).mean(),
        "rewards/accuracy": right.float().sum() / decisive.float().sum().clamp(min=1.0),
        "pm/antisymmetry": (p0 + p1 - 1.0).abs().mean(),
        "pm/prob_chosen": prob.mean(),
    }
    return loss, metrics
