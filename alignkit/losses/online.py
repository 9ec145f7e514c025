"""Losses of the two online preference runners that sample against the reference: ``xpo`` and ``nash_md``.

``xpo`` (Xie et al. 2024, "Exploratory Preference Optimization", arXiv 2405.21046; TRL's
``XPOTrainer``): each pair is one completion sampled from the policy and one from the reference,
ordered chosen/rejected by the reward; the loss is the pair's DPO loss (``loss_type="sigmoid"``)
or IPO loss (``"ipo"``) plus ``alpha * log pi(y_ref)``, the policy's summed log-prob of the
*reference* sample (whichever slot it landed in), averaged over pairs. Minimising it pushes mass
away from what the reference already says: the paper's optimism term (its Algorithm 1 minimises
``alpha * sum log pi(y~) - sum log sigma(...)`` with ``y~ ~ pi_ref``); TRL adds
``self.alpha * model_logprobs_ref_data_sum`` to the DPO loss, the same sign. Which slot holds the
reference sample is ``SequenceLogps.from_reference`` [G, 2] (the xpo runner fills it).
Defaults: TRL's ``beta=0.1``, ``alpha=1e-5``, ``loss_type="sigmoid"``. The preference part is
alignkit's own ``dpo`` / ``ipo`` with that beta, so ``alpha=0`` is exactly online DPO's loss.
Deliberate difference from TRL's XPOTrainer: its IPO variant uses unnormalised sums,
``(h_c - h_r - 1/(2 beta))^2``; alignkit's ``ipo`` normalises by length as TRL's DPOTrainer does.
Metrics: ``loss/preference`` and ``loss/exploration`` (TRL's ``loss/dpo`` and ``loss/xpo``;
``loss/xpo`` is alignkit's name of the whole loss part), ``logps/reference_sample``, and the
preference metrics of the pair (``rewards/*``, ``logps/chosen``, ``logps/rejected``).

``nash_md`` (Munos et al. 2023, "Nash Learning from Human Feedback", arXiv 2312.00886; TRL's
``NashMDTrainer``): a ``RolloutLogps`` of completions sampled from the policy, each compared
with one sampled from the geometric mixture of policy and reference; the runner puts
``P - 0.5`` in ``advantages`` (P: the probability that the policy's sample beats the mixture's,
``rl.preference``). Per sequence, exactly TRL's ``_compute_losses``::

    score = (P - 0.5) * sum_t log pi_t                      # REINFORCE, 0.5 the control variate
    kl    = sum_t stopgrad(log pi_t - log ref_t) * log pi_t  # its gradient: the KL's score function
    loss  = mean over sequences of (beta * kl - score)

Default ``beta=0.1`` (TRL's OnlineDPOConfig, which NashMDConfig extends). ``beta=0`` reads no
reference. Metrics: ``loss/score`` (mean ``score``, TRL's name), ``kl`` (mean summed log-ratio
``sum_t (log pi_t - log ref_t)`` of a sequence, TRL's ``loss/kl``).

Left out: TRL's per-epoch schedules of alpha / mixture coefficient (lists), and TRL's EOS penalty
(``missing_eos_penalty``; a reward function can do that).
"""

from __future__ import annotations

import torch

from alignkit.errors import ConfigError
from alignkit.losses.common import register_knob_choices, register_knob_rules, validate_knobs
from alignkit.losses.dpo import dpo, ipo
from alignkit.losses.registry import RolloutLogps, SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]
XPO_LOSS_TYPES = ("sigmoid", "ipo")

register_knob_rules("xpo", alpha=(lambda v: v >= 0, "it must be >= 0 (0 = online DPO without exploration)"))
register_knob_choices("xpo", loss_type=XPO_LOSS_TYPES)


@register_loss(view="pairwise", runner="xpo", needs_reference=True)
def xpo(inputs: SequenceLogps, *, beta: float = 0.1, alpha: float = 1e-5, loss_type: str = "sigmoid") -> Out:
    """XPO: the pair's DPO (or IPO) loss + alpha * log pi(reference sample), pushing away from the reference."""
    validate_knobs("xpo", locals())  # alpha >= 0, beta > 0, loss_type a choice
    if inputs.from_reference is None:
        raise ValueError("SequenceLogps.from_reference is required by xpo (which slot the reference sampled); "
                         "the xpo runner fills it.")
    preference, metrics = (dpo if loss_type == "sigmoid" else ipo)(inputs, beta=beta)
    sampled = inputs.from_reference.to(inputs.logps.dtype)  # [G, 2]: 1 on the reference's sample
    reference_sample = (inputs.logps * sampled).sum(dim=1)  # [G] policy log-prob of the reference's sample
    exploration = alpha * reference_sample.mean()
    return preference + exploration, {
        **metrics,
        "loss/preference": preference.detach(),
        "loss/exploration": exploration.detach(),
        "logps/reference_sample": reference_sample.detach().mean(),
    }


@register_loss(view="rollout", runner="nash_md", needs_reference=lambda hp: hp["beta"] != 0)  # the KL term reads it
def nash_md(inputs: RolloutLogps, *, beta: float = 0.1) -> Out:
    """Nash-MD (TRL): -(P - 0.5) * sum log pi(y) + beta * sum_t stopgrad(log pi - log ref) * log pi."""
    if not beta >= 0:
        raise ConfigError(f"loss 'nash_md': beta={beta} must be >= 0 (0 = no KL term).")
    mask = inputs.mask.bool()
    logps = torch.where(mask, inputs.logps, 0.0)
    advantage = torch.where(mask, inputs.advantages.detach(), 0.0)  # P - 0.5 on every token of the sequence
    rows = mask.any(dim=-1)  # sequences with a completion token
    score = (advantage * logps).sum(dim=-1)  # [S]
    per_seq = -score
    metrics = {"loss/score": score[rows].detach().mean()}
    if inputs.ref_logps is not None:
        log_ratio = torch.where(mask, inputs.logps.detach() - inputs.ref_logps.detach(), 0.0)
        metrics["kl"] = log_ratio.sum(dim=-1)[rows].mean()
        if beta != 0.0:
            per_seq = per_seq + beta * (log_ratio * logps).sum(dim=-1)
    elif beta != 0.0:
        raise ValueError("nash_md with beta != 0 needs RolloutLogps.ref_logps (load a reference model)")
    return per_seq[rows].sum() / rows.sum().clamp(min=1), metrics
