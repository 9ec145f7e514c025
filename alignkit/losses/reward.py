"""Reward-model objectives: Bradley-Terry on paired data.

For the reward runner, ``SequenceLogps.logps`` holds the reward model's scalar score of each
completion (``[G, 2]``: chosen, rejected) rather than log-probs; ``scores`` optionally holds the
per-completion scores whose gap is the margin. The loss is
``-log sigmoid(r_c - r_r - margin_coef * margin) + center_coef * mean((r_c + r_r)^2)``
(margin as in Llama-2's reward model and TRL's ``margin`` column; centering as TRL's
``center_rewards_coefficient``). Left out: ensembles and listwise (Plackett-Luce) reward models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.registry import SequenceLogps, register_loss


@register_loss(view="pairwise", runner="reward", needs_reference=False)
def bradley_terry(inputs: SequenceLogps, *, margin_coef: float = 0.0, center_coef: float = 0.0):
    """Bradley-Terry reward-model loss on the scores of chosen vs rejected (optional margin, centering)."""
    chosen, rejected = inputs.logps[:, 0], inputs.logps[:, 1]
    margin = torch.zeros_like(chosen)
    if margin_coef and inputs.scores is not None:
        margin = (inputs.scores[:, 0] - inputs.scores[:, 1]).to(chosen.dtype)
    loss = -F.logsigmoid(chosen - rejected - margin_coef * margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    diff = (chosen - rejected).detach()
    metrics = {
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margin": diff.mean(),
        "rewards/accuracy": (diff > 0).float().mean(),
    }
    return loss, metrics
