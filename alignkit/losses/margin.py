"""Paired losses that move DPO/SimPO's decision margin: RePO, R-DPO, MODPO.

Slot 0 is chosen, slot 1 rejected; each returns the mean over pairs of a per-pair loss.

* ``repo`` (RePO, Wu et al. 2025, "RePO: ReLU-based Preference Optimization"): reference-free,
  ``relu(gamma - M)`` with ``M = logp_c/len_c - logp_r/len_r`` the SimPO margin of mean log-probs.
  It is SimPO's beta -> infinity limit (the logistic weight collapses to 0/1: a pair whose margin
  already exceeds ``gamma`` gives no gradient), with one hyper-parameter, ``gamma``, which plays
  the role of SimPO's ``gamma / beta``. Lengths are clamped at 1.

Metrics: ``rewards/*`` are each loss's implicit reward (the mean log-prob for repo); each loss adds
its own diagnostics under ``<loss>/``.

Left out: RePO++ (the ReLU applied to other losses' margins) and RePO's dynamic margin schedules.
"""

from __future__ import annotations

import torch

from alignkit.losses.common import pair_terms, preference_metrics, register_knob_rules, validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("repo", gamma=(lambda v: v >= 0, "RePO's target margin must be >= 0 (e.g. 0.5)"))


@register_loss(view="pairwise", needs_reference=False)
def repo(inputs: SequenceLogps, *, gamma: float = 0.5) -> Out:
    """RePO: relu(gamma - (logp_c/len_c - logp_r/len_r)), reference-free, one hyper-parameter.

    ``gamma`` is the target margin of mean per-token log-probs (SimPO's ``gamma / beta``). The
    default 0.5 is SimPO's suggested starting ratio (its README), not a value from the RePO paper;
    tune it. ``repo/active`` is the share of pairs still inside the margin (the ones with gradient).
    """
    validate_knobs("repo", locals())
    t = pair_terms(inputs, reference=False)
    chosen, rejected = t.chosen_logps / t.chosen_lengths, t.rejected_logps / t.rejected_lengths
    margin = chosen - rejected
    metrics = preference_metrics(chosen, rejected, t.chosen_logps, t.rejected_logps)
    metrics["repo/active"] = (margin < gamma).float().mean().detach()
    return torch.relu(gamma - margin).mean(), metrics
