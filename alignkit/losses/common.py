"""Shared pieces of the offline loss families: pair terms, knobs, metrics, value checks.

What lives here is what two or more loss families compute the same way:

* ``pair_terms``: chosen/rejected log-probs and log-ratios of a pairwise batch (slot 0 = chosen,
  slot 1 = rejected), optionally with LD-DPO length desensitisation (``ld_alpha``);
* ``f_divergence_scores``: the f-DPO transform of a log-ratio (``f'(u)`` with ``u = pi/pi_ref``),
  written as TRL 1.16 writes it, so values match ``DPOTrainer``;
* ``wpo_weights``: the detached WPO pair weight;
* ``smoothed_logistic``: the label-smoothed logistic loss (cDPO, CPO, SimPO, AOT);
* ``token_mean_nll``: NLL of slot 0 averaged over all its target tokens in the batch (SFT, CPO, ORPO);
* ``preference_metrics``: the metric names shared across losses (docs/DESIGN.md "Names");
* ``validate_knobs``: value checks (enum choices, ranges) raising ``ConfigError``; the losses call it
  on every call and ``combine.build_objective`` calls it at compose time; a loss module declares
  ranges for its own knobs with ``register_knob_rules``, the choices of its string knobs with
  ``register_knob_choices`` and a rule over several of them (a knob that one variant ignores) with
  ``register_knob_check``.

Deliberately left out: anything stateful (running means, EMA references) and any reduction other
than the mean over groups; the loss modules decide their reductions and document them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from alignkit.errors import ConfigError
from alignkit.losses.registry import SequenceLogps

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_ALPHA_EXP_CLAMP = 80.0  # exp(80) stays finite in float32 (TRL uses the same bound)


@dataclass
class PairTerms:
    """Per-pair tensors of a pairwise batch, each shaped [G]."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps


def _require(inputs: SequenceLogps, field: str, why: str) -> torch.Tensor:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"SequenceLogps.{field} is required {why}; the trainer must fill it.")
    return value


def _ld_weighted_sum(token_logps: torch.Tensor, token_mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO sum: tokens within the pair's shared length count 1, the tail counts ``ld_alpha``.

    ``token_logps``/``token_mask`` are [G, 2, T]; the shared length of a pair is the shorter of its
    two completions, counted in target tokens (the mask may have holes, e.g. left padding).
    """
    mask = token_mask.to(token_logps.dtype)
    position = mask.cumsum(dim=-1)  # 1-based index of each target token within its completion
    shared = mask.sum(dim=-1).min(dim=1, keepdim=True).values.unsqueeze(-1)  # [G, 1, 1]
    weight = torch.where(position <= shared, 1.0, ld_alpha) * mask
    return (token_logps * weight).sum(dim=-1)


def pair_terms(inputs: SequenceLogps, *, ld_alpha: float | None = None, reference: bool = True) -> PairTerms:
    """Chosen/rejected tensors of a pairwise batch; ``ld_alpha`` recomputes sums from token tensors."""
    if reference:
        ref = _require(inputs, "ref_logps", "by a loss with a reference")
    else:
        ref = torch.zeros_like(inputs.logps)
    logps = inputs.logps
    if ld_alpha is not None:
        why = "for ld_alpha (LD-DPO)"
        token_mask = _require(inputs, "token_mask", why)
        logps = _ld_weighted_sum(_require(inputs, "token_logps", why), token_mask, ld_alpha)
        if reference:
            ref = _ld_weighted_sum(_require(inputs, "ref_token_logps", why), token_mask, ld_alpha)
    return PairTerms(
        chosen_logps=logps[:, 0],
        rejected_logps=logps[:, 1],
        ref_chosen_logps=ref[:, 0].detach(),
        ref_rejected_logps=ref[:, 1].detach(),
        chosen_lengths=inputs.lengths[:, 0].clamp(min=1.0),
        rejected_lengths=inputs.lengths[:, 1].clamp(min=1.0),
    )


def f_divergence_scores(logratios: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """f'(u) at u = exp(logratios), for the f-DPO generalisation (reverse KL gives plain DPO).

    forward KL: 1 - 1/u; JS: log(2u / (1 + u)); alpha: (u^(alpha-1) - 1) / (alpha - 1), which tends
    to log u as alpha -> 1 (then reverse KL is used). ``f_alpha`` is TRL's ``f_alpha_divergence_coef``;
    the f-DPO paper's (1 - u^-a)/a is the same family with a = 1 - f_alpha (equal at the default 0.5).
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1.0 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratios
        work = logratios.float() if logratios.element_size() < 4 else logratios  # no exp in half precision
        exponent = ((f_alpha - 1.0) * work).clamp(max=_ALPHA_EXP_CLAMP)
        return (torch.expm1(exponent) / (f_alpha - 1.0)).to(logratios.dtype)
    raise ConfigError(f"f_divergence {f_divergence!r} is not valid. Valid choices: {', '.join(F_DIVERGENCES)}.")


def wpo_weights(inputs: SequenceLogps) -> torch.Tensor:
    """WPO pair weight [G]: exp of the token-mean of (log p_t - log sum_v p(v)^2), summed over both
    completions of the pair, detached. Not clamped, as TRL 1.16 (older TRL clamped it at 1)."""
    why = "for use_weighting (WPO)"
    token_logps = _require(inputs, "token_logps", why)
    log_sq_mass = _require(inputs, "token_log_sq_mass", why)
    mask = _require(inputs, "token_mask", why).to(token_logps.dtype)
    with torch.no_grad():
        per_seq = ((token_logps - log_sq_mass) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [G, K]
        return torch.exp(per_seq[:, 0] + per_seq[:, 1])


def smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1 - e) * -log sigmoid(z) + e * -log sigmoid(-z): the conservative (label-smoothed) logistic loss."""
    return (1.0 - label_smoothing) * F.softplus(-z) + label_smoothing * F.softplus(z)


def token_mean_nll(inputs: SequenceLogps) -> torch.Tensor:
    """-sum(log-probs of slot 0) / number of slot-0 target tokens in the whole batch (not per group)."""
    tokens = inputs.lengths[:, 0].sum().clamp(min=1.0)
    return -inputs.logps[:, 0].sum() / tokens


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The shared metric names, each a detached scalar (means over the given elements)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _bad(loss: str, name: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"loss {loss!r}: {name}={value!r} is not valid; {rule}. Change loss.{name} in the config.")


# loss name -> {hyper-parameter: (test, rule)}: range rules a loss module declares for its own knobs
# (``register_knob_rules``), checked by ``validate_knobs`` on every call and at compose time.
KNOB_RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {}


def register_knob_rules(loss: str, **rules: tuple[Callable[[Any], bool], str]) -> None:
    """Declare value rules for ``loss``'s own hyper-parameters, e.g. ``alpha=(lambda v: v > 0, "it must be > 0")``."""
    KNOB_RULES.setdefault(loss, {}).update(rules)


# loss name -> {hyper-parameter: valid values}: the string knobs a loss module declares (``register_knob_choices``)
KNOB_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {}


def register_knob_choices(loss: str, **choices: tuple[str, ...]) -> None:
    """Declare the valid values of ``loss``'s own string knobs, e.g. ``loss_type=("sigmoid", "ipo")``."""
    KNOB_CHOICES.setdefault(loss, {}).update(choices)


# loss name -> checks over all its knob values (defaults filled in): fn(hparams) -> the problem, or None
KNOB_CHECKS: dict[str, list[Callable[[dict[str, Any]], str | None]]] = {}


def register_knob_check(loss: str, check: Callable[[dict[str, Any]], str | None]) -> None:
    """Declare a rule over several of ``loss``'s knobs, e.g. a knob that one of its variants would ignore."""
    KNOB_CHECKS.setdefault(loss, []).append(check)


def validate_knobs(loss: str, hparams: dict[str, Any]) -> None:
    """Check the values of the shared knobs present in ``hparams`` (names not given are skipped)."""
    for name, valid in KNOB_CHOICES.get(loss, {}).items():
        if name in hparams and hparams[name] not in valid:
            raise _bad(loss, name, hparams[name], f"valid choices: {', '.join(valid)}")
    for check in KNOB_CHECKS.get(loss, ()):
        problem = check(hparams)
        if problem:
            raise ConfigError(f"loss {loss!r}: {problem}")
    for name, (test, rule) in KNOB_RULES.get(loss, {}).items():
        value = hparams.get(name)
        if value is None:
            continue
        try:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise _bad(loss, name, value, rule)
    if "f_divergence" in hparams and hparams["f_divergence"] not in F_DIVERGENCES:
        raise _bad(loss, "f_divergence", hparams["f_divergence"], f"valid choices: {', '.join(F_DIVERGENCES)}")
    ld_alpha = hparams.get("ld_alpha")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise _bad(loss, "ld_alpha", ld_alpha, "it must lie in [0, 1] or be null (off)")
    if "beta" in hparams and "beta" not in KNOB_RULES.get(loss, {}) and not hparams["beta"] > 0:  # gkd: [0, 1]
        raise _bad(loss, "beta", hparams["beta"], "it must be > 0")
    smoothing = hparams.get("label_smoothing", 0.0)
    if "label_smoothing" not in KNOB_RULES.get(loss, {}) and not 0.0 <= smoothing < 0.5:  # a loss may declare its own
        raise _bad(loss, "label_smoothing", smoothing, "it must lie in [0, 0.5)")
