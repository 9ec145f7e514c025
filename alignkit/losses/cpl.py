"""CPL: Contrastive Preference Learning (Hejna et al. 2023), on whole completions, reference-free.

CPL models preferences by regret: the preferred segment is the one with the larger sum of optimal
advantages, and under max-entropy RL the optimal advantage is ``alpha * log pi(a|s)``. The loss is a
contrastive (logistic) loss on those sums with a conservative bias ``lambda`` in (0, 1] on the
dispreferred one:

    -log [ exp(alpha * S_c) / (exp(alpha * S_c) + exp(lambda * alpha * S_r)) ]
        = -log sigmoid(alpha * S_c - lambda * alpha * S_r),

with ``S = sum_t log pi(a_t | s_t)``; for a single-turn completion ``S`` is the completion's summed
log-prob (slot 0 chosen, slot 1 rejected). This is jhejna/cpl's ``biased_bce_with_logits`` on
``adv = alpha * lp`` summed over the segment, with ``bias`` its ``contrastive_bias``; the defaults
``alpha=0.1, contrastive_bias=0.5`` are that code's MetaWorld configs (its class defaults are 1.0 and
1.0, which make CPL the CPO preference term at ``beta=alpha``). The mean over pairs is returned;
``rewards/*`` are the advantages ``alpha * S`` and ``rewards/accuracy`` compares them unbiased, as the
reference code's accuracy.

Left out: the per-step discount (``gamma^t``; the reference code uses none either), CPL's
score-ranked variant (``biased_bce_with_scores``; listwise data) and its BC regulariser over both
completions (``bc_data="all"``): combine ``cpl`` with ``sft`` for BC on the chosen ones (``"pos"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.common import pair_terms, preference_metrics, register_knob_rules, validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules(
    "cpl",
    alpha=(lambda v: v > 0, "CPL's temperature must be > 0 (e.g. 0.1)"),
    contrastive_bias=(lambda v: 0 < v <= 1, "the conservative bias lambda must lie in (0, 1] (1 = unbiased)"),
)


@register_loss(view="pairwise", needs_reference=False)
def cpl(inputs: SequenceLogps, *, alpha: float = 0.1, contrastive_bias: float = 0.5) -> Out:
    """CPL: -log sigmoid(alpha * logp_c - contrastive_bias * alpha * logp_r), summed log-probs, no reference."""
    validate_knobs("cpl", locals())
    t = pair_terms(inputs, reference=False)
    advantage_c, advantage_r = alpha * t.chosen_logps, alpha * t.rejected_logps
    z = advantage_c - contrastive_bias * advantage_r
    metrics = preference_metrics(advantage_c, advantage_r, t.chosen_logps, t.rejected_logps)
    return F.softplus(-z).mean(), metrics
