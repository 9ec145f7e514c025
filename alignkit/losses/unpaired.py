"""Unpaired losses (view "unpaired": K=1, ``labels`` [G, 1], 1.0 desirable, 0.0 undesirable): KTO, APO-zero.

Each completion is scored alone against the reference, ``h = logp - ref_logp``; the scalar loss is
the mean over all completions of the weighted per-completion losses (TRL's KTOTrainer reduction), so
the weights also balance the two classes. The metrics ``rewards/chosen``/``logps/chosen`` average
over desirable completions, the ``rejected`` ones over undesirable ones; a class absent from the
batch leaves its keys (and ``rewards/margin``) out rather than logging nan. There is no
``rewards/accuracy``: without pairs there is nothing to compare.

KTO's reference point is the batch KL estimate ``mean(kl_logps - ref_kl_logps)`` over mismatched
(prompt, completion) pairs, clamped at 0 and detached. The preference trainer builds the pairs
over the whole optimizer step (group ``i`` of the step with the completion of group ``i + 1``,
across every micro-batch and rank, as TRL's KL dataset rotates completions by one) and averages
over ranks, so the estimate does not depend on ``trainer.micro_batch_size``; it hands the step's
estimate in as one pair. TRL builds its pairs inside each per-device batch and refuses a per-device
batch of 1 (the "mismatched" completion would be the example's own: the loss is then exactly
``0.5``); here the step as a whole must hold at least two groups (``check_kl_pairs_config``, at
compose time). Without ``kl_logps`` the estimate is 0, as TRL with ``calculate_KL=False``.

Left out: the BCO classifier loss and KTO's reference-free variant.
"""

from __future__ import annotations

import torch

from alignkit.losses.common import validate_knobs
from alignkit.losses.registry import SequenceLogps, register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]


def check_kl_pairs_config(cfg) -> None:
    """Compose-time rule: a loss with mismatched KL pairs (KTO) needs >= 2 groups per optimizer step."""
    from alignkit.config.validate import loss_terms
    from alignkit.errors import ConfigError

    names = [spec.name for spec, _, _ in loss_terms(cfg.loss) if spec.needs_kl_pairs]
    if names and int(cfg.trainer.batch_size) < 2:
        raise ConfigError(
            f"loss {names} estimates its KL reference point from mismatched (prompt, completion) pairs of the "
            f"optimizer step, but trainer.batch_size={cfg.trainer.batch_size} holds one example: its only "
            "'mismatched' completion is its own and the loss degenerates (0.5 at every step). "
            "Use trainer.batch_size >= 2 (any micro_batch_size works).")


def _batch_kl(inputs: SequenceLogps) -> torch.Tensor:
    if inputs.kl_logps is None or inputs.ref_kl_logps is None:
        return inputs.logps.new_zeros(())
    return (inputs.kl_logps - inputs.ref_kl_logps).mean().clamp(min=0).detach()


def _unpaired_terms(inputs: SequenceLogps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (logps, logratios, desirable) of the K=1 completions."""
    if inputs.ref_logps is None or inputs.labels is None:
        raise ValueError("unpaired losses need SequenceLogps.ref_logps and .labels; the trainer must fill them.")
    logps = inputs.logps[:, 0]
    return logps, logps - inputs.ref_logps[:, 0].detach(), inputs.labels[:, 0] > 0.5


def _finish(losses_if_desirable: torch.Tensor, losses_if_undesirable: torch.Tensor, desirable: torch.Tensor,
            desirable_weight: float, undesirable_weight: float, rewards: torch.Tensor, logps: torch.Tensor) -> Out:
    per_completion = torch.where(desirable, desirable_weight * losses_if_desirable,
                                 undesirable_weight * losses_if_undesirable)
    metrics: dict[str, torch.Tensor] = {}
    for side, selected in (("chosen", desirable), ("rejected", ~desirable)):
        if selected.any():
            metrics[f"rewards/{side}"] = rewards[selected].detach().mean()
            metrics[f"logps/{side}"] = logps[selected].detach().mean()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return per_completion.mean(), metrics


@register_loss(view="unpaired", needs_reference=True, needs_kl_pairs=True)
def kto(inputs: SequenceLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> Out:
    """KTO: desirable w_d * (1 - sigmoid(beta*(h - z0))), undesirable w_u * (1 - sigmoid(beta*(z0 - h)))."""
    validate_knobs("kto", locals())
    logps, h, desirable = _unpaired_terms(inputs)
    kl = _batch_kl(inputs)
    loss, metrics = _finish(torch.sigmoid(-beta * (h - kl)), torch.sigmoid(-beta * (kl - h)), desirable,
                            desirable_weight, undesirable_weight, beta * h, logps)
    metrics["kl"] = kl
    return loss, metrics


@register_loss(view="unpaired", needs_reference=True)
def apo_zero_unpaired(inputs: SequenceLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> Out:
    """APO-zero (unpaired): desirable w_d * (1 - sigmoid(beta*h)), undesirable w_u * sigmoid(beta*h)."""
    validate_knobs("apo_zero_unpaired", locals())
    logps, h, desirable = _unpaired_terms(inputs)
    return _finish(torch.sigmoid(-beta * h), torch.sigmoid(beta * h), desirable,
                   desirable_weight, undesirable_weight, beta * h, logps)
