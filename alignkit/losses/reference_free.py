"""Paired losses without a reference model: SimPO, CPO, ORPO (TRL's CPOTrainer / ORPOTrainer names).

Slot 0 is chosen, slot 1 rejected; no ``ref_logps`` is read, so the trainer loads no reference.
The implicit reward in the metrics is the loss's own scaled log-prob: ``beta * logp / len`` for the
length-normalised losses (simpo, orpo), ``beta * logp`` for cpo.

Normalisations: the preference terms are means over pairs; the NLL terms (cpo, orpo) are
``common.token_mean_nll``, the chosen completions' NLL averaged over all their target tokens in the
batch, as TRL's CrossEntropyLoss over the chosen half. Lengths are clamped at 1 (an empty
completion cannot divide by zero).

Deliberate differences from TRL: ORPO's NLL covers the chosen completion's tokens only; TRL's
ORPOTrainer also counts the prompt tokens (the ORPO paper's SFT term is on the response). ORPO's
per-token log-probs are clamped at -1e-6 before log(1 - p), so a completion of probability 1 gives a
finite loss instead of inf. SimPO carries no NLL term (TRL's SimPO through CPOTrainer adds
``cpo_alpha`` * NLL unless set to 0): combine ``simpo`` with ``sft`` for that.

Left out: CPO's hinge/IPO variants and AlphaPO's reward transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.common import (
    pair_terms,
    preference_metrics,
    smoothed_logistic,
    token_mean_nll,
    validate_knobs,
)
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]
_MAX_MEAN_LOGP = -1e-6  # keeps log(1 - p) finite in ORPO


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_loss(view="pairwise", needs_reference=False)
def simpo(inputs: SequenceLogps, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> Out:
    """SimPO: -log sigmoid(beta * (logp_c/len_c - logp_r/len_r) - gamma), optionally label-smoothed.

    ``gamma`` is the margin itself (TRL's ``simpo_gamma``); TRL's CPOTrainer subtracts gamma/beta
    before multiplying by beta. Defaults are the reference code's: princeton-nlp/SimPO's
    ``SimPOConfig`` has beta=2.0 and ``gamma_beta_ratio=0.25``, i.e. gamma=0.5, which is also TRL's
    ``simpo_gamma`` default. The SimPO README suggests gamma/beta=0.5 (gamma=1.0 at beta=2) as a
    starting point for tuning, and its released models used gamma/beta from 0.1 to 0.8.
    """
    validate_knobs("simpo", locals())
    t = pair_terms(inputs, reference=False)
    chosen, rejected = t.chosen_logps / t.chosen_lengths, t.rejected_logps / t.rejected_lengths
    z = beta * (chosen - rejected) - gamma
    per_pair = smoothed_logistic(z, label_smoothing)
    metrics = preference_metrics(beta * chosen, beta * rejected, t.chosen_logps, t.rejected_logps)
    return per_pair.mean(), metrics


@register_loss(view="pairwise", needs_reference=False)
def cpo(inputs: SequenceLogps, *, beta: float = 0.1, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> Out:
    """CPO: -log sigmoid(beta * (logp_c - logp_r)) (label-smoothed) + cpo_alpha * NLL(chosen)."""
    validate_knobs("cpo", locals())
    t = pair_terms(inputs, reference=False)
    z = beta * (t.chosen_logps - t.rejected_logps)
    preference = smoothed_logistic(z, label_smoothing).mean()
    nll = token_mean_nll(inputs)
    metrics = preference_metrics(beta * t.chosen_logps, beta * t.rejected_logps, t.chosen_logps, t.rejected_logps)
    metrics["cpo/nll"] = nll.detach()
    return preference + cpo_alpha * nll, metrics


@register_loss(view="pairwise", needs_reference=False)
def orpo(inputs: SequenceLogps, *, beta: float = 0.1) -> Out:
    """ORPO: NLL(chosen) - beta * mean log sigmoid(log odds(p_c) - log odds(p_r)), p = per-token mean prob.

    ``beta`` is the paper's lambda (TRL's name). odds(p) = p / (1 - p) with log p = logp / len.
    """
    validate_knobs("orpo", locals())
    t = pair_terms(inputs, reference=False)
    chosen = (t.chosen_logps / t.chosen_lengths).clamp(max=_MAX_MEAN_LOGP)
    rejected = (t.rejected_logps / t.rejected_lengths).clamp(max=_MAX_MEAN_LOGP)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    log_odds_ratio = F.logsigmoid(log_odds)
    nll = token_mean_nll(inputs)
    metrics = preference_metrics(beta * chosen, beta * rejected, t.chosen_logps, t.rejected_logps)
    metrics["orpo/nll"] = nll.detach()
    metrics["orpo/log_odds_ratio"] = log_odds_ratio.detach().mean()
    metrics["orpo/log_odds_chosen"] = log_odds.detach().mean()
    return nll - beta * log_odds_ratio.mean(), metrics
