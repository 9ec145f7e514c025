"""Per-token KL estimators between the policy and a reference, and PPO's KL-shaped token rewards.

All tensors are token-aligned ``[S, T]`` (S sampled sequences, T completion positions), holding
the log-probs of the *sampled* tokens. With ``delta = logp - ref_logp`` (Schulman, "Approximating
KL Divergence", 2020), for tokens sampled from the policy:

* ``k1 = delta``                      unbiased, high variance, can be negative;
* ``k2 = delta ** 2 / 2``             biased, low variance, always >= 0;
* ``k3 = exp(-delta) - 1 + delta``    unbiased, low variance, always >= 0 (GRPO's estimator).

``shape_token_rewards`` builds PPO's per-token rewards: ``-kl_coef * kl_t`` on every completion
token, plus the sequence's scalar reward on its last completion token.

Deliberately left out: clamping of the estimators (verl's ``low_var_kl`` clamps k3 to [-10, 10];
a trainer may clamp the result), adaptive KL controllers, and full-vocabulary KL (needs the whole
distribution, not the sampled tokens' log-probs).
"""

from __future__ import annotations

import torch

from alignkit.errors import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")


def validate_kl_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(
            f"unknown KL estimator {estimator!r}. Valid choices: {', '.join(KL_ESTIMATORS)} "
            "(k1 = log-ratio, k2 = half squared log-ratio, k3 = exp(-r) - 1 + r)."
        )


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``[S, T]`` from sampled-token log-probs.

    Gradients flow through ``logps`` (and ``ref_logps`` if it requires grad). Masking is left to the
    caller: positions outside the completion hold whatever the inputs hold there.
    """
    validate_kl_estimator(estimator)
    delta = logps - ref_logps
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    return torch.expm1(-delta) + delta


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index ``[S]`` of the last True position in each row of a ``[S, T]`` bool mask.

    Raises ValueError if a row has no True position (an empty completion has nowhere to carry a reward).
    """
    mask = mask.bool()
    if not bool(mask.any(dim=-1).all()):
        empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} of the completion mask have no token")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=-1)


def place_at_last_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A ``[S, T]`` tensor that is 0 everywhere except ``values[s]`` at row s's last completion token."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last_token_index(mask)] = values
    return out


def shape_token_rewards(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    estimator: str = "k1",
) -> torch.Tensor:
    """PPO token rewards ``[S, T]``: ``-kl_coef * kl_t`` on completion tokens, ``+ rewards[s]`` on the last.

    ``rewards`` is ``[S]`` (one scalar per sequence, e.g. a reward model's or the rule rewards' sum),
    ``mask`` ``[S, T]`` bool, ``logps``/``ref_logps`` ``[S, T]`` log-probs of the sampled tokens under
    the sampling policy and the reference (no grad needed; the result is detached). With
    ``kl_coef == 0`` the log-probs may be omitted. Positions outside ``mask`` are 0.
    """
    validate_kl_estimator(estimator)
    mask = mask.bool()
    token_rewards = place_at_last_token(rewards.detach().to(torch.float32), mask)
    if kl_coef != 0.0:
        if logps is None or ref_logps is None:
            raise ValueError("shape_token_rewards: kl_coef != 0 needs logps and ref_logps")
        kl = kl_per_token(logps.detach().float(), ref_logps.detach().float(), estimator)
        token_rewards = token_rewards - kl_coef * torch.where(mask, kl, 0.0)
    return token_rewards
