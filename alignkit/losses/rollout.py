"""Policy-gradient losses on sampled rollouts: ``grpo`` (with DAPO, GSPO and Dr. GRPO options),
``ppo`` (clipped policy surrogate) and ``ppo_value`` (clipped value loss).

All take a ``RolloutLogps`` whose tensors are ``[S, T]`` (S sampled sequences, T completion
positions, ``mask`` True on completion tokens; values outside the mask are ignored, even NaN-free
garbage). ``advantages`` are token-level; sequence-level estimators are broadcast over the tokens
(``alignkit.rl.advantages.compute_advantages`` does that).

The clipped surrogate, per token: ``-min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)``
with ``r = exp(logps - old_logps)`` (token level) or, for ``importance_sampling_level="sequence"``
(GSPO), ``r = exp(mean over the sequence's tokens of (logps - old_logps))``, the same ratio for
every token of a sequence. Separate low/high epsilons are DAPO's "clip-higher".

Aggregation (``loss_agg``) of the per-token losses ``l`` over the batch:

* ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (GRPO paper);
* ``token_mean``: sum of ``l`` over all completion tokens / number of those tokens (DAPO);
* ``seq_mean_token_sum_norm``: sum of ``l`` / (number of sequences * ``max_completion_length``),
  a constant normaliser (Dr. GRPO); ``max_completion_length`` must then be set (use the generation
  ``max_new_tokens``).

"Number of sequences" counts the rows with at least one completion token. Normalisation is over
the tensors given: with gradient accumulation the trainer scales by the micro-batch share.

``grpo``'s optional KL term adds ``beta * k3(logps, ref_logps)`` per token (the reference is loaded
only when beta > 0); metric ``kl`` is reported whenever ``ref_logps`` is given. PPO's KL lives in
the rewards instead (``alignkit.rl.kl.shape_token_rewards``).

Metrics: ``clip_fraction`` (tokens whose clipped term is the active one: ``r < 1 - epsilon_low`` with
``A < 0`` -> ``clip_fraction/low``; ``r > 1 + epsilon_high`` with ``A > 0`` -> ``clip_fraction/high``),
``ratio/mean``, ``kl``; ``ppo_value``: ``value/clip_fraction``, ``value/mean``, ``value/error``.

Deliberately left out: dual-clip PPO, truncated importance sampling against the generation
engine's log-probs, entropy bonus (needs the full distribution; the trainer can add it).
"""

from __future__ import annotations

import torch

from alignkit.errors import ConfigError
from alignkit.losses.registry import RolloutLogps, register_loss
from alignkit.rl.kl import kl_per_token

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
LOSS_AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"loss.{field} {value!r} is not valid. Valid choices: {', '.join(choices)}.")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (0 if there are none)."""
    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def aggregate_token_loss(
    per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str, max_completion_length: int | None = None
) -> torch.Tensor:
    """Reduce a ``[S, T]`` per-token loss to a scalar; see the module docstring for the modes."""
    _check_choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
    mask = mask.bool()
    masked = torch.where(mask, per_token, 0.0)
    tokens_per_seq = mask.sum(dim=-1)
    num_seqs = (tokens_per_seq > 0).sum().clamp(min=1)
    if loss_agg == "token_mean":
        return masked.sum() / tokens_per_seq.sum().clamp(min=1)
    if loss_agg == "seq_mean_token_mean":
        return (masked.sum(dim=-1) / tokens_per_seq.clamp(min=1)).sum() / num_seqs
    if not max_completion_length or max_completion_length <= 0:
        raise ConfigError(
            "loss_agg 'seq_mean_token_sum_norm' divides by a constant max_completion_length, which is "
            f"{max_completion_length!r}. Set loss.max_completion_length to the generation max_new_tokens."
        )
    return masked.sum() / (num_seqs * max_completion_length)


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token ``-min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)`` ``[S, T]`` and clip metrics."""
    if not 0.0 <= epsilon_low < 1.0 or epsilon_high < 0.0:
        raise ConfigError(
            f"clip range needs 0 <= epsilon_low < 1 and epsilon_high >= 0, got {epsilon_low}, {epsilon_high}."
        )
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
        high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
        metrics = {
            "clip_fraction": masked_mean((low | high).float(), mask),
            "clip_fraction/low": masked_mean(low.float(), mask),
            "clip_fraction/high": masked_mean(high.float(), mask),
            "ratio/mean": masked_mean(ratio, mask),
        }
    return per_token, metrics


def _policy_objective(
    inputs: RolloutLogps,
    *,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str,
    loss_agg: str,
    max_completion_length: int | None,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    _check_choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
    mask = inputs.mask.bool()
    # zero outside the mask so exp() never sees padding garbage (inf * 0 would poison the gradient)
    log_ratio = torch.where(mask, inputs.logps - inputs.old_logps.detach(), 0.0)
    if importance_sampling_level == "sequence":
        seq_log_ratio = log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        log_ratio = seq_log_ratio[:, None].expand_as(log_ratio)
    advantages = inputs.advantages.detach()
    per_token, metrics = clipped_surrogate(
        log_ratio, advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high
    )
    if inputs.ref_logps is not None:
        kl = kl_per_token(
            inputs.logps, torch.where(mask, inputs.ref_logps.detach(), inputs.logps.detach()), "k3"
        )
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if beta != 0.0:
            per_token = per_token + beta * kl
    elif beta != 0.0:
        raise ValueError("beta != 0 needs RolloutLogps.ref_logps (load a reference model)")
    return aggregate_token_loss(per_token, mask, loss_agg, max_completion_length), metrics


@register_loss(view="rollout", runner="grpo", needs_reference=lambda hp: hp["beta"] != 0)  # the KL term reads it
def grpo(
    inputs: RolloutLogps,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    loss_agg: str = "seq_mean_token_mean",
    max_completion_length: int | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped surrogate (DAPO low/high clip, GSPO sequence ratio, Dr. GRPO aggregation, k3 KL)."""
    return _policy_objective(
        inputs,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        importance_sampling_level=importance_sampling_level,
        loss_agg=loss_agg,
        max_completion_length=max_completion_length,
        beta=beta,
    )


@register_loss(view="rollout", runner="ppo", needs_reference=False)  # KL lives in the rewards (rl.kl_coef)
def ppo(
    inputs: RolloutLogps,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_agg: str = "token_mean",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy surrogate on token-level advantages (KL belongs in the rewards)."""
    return _policy_objective(
        inputs,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        importance_sampling_level="token",
        loss_agg=loss_agg,
        max_completion_length=max_completion_length,
        beta=0.0,
    )


@register_loss(view="rollout", runner="ppo", needs_reference=False)
def ppo_value(
    inputs: RolloutLogps,
    *,
    value_clip: float | None = 0.2,
    loss_agg: str = "token_mean",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, +-value_clip) - R)^2)``.

    Uses ``values`` (critic, with grad), ``old_values`` (at rollout time) and ``returns`` (targets,
    e.g. from ``alignkit.rl.advantages.compute_gae``). ``value_clip=None`` disables clipping.
    """
    if inputs.values is None or inputs.returns is None:
        raise ValueError("ppo_value needs RolloutLogps.values and .returns")
    mask = inputs.mask.bool()
    values = torch.where(mask, inputs.values, 0.0)
    returns = torch.where(mask, inputs.returns.detach(), 0.0)
    error = (values - returns).square()
    per_token = error
    clip_fraction = torch.zeros(())
    if value_clip is not None:
        if inputs.old_values is None:
            raise ValueError("ppo_value with value_clip needs RolloutLogps.old_values")
        if value_clip <= 0:
            raise ConfigError(f"loss.value_clip must be > 0 (or null to disable), got {value_clip}.")
        old = torch.where(mask, inputs.old_values.detach(), 0.0)
        clipped_error = (old + torch.clamp(values - old, -value_clip, value_clip) - returns).square()
        per_token = torch.maximum(error, clipped_error)
        clip_fraction = masked_mean((clipped_error > error).float(), mask)
    loss = 0.5 * aggregate_token_loss(per_token, mask, loss_agg, max_completion_length)
    metrics = {
        "value/clip_fraction": clip_fraction.detach(),
        "value/mean": masked_mean(values.detach(), mask),
        "value/error": masked_mean(error.detach(), mask),
    }
    return loss, metrics
