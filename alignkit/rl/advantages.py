"""Advantage estimators for online RL, in a name registry, plus whitening and group statistics.

Every estimator has the same signature (keyword-only hyper-parameters after the ``*``)::

    fn(rewards, group_index, *, token_rewards=None, values=None, mask=None, **hp) -> advantages

* ``rewards``       ``[S]`` float: one scalar reward per sampled sequence;
* ``group_index``   ``[S]`` long: the prompt each sequence was sampled from (any integer ids; the
                    sequences of one prompt form a group of G samples);
* ``token_rewards`` ``[S, T]`` float, optional: per-token rewards that *already include* the scalar
                    reward on the last completion token (see ``alignkit.rl.kl.shape_token_rewards``);
* ``values``        ``[S, T]`` float: critic values of each completion position (``gae`` only);
* ``mask``          ``[S, T]`` bool: True on completion tokens;
* returns ``[S]`` for outcome-level estimators given no mask, else ``[S, T]`` (0 outside ``mask``).

``compute_advantages(name, ...)`` looks the estimator up and always hands back ``[S, T]`` when a mask
is given (broadcasting sequence-level advantages over the completion tokens), so a trainer can feed
``RolloutLogps.advantages`` directly.

Estimators (definitions checked against verl's ``core_algos`` and OpenRLHF's experience maker):

* ``grpo``: ``(r - mean_group) / (std + epsilon)`` where std is the group's (``scale="group"``), the
  whole batch's rewards' (``"batch"``) or none at all (``"none"``, Dr. GRPO). Stds are unbiased
  (Bessel); a group of one sample has std 0 and advantage 0 (nothing to compare with).
* ``rloo``: ``r_i - mean_{j != i} r_j`` = ``G / (G - 1) * (r_i - mean_group)``; 0 for a group of one.
* ``reinforce_pp`` (REINFORCE++): discounted returns of the token rewards, whitened over all
  completion tokens of the batch (no per-group baseline). Without a mask: whitened scalar rewards.
* ``reinforce_pp_baseline``: the same after subtracting the group mean reward from the outcome
  reward (OpenRLHF ``reinforce_baseline``; verl ``reinforce_plus_plus_baseline``).
* ``gae``: generalised advantage estimation from per-token rewards and values, run backwards from
  the end of each sequence; positions outside the mask are skipped (they carry the next value
  and advantage through unchanged), optionally whitened. ``compute_gae`` also returns the value
  targets (``returns = advantages + values`` before whitening) that ``ppo_value`` needs.

Deliberately left out: ReMax, OPO, GPG and other estimators (add one function each), and
distributed group statistics: group means are over the tensors given, so groups must not be split
across ranks. ``whiten_batch`` whitens a batch held as several tensors (micro-batches), over ranks
when given a sum-reducer (PPO whitens its GAE advantages over the whole rollout batch this way).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from alignkit.errors import ConfigError
from alignkit.rl.kl import place_at_last_token

GRPO_SCALES = ("group", "batch", "none")

AdvantageFn = Callable[..., torch.Tensor]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage(name: str | None = None) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an estimator under ``name`` (default: the function's name)."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ValueError(f"advantage estimator {key!r} is registered twice")
        _REGISTRY[key] = fn
        return fn

    return wrap


def available_advantages() -> list[str]:
    """The registered estimator names, sorted."""
    return sorted(_REGISTRY)


def resolve_advantage(name: str) -> AdvantageFn:
    """The registered estimator ``name``; ConfigError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown advantage estimator {name!r}. Valid choices: {', '.join(available_advantages())}."
        )
    return _REGISTRY[name]


_DATA_ARGS = ("token_rewards", "values", "mask")


def advantage_hparams(name: str) -> dict[str, object]:
    """Keyword-only hyper-parameters of estimator ``name`` with their defaults."""
    sig = inspect.signature(resolve_advantage(name))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _DATA_ARGS
    }


# ----------------------------------------------------------------------------- statistics


def group_stats(
    x: torch.Tensor, group_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row mean, unbiased std (0 for a group of one) and size of the row's group, each ``[S]``."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    x = x.to(torch.float32)
    size = torch.bincount(inverse, minlength=num_groups).to(x.dtype)
    mean = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x) / size
    squared = torch.zeros_like(mean).index_add_(0, inverse, (x - mean[inverse]).square())
    std = (squared / (size - 1).clamp(min=1)).sqrt()
    return mean[inverse], std[inverse], size[inverse]


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, epsilon: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + epsilon)`` over the entries where ``mask`` is True (all if None).

    The variance is unbiased (Bessel); entries outside ``mask`` are returned as 0.
    """
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    count = keep.sum().clamp(min=1)
    mean = torch.where(keep, x, 0.0).sum() / count
    var = torch.where(keep, (x - mean).square(), 0.0).sum() / (count - 1).clamp(min=1)
    return torch.where(keep, (x - mean) * torch.rsqrt(var + epsilon), 0.0)


def whiten_batch(
    xs: list[torch.Tensor],
    masks: list[torch.Tensor],
    *,
    epsilon: float = 1e-8,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
) -> list[torch.Tensor]:
    """``whiten`` over the union of several tensors (e.g. every micro-batch of a rollout batch, whose
    padded lengths differ), optionally also over ranks: ``all_reduce`` sums a list of floats over
    processes. Two passes (mean, then squared deviations) in float64; same result as ``whiten`` of
    the concatenated entries, so it does not depend on how the batch was split."""
    reduce = all_reduce or (lambda values: values)
    keeps = [m.bool() for m in masks]
    total = sum(float(torch.where(k, x.double(), 0.0).sum()) for x, k in zip(xs, keeps))
    count = sum(float(k.sum()) for k in keeps)
    total, count = reduce([total, count])
    mean = total / max(count, 1.0)
    squares = sum(float(torch.where(k, (x.double() - mean).square(), 0.0).sum()) for x, k in zip(xs, keeps))
    (squares,) = reduce([squares])
    scale = (squares / max(count - 1.0, 1.0) + epsilon) ** -0.5
    return [torch.where(k, (x - mean) * scale, 0.0).to(x.dtype) for x, k in zip(xs, keeps)]


def zero_std_groups_mask(
    rewards: torch.Tensor, group_index: torch.Tensor, *, tolerance: float = 1e-6
) -> torch.Tensor:
    """``[S]`` bool, True on rows whose group's rewards are all equal (no learning signal for GRPO).

    Dynamic sampling (DAPO) drops these rows and samples more prompts.
    """
    _, std, _ = group_stats(rewards, group_index)
    return std <= tolerance


def frac_zero_std_groups(
    rewards: torch.Tensor, group_index: torch.Tensor, *, tolerance: float = 1e-6
) -> torch.Tensor:
    """Fraction (scalar tensor) of the groups whose rewards are all equal (a group of one counts)."""
    _, std, size = group_stats(rewards, group_index)
    # each row contributes 1/size of its group, so the sums count groups
    return ((std <= tolerance).float() / size).sum() / (1.0 / size).sum()


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_next`` from each sequence's end, over masked positions only ``[S, T]``."""
    mask = mask.bool()
    returns = torch.zeros_like(token_rewards, dtype=torch.float32)
    running = torch.zeros(token_rewards.shape[0], dtype=torch.float32, device=token_rewards.device)
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(mask[:, t], token_rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(mask[:, t], running, 0.0)
    return returns


def compute_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets, both ``[S, T]`` (0 outside ``mask``).

    ``delta_t = r_t + gamma * V_next - V_t``; ``A_t = delta_t + gamma * lam * A_next``, where "next"
    is the next *masked* position (V and A are 0 past the end); ``returns = A + V``.
    """
    mask = mask.bool()
    values = values.detach().float()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        next_advantage = torch.where(mask[:, t], advantage, next_advantage)
        advantages[:, t] = torch.where(mask[:, t], advantage, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


# ----------------------------------------------------------------------------- estimators


@register_advantage()
def grpo(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    token_rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: str = "group",
    epsilon: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantage: ``(r - mean_group) / (std + epsilon)``; std by ``scale``."""
    if scale not in GRPO_SCALES:
        raise ConfigError(f"advantage scale {scale!r} is not valid. Valid choices: {', '.join(GRPO_SCALES)}.")
    mean, group_std, size = group_stats(rewards, group_index)
    centred = torch.where(size > 1, rewards.float() - mean, 0.0)
    if scale == "group":
        return centred / (group_std + epsilon)
    if scale == "batch":
        batch_std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centred / (batch_std + epsilon)
    return centred


@register_advantage()
def rloo(rewards: torch.Tensor, group_index: torch.Tensor, *, token_rewards: torch.Tensor | None = None,
         values: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out baseline: ``r_i - mean of the other samples of the group``."""
    mean, _, size = group_stats(rewards, group_index)
    return torch.where(size > 1, (rewards.float() - mean) * size / (size - 1).clamp(min=1), 0.0)


def _reinforce_pp_core(rewards: torch.Tensor, baseline: torch.Tensor, token_rewards: torch.Tensor | None,
                       mask: torch.Tensor | None, gamma: float, epsilon: float) -> torch.Tensor:
    """Whitened returns of ``token_rewards - baseline at the last token`` (or of rewards - baseline)."""
    if mask is None:
        if token_rewards is not None:
            raise ValueError("token_rewards need a mask")
        return whiten(rewards.float() - baseline, epsilon=epsilon)
    if token_rewards is None:
        token_rewards = place_at_last_token(rewards.float(), mask)
    token_rewards = token_rewards.float() - place_at_last_token(baseline, mask)
    return whiten(discounted_returns(token_rewards, mask, gamma), mask, epsilon=epsilon)


@register_advantage()
def reinforce_pp(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    token_rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++: discounted token returns whitened over the whole batch (no group baseline)."""
    return _reinforce_pp_core(
        rewards, torch.zeros_like(rewards, dtype=torch.float32), token_rewards, mask, gamma, epsilon
    )


@register_advantage()
def reinforce_pp_baseline(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    token_rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean reward, then batch whitening as REINFORCE++."""
    mean, _, _ = group_stats(rewards, group_index)
    return _reinforce_pp_core(rewards, mean, token_rewards, mask, gamma, epsilon)


@register_advantage()
def gae(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    token_rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
) -> torch.Tensor:
    """Generalised advantage estimation (PPO); needs ``values`` and ``mask``."""
    if values is None or mask is None:
        raise ValueError("the gae estimator needs values [S, T] and mask [S, T]")
    if token_rewards is None:
        token_rewards = place_at_last_token(rewards.float(), mask)
    advantages, _ = compute_gae(token_rewards.float(), values, mask, gamma=gamma, lam=lam)
    return whiten(advantages, mask) if whiten_advantages else advantages


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    token_rewards: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    **hparams: Any,
) -> torch.Tensor:
    """Run estimator ``name``; ``[S, T]`` (0 outside ``mask``) when a mask is given, else ``[S]``. No grad."""
    fn = resolve_advantage(name)
    valid = advantage_hparams(name)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ConfigError(
            f"advantage estimator {name!r} takes no hyper-parameter {', '.join(map(repr, unknown))}. "
            f"Valid: {', '.join(valid) or '(none)'}."
        )
    with torch.no_grad():
        adv = fn(rewards, group_index, token_rewards=token_rewards, values=values, mask=mask, **hparams)
        if mask is not None and adv.dim() == 1:
            adv = torch.where(mask.bool(), adv[:, None], 0.0)
    return adv
