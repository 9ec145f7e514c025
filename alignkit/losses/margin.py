"""Paired losses that move DPO/SimPO's decision margin: RePO, R-DPO, MODPO.

Slot 0 is chosen, slot 1 rejected; each returns the mean over pairs of a per-pair loss.

* ``repo`` (RePO, Wu et al. 2025, "RePO: ReLU-based Preference Optimization"): reference-free,
  ``relu(gamma - M)`` with ``M = logp_c/len_c - logp_r/len_r`` the SimPO margin of mean log-probs.
  It is SimPO's beta -> infinity limit (the logistic weight collapses to 0/1: a pair whose margin
  already exceeds ``gamma`` gives no gradient), with one hyper-parameter, ``gamma``, which plays
  the role of SimPO's ``gamma / beta``. Lengths are clamped at 1.
* ``rdpo`` (R-DPO, Park et al. 2024, "Disentangling Length from Quality in Direct Preference
  Optimization"): ``-log sigmoid(beta*(h_c - h_r) + alpha*(len_c - len_r))``, ``h = logp - ref_logp``,
  lengths in target tokens (after truncation). The sign: R-DPO maximises ``r(x, y) - alpha*|y|``
  under the KL constraint, so the implicit reward is ``beta*h + alpha*|y|`` and the length gap enters
  the Bradley-Terry logit with a plus. A longer chosen completion then already "explains" part of
  the preference, so the loss pushes less on it: the length is penalised. (MODPO's reference code
  trains its length-penalty objective the same way: a margin reward ``-|y|`` with weight ``alpha``
  gives exactly this logit.) Some re-implementations subtract ``alpha*(len_c - len_r)``, which
  rewards length; ``alpha >= 0`` here always penalises it.
* ``modpo`` (MODPO, Zhou et al. 2023, "Beyond One-Preference-Fits-All Alignment: Multi-Objective
  Direct Preference Optimization"): ``-log sigmoid((beta*(h_c - h_r) - w_aux*(s_c - s_r)) / w)``, as
  in the paper's loss for objective k and ZHZisZZ/modpo's ``modpo_loss``: the pairs express objective k
  (weight ``w``), ``s`` is an auxiliary reward of each completion for the other objective, read from
  ``SequenceLogps.scores`` (paired data's ``chosen_score``/``rejected_score``, or a ``margin`` column,
  which the data layer turns into scores ``[margin, 0]``). One auxiliary objective: ``w_aux`` is
  ``margin_weight``, by default ``1 - w`` (the paper's weights on the simplex). Data without scores,
  or with a missing (nan) score, fails with a ``DataError``; but a record without scores collated
  into a batch whose other records have them arrives with scores 0 (``data/collate.py`` fills
  absent values with zeros), which reads as a tie on the auxiliary objective: score every record.

Metrics: ``rewards/*`` are each loss's implicit reward (the mean log-prob for repo); each loss adds
its own diagnostics under ``<loss>/``.

Left out: RePO++ (the ReLU applied to other losses' margins), RePO's dynamic margin schedules, and
R-DPO on other length measures (characters, words): the length is the trainer's target-token count;
MODPO with several auxiliary rewards (one score per completion is what the data carries) and MODPO's
first stage (training the auxiliary reward model: use the ``rm`` runner and score the data with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.errors import DataError
from alignkit.losses.common import pair_terms, preference_metrics, register_knob_rules, validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("repo", gamma=(lambda v: v >= 0, "RePO's target margin must be >= 0 (e.g. 0.5)"))
register_knob_rules("rdpo", alpha=(lambda v: v >= 0, "the length penalty per token must be >= 0 (0 is plain DPO)"))
register_knob_rules(
    "modpo",
    w=(lambda v: 0 < v <= 1, "the weight of the objective the pairs express must lie in (0, 1]"),
    margin_weight=(lambda v: v >= 0, "the auxiliary reward's weight must be >= 0, or null for 1 - w"),
)


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


@register_loss(view="pairwise", needs_reference=True)
def rdpo(inputs: SequenceLogps, *, beta: float = 0.1, alpha: float = 0.01) -> Out:
    """R-DPO: -log sigmoid(beta * (h_c - h_r) + alpha * (len_c - len_r)), lengths in target tokens.

    ``alpha`` is the length penalty per token (0 gives DPO). The default 0.01 is a conservative start
    chosen here, not the paper's value: at 0.01 a 100-token gap weighs as much as a log-ratio margin of
    10 nats at beta=0.1; tune it with the data's length gaps in mind. ``rdpo/length_gap`` is the mean
    ``len_c - len_r`` of the batch.
    """
    validate_knobs("rdpo", locals())
    t = pair_terms(inputs)
    length_gap = (inputs.lengths[:, 0] - inputs.lengths[:, 1]).to(t.chosen_logps.dtype)
    z = beta * (t.chosen_logratios - t.rejected_logratios) + alpha * length_gap
    metrics = preference_metrics(beta * t.chosen_logratios, beta * t.rejected_logratios,
                                 t.chosen_logps, t.rejected_logps)
    metrics["rdpo/length_gap"] = length_gap.detach().mean()
    return F.softplus(-z).mean(), metrics


def _auxiliary_rewards(inputs: SequenceLogps) -> torch.Tensor:
    """The [G, 2] auxiliary rewards of a pairwise batch, checked: present and finite on every pair."""
    if inputs.scores is None:
        raise DataError(
            "loss 'modpo' needs an auxiliary reward for each completion, but the data has none. Give paired "
            "records chosen_score/rejected_score (or a margin column), e.g. scores from a reward model for "
            "the other objective.", field="scores")
    scores = inputs.scores[:, :2]
    bad = ~torch.isfinite(scores) & inputs.mask[:, :2]
    if bad.any():
        raise DataError(
            f"loss 'modpo': {int(bad.any(-1).sum())} of {scores.shape[0]} pairs in this batch have a missing "
            "(nan) or infinite auxiliary reward. Score every completion, or drop the unscored pairs.",
            field="scores")
    return scores.detach().to(inputs.logps.dtype)


@register_loss(view="pairwise", needs_reference=True)
def modpo(inputs: SequenceLogps, *, beta: float = 0.1, w: float = 0.5, margin_weight: float | None = None) -> Out:
    """MODPO: -log sigmoid((beta*(h_c - h_r) - margin_weight*(s_c - s_r)) / w), s = scores (auxiliary reward).

    ``w`` weighs the objective the pairs express, ``margin_weight`` (default ``1 - w``) the auxiliary
    reward's; ``w=1`` with the default is DPO. ``rewards/*`` are the policy's implicit ``beta * h``;
    ``modpo/aux_gap`` is the mean ``s_c - s_r``.
    """
    validate_knobs("modpo", locals())
    t = pair_terms(inputs)
    scores = _auxiliary_rewards(inputs)
    aux_weight = 1.0 - w if margin_weight is None else margin_weight
    aux_gap = scores[:, 0] - scores[:, 1]
    z = (beta * (t.chosen_logratios - t.rejected_logratios) - aux_weight * aux_gap) / w
    metrics = preference_metrics(beta * t.chosen_logratios, beta * t.rejected_logratios,
                                 t.chosen_logps, t.rejected_logps)
    metrics["modpo/aux_gap"] = aux_gap.mean()
    return F.softplus(-z).mean(), metrics
