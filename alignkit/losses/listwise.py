"""Listwise losses (view "listwise": K>=2 completions per prompt with ``scores`` [G, K]).

A completion i is *better* than j when ``scores[i] > scores[j]`` and both exist (``mask``), so
ragged lists (mask False) and ties (equal scores: no preference either way) need no special data.

* ``lipo``: LiPO-lambda (Liu et al. 2024): sum over better pairs of
  ``Delta_ij * -log sigmoid(s_i - s_j)``, ``s = beta * (logp - ref_logp)``, with the LambdaLoss
  weight ``Delta_ij = |2^psi_i - 2^psi_j| * |1/log2(1 + tau_i) - 1/log2(1 + tau_j)|``, ``psi`` the
  scores and ``tau`` the 1-based rank of each completion under the policy's current ``s``
  (detached; ties in ``s`` broken by position). The discount is LambdaLoss/NDCG's log2; the LiPO
  paper writes log, a different base only rescales every weight by the same constant.
* ``pro``: PRO / Plackett-Luce (Song et al. 2023): for each completion i with a worse one,
  ``-log(exp(s_i) / (exp(s_i) + sum over strictly worse j of exp(s_j)))``, ``s = beta * logp/len``
  (reference-free, length-normalised as in PRO). For a strict ranking this is the Plackett-Luce
  likelihood of the ranking; tied completions do not compete with each other. The authors' code
  (AlibabaResearch/DAMO-ConvAI, ``PRO/train/utils/process_manager.py``) adds two parts, here as
  knobs: ``reward_temperatures=true`` scales each competitor j of i by the score gap
  ``T_ij = score_i - score_j`` and i itself by ``T_i = max_j T_ij`` (a wide gap is a sharper
  preference): ``-log(exp(s_i T_i) / (exp(s_i T_i) + sum_j exp(s_j T_ij)))``; ``sft_weight`` adds
  ``sft_weight * (n - 1)**2 * -logp(best)`` per group (n its completions, the NLL summed over
  the best completion's tokens, the first by position among tied best; their code's default
  weight is 2). Both default off, so ``loss=pro`` is the plain ranking likelihood; the code's
  setting is ``loss.sft_weight=2 loss.reward_temperatures=true`` (scores then act in reward
  units: rescaling them rescales the temperatures).
* ``softmax_dpo``: multi-negative DPO (S-DPO): ``-log softmax`` of the best completion's
  ``s = beta * (logp - ref_logp)`` against all strictly worse ones; several tied best completions
  each count once, averaged.

Reduction: each group's sum (pro, lipo) or mean (softmax_dpo) of terms, then the mean over the
groups that hold at least one strict preference; a batch with none gives a zero loss that still
carries a graph. Metrics: ``rewards/chosen`` averages ``s`` over the best completions,
``rewards/rejected`` over the others, ``rewards/accuracy`` is the fraction of better pairs with
``s_i > s_j``. Any paired loss can also train on listwise data through the data pipeline's pair
expansion; that lives there, not here.

Left out: LiPO's other lambda variants; PRO's tied completions never compete with each other (the
authors' code assumes a strict ranking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.common import register_knob_rules, validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules("pro", sft_weight=(lambda v: v >= 0,
                                       "PRO's SFT weight must be >= 0 (0 is off; the authors' code uses 2)"))


def _checked(inputs: SequenceLogps) -> SequenceLogps:
    """The inputs with absent slots' scores and log-probs zeroed (padding may hold nan or inf there,
    which would reach the gradient through the masked-out terms)."""
    if inputs.scores is None:
        raise ValueError("listwise losses need SequenceLogps.scores; the trainer must fill them.")
    absent = ~inputs.mask
    zeroed = {
        name: getattr(inputs, name).masked_fill(absent, 0.0)
        for name in ("logps", "ref_logps", "scores")
        if getattr(inputs, name) is not None
    }
    return SequenceLogps(**{**inputs.__dict__, **zeroed})


def _better(inputs: SequenceLogps) -> torch.Tensor:
    """[G, K, K] bool: completion i is strictly better than j and both exist."""
    both = inputs.mask.unsqueeze(-1) & inputs.mask.unsqueeze(-2)
    return both & (inputs.scores.unsqueeze(-1) > inputs.scores.unsqueeze(-2))


def _reference_rewards(inputs: SequenceLogps, beta: float) -> torch.Tensor:
    if inputs.ref_logps is None:
        raise ValueError("this listwise loss needs SequenceLogps.ref_logps; the trainer must fill it.")
    return beta * (inputs.logps - inputs.ref_logps.detach())


def _softmax_terms(s: torch.Tensor, competitors: torch.Tensor) -> torch.Tensor:
    """[G, K]: -log(exp(s_i) / (exp(s_i) + sum_{j in competitors[i]} exp(s_j)))."""
    eye = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    pool = s.unsqueeze(-2).expand_as(competitors).masked_fill(~(competitors | eye), float("-inf"))
    return torch.logsumexp(pool, dim=-1) - s


def _mean_over_informative(per_group: torch.Tensor, informative: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if not informative.any():
        return (s * 0.0).sum()
    return per_group[informative].mean()


def _metrics(s: torch.Tensor, inputs: SequenceLogps, better: torch.Tensor) -> dict[str, torch.Tensor]:
    s, logps = s.detach(), inputs.logps.detach()
    top = inputs.scores.masked_fill(~inputs.mask, float("-inf")).amax(dim=-1, keepdim=True)
    best = inputs.mask & (inputs.scores == top)
    others = inputs.mask & ~best
    metrics = {"rewards/accuracy": (s.unsqueeze(-1) > s.unsqueeze(-2))[better].float().mean()}
    for side, selected in (("chosen", best), ("rejected", others)):
        if selected.any():
            metrics[f"rewards/{side}"] = s[selected].mean()
            metrics[f"logps/{side}"] = logps[selected].mean()
    if others.any():
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if not better.any():
        del metrics["rewards/accuracy"]
    return metrics


@register_loss(view="listwise", needs_reference=True)
def lipo(inputs: SequenceLogps, *, beta: float = 0.1) -> Out:
    """LiPO-lambda: lambda-weighted pairwise logistic loss over all better/worse pairs of each list."""
    validate_knobs("lipo", locals())
    inputs = _checked(inputs)
    better = _better(inputs)
    s = _reference_rewards(inputs, beta)
    order = torch.argsort(s.detach().masked_fill(~inputs.mask, float("-inf")), dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1).to(s.dtype) + 1.0
    gain = torch.pow(2.0, inputs.scores.to(s.dtype)) - 1.0
    discount = 1.0 / torch.log2(1.0 + rank)
    weight = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (discount.unsqueeze(-1) - discount.unsqueeze(-2)).abs()
    pair_loss = F.softplus(-(s.unsqueeze(-1) - s.unsqueeze(-2)))
    per_group = torch.where(better, weight * pair_loss, 0.0).sum(dim=(-1, -2))
    return _mean_over_informative(per_group, better.flatten(1).any(-1), s), _metrics(s, inputs, better)


@register_loss(view="listwise", needs_reference=False)
def pro(inputs: SequenceLogps, *, beta: float = 1.0, sft_weight: float = 0.0,
        reward_temperatures: bool = False) -> Out:
    """PRO / Plackett-Luce over the ranking the scores induce, on length-normalised log-probs;
    optionally with the authors' score-gap temperatures and SFT term (module docstring)."""
    validate_knobs("pro", locals())  # the type of reward_temperatures is checked at compose time
    inputs = _checked(inputs)
    better = _better(inputs)
    s = beta * inputs.logps / inputs.lengths.clamp(min=1.0)
    has_worse = better.any(-1)
    if reward_temperatures:
        gaps = torch.where(better, inputs.scores.unsqueeze(-1) - inputs.scores.unsqueeze(-2), 0.0).to(s.dtype)
        own = s * gaps.amax(dim=-1)  # s_i * T_i
        pool = (s.unsqueeze(-2) * gaps).masked_fill(~better, float("-inf"))  # s_j * T_ij over worse j
        terms = torch.logsumexp(torch.cat([own.unsqueeze(-1), pool], dim=-1), dim=-1) - own
    else:
        terms = _softmax_terms(s, better)
    per_group = torch.where(has_worse, terms, 0.0).sum(-1)
    loss = _mean_over_informative(per_group, has_worse.any(-1), s)
    metrics = _metrics(s, inputs, better)
    if sft_weight > 0:
        sft = _best_nll(inputs)
        loss = loss + sft_weight * sft
        metrics["loss/sft"] = sft.detach()
    return loss, metrics


def _best_nll(inputs: SequenceLogps) -> torch.Tensor:
    """Mean over groups of ``(n - 1)**2 * -logp(best)``: n the group's completions, best its top score
    (the first by position among ties), as PRO's code scales its SFT term by (stages - 1)**2."""
    top = inputs.scores.masked_fill(~inputs.mask, float("-inf")).amax(dim=-1, keepdim=True)
    best = inputs.mask & (inputs.scores == top)
    first = best & (best.cumsum(dim=-1) == 1)
    count = inputs.mask.sum(-1)
    present = count > 0
    nll = -(inputs.logps * first).sum(-1) * (count - 1).clamp(min=0).to(inputs.logps.dtype) ** 2
    return nll[present].mean() if present.any() else (inputs.logps * 0.0).sum()


@register_loss(view="listwise", needs_reference=True)
def softmax_dpo(inputs: SequenceLogps, *, beta: float = 0.1) -> Out:
    """Multi-negative softmax DPO: the best completion against all worse ones in one softmax."""
    validate_knobs("softmax_dpo", locals())
    inputs = _checked(inputs)
    better = _better(inputs)
    s = _reference_rewards(inputs, beta)
    top = inputs.scores.masked_fill(~inputs.mask, float("-inf")).amax(dim=-1, keepdim=True)
    positive = inputs.mask & (inputs.scores == top) & better.any(-1)
    negatives = (inputs.mask & (inputs.scores < top)).unsqueeze(-2).expand_as(better)
    terms = torch.where(positive, _softmax_terms(s, negatives), 0.0)
    per_group = terms.sum(-1) / positive.sum(-1).clamp(min=1)
    return _mean_over_informative(per_group, positive.any(-1), s), _metrics(s, inputs, better)
