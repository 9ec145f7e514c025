"""Weighted sums of registered losses (RPO = dpo + sft, MPO-style mixes) and what they need.

``build_objective(["dpo", "sft"], [1.0, 0.2], {"dpo": {"beta": 0.05}})`` resolves each name (or
dotted path) through the registry, rejects unknown hyper-parameters and bad knob values
(``ConfigError``, at compose time), checks that the parts consume one data view, and returns a
``WeightedLoss``: a callable on ``SequenceLogps`` giving ``(sum_i w_i * loss_i, metrics)``.

Views: all parts must share one view, except that ``sft`` (slot 0 = chosen) joins a pairwise
objective. ``sft`` does not join unpaired or listwise objectives: slot 0 there is not a
demonstration (an undesirable completion, or whichever completion comes first).

Metrics: each part's own loss as ``loss/<name>`` (unweighted), then the parts' metrics merged with
the first part winning a name clash (so ``dpo``'s ``logps/chosen`` stands over ``sft``'s).

``WeightedLoss.needs_reference`` / ``needs_kl_pairs`` / ``needs_token_logps`` / ``needs_token_kl`` tell the trainer what
to fill: each part's spec answers for its hyper-parameter values (``LossSpec.reference_needed`` /
``token_logps_needed``: WPO's ``use_weighting`` and LD-DPO's ``ld_alpha`` need per-token tensors
only when on, GRPO a reference only with ``beta != 0``).

Left out: schedules for the weights (constant weights only) and per-part learning signals.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.errors import ConfigError
from alignkit.losses.common import validate_knobs
from alignkit.losses.registry import LossSpec, SequenceLogps, check_hparams, resolve_loss


@dataclass(frozen=True)
class WeightedPart:
    spec: LossSpec
    weight: float
    hparams: dict[str, Any]


@dataclass(frozen=True)
class WeightedLoss:
    """A weighted sum of registered losses; call it on a ``SequenceLogps``."""

    parts: tuple[WeightedPart, ...]

    @property
    def names(self) -> list[str]:
        return [part.spec.name for part in self.parts]

    @property
    def view(self) -> str:
        views = {part.spec.view for part in self.parts}
        return (views - {"sft"}).pop() if views - {"sft"} else "sft"

    @property
    def needs_reference(self) -> bool:
        return any(part.spec.reference_needed(part.hparams) for part in self.parts)

    @property
    def needs_kl_pairs(self) -> bool:
        return any(part.spec.needs_kl_pairs for part in self.parts)

    @property
    def needs_token_kl(self) -> bool:
        return any(part.spec.needs_token_kl for part in self.parts)

    @property
    def needs_token_logps(self) -> bool:
        return any(part.spec.token_logps_needed(part.hparams) for part in self.parts)

    def __call__(self, inputs: SequenceLogps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total: torch.Tensor | None = None
        losses: dict[str, torch.Tensor] = {}
        merged: dict[str, torch.Tensor] = {}
        for part in self.parts:
            loss, metrics = part.spec.fn(inputs, **part.hparams)
            total = part.weight * loss if total is None else total + part.weight * loss
            losses[f"loss/{part.spec.name}"] = loss.detach()
            for key, value in metrics.items():
                merged.setdefault(key, value)
        return total, {**losses, **merged}


def _check_views(specs: list[LossSpec]) -> None:
    views = {spec.view for spec in specs}
    others = views - {"sft"}
    if len(others) > 1 or ("sft" in views and others and others != {"pairwise"}):
        described = ", ".join(f"{spec.name} ({spec.view})" for spec in specs)
        raise ConfigError(
            f"losses {described} consume different data views and cannot be combined. Combine losses of one "
            "view; 'sft' joins only pairwise losses (it trains slot 0, the chosen completion)."
        )


def build_objective(
    names: list[str],
    weights: list[float] | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
) -> WeightedLoss:
    """Resolve, check and weight the named losses; ``hparams`` maps a loss name to its keywords."""
    if not names:
        raise ConfigError("no loss given. Set loss=<name> (e.g. loss=dpo) or a list (loss=[dpo,sft]).")
    if len(set(names)) != len(names):
        raise ConfigError(f"loss list {names} names a loss twice; give each once and set its weight instead.")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ConfigError(
            f"{len(weights)} loss weights for {len(names)} losses {names}; give one weight per loss "
            "(e.g. loss.weights=[1.0,0.2]) or none for all 1.0."
        )
    hparams = dict(hparams or {})
    stray = sorted(set(hparams) - set(names))
    if stray:
        raise ConfigError(f"hyper-parameters given for {stray}, which is not among the losses {names}.")
    specs = [resolve_loss(name) for name in names]
    _check_views(specs)
    parts = []
    for name, spec, weight in zip(names, specs, weights):
        given = dict(hparams.get(name) or {})
        check_hparams(spec, given)
        defaults = {k: v for k, v in spec.hparams().items() if v is not inspect.Parameter.empty}
        if spec.view != "rollout":  # rollout losses check their own knobs (beta = 0 means no KL there)
            validate_knobs(spec.name, {**defaults, **given})
        parts.append(WeightedPart(spec=spec, weight=float(weight), hparams=given))
    return WeightedLoss(parts=tuple(parts))
