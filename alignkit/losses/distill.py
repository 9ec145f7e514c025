"""On-policy knowledge distillation: GKD's generalized Jensen-Shannon divergence (Agarwal et al., ICLR 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", arXiv 2306.13649, Eq. 1).

Per completion token, over the full vocabulary, with teacher ``P`` and student ``Q`` (both softmaxes of
the logits divided by ``temperature``) and the mixture ``M = beta * P + (1 - beta) * Q``:

    JSD_beta(P || Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M)

``beta = 0`` is taken as the forward KL(P || Q) and ``beta = 1`` as the reverse KL(Q || P) (JSD_beta
itself vanishes at both ends; ``JSD_beta / beta -> KL(P || Q)`` as ``beta -> 0`` and
``JSD_beta / (1 - beta) -> KL(Q || P)`` as ``beta -> 1``). ``gkd`` averages it over the completion
tokens ("batchmean": the sum over the unmasked tokens divided by their count, at least 1).

This is ``GKDTrainer.generalized_jsd_loss`` of TRL 1.16 (``trl/experimental/gkd``), value for value
(``tests/losses/test_distill.py`` calls TRL's function on the same tensors). Defaults: ``beta = 0.5``
(TRL's ``GKDConfig.beta``). ``temperature = 1.0``: TRL's ``GKDConfig.temperature`` (0.9) is the
*sampling* temperature; its ``compute_loss`` calls ``generalized_jsd_loss`` without one, so the loss
runs at that function's default 1.0, which is kept here (the gkd presets sample at 0.9 through
``generation.temperature``). GKD's other knobs (``lmbda``, the share of on-policy student samples;
``seq_kd``; the teacher) belong to the runner: ``rl.lmbda``, ``rl.seq_kd``, ``rl.teacher``
(``alignkit/trainers/gkd.py``).

``generalized_jsd`` is the per-token formula on ``[n, V]`` logits; the gkd runner calls it chunk by chunk
inside the student's LM-head pass (``models.logprobs.ReferenceHead.divergence``), so no ``[tokens, V]``
tensor outlives its chunk, and reduces the per-token values as ``gkd`` does. Left out: TRL's
``reduction`` choices other than batchmean, and the token-level ``num_items_in_batch`` hook (the runner
weights micro-batches by their share of the step's tokens instead, which is the same mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.losses.common import register_knob_rules, validate_knobs
from alignkit.losses.registry import register_loss

Out = tuple[torch.Tensor, dict[str, torch.Tensor]]

register_knob_rules(
    "gkd",
    beta=(lambda v: 0.0 <= v <= 1.0, "it must lie in [0, 1] (0 = forward KL(teacher || student), 1 = reverse KL)"),
    temperature=(lambda v: 0.0 < v < float("inf"), "it must be a finite number > 0"),
)


@dataclass
class DistillLogits:
    """Student and teacher next-token logits at the same completion positions."""

    student_logits: torch.Tensor  # [..., V] (grad)
    teacher_logits: torch.Tensor  # [..., V] (no grad)
    mask: torch.Tensor | None = None  # [...] bool, True on completion tokens; None = every position


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position JSD_beta(teacher || student) over the last (vocabulary) axis, in fp32: ``[...]``."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)  # KL(teacher || student)
    if beta == 1:
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)  # KL(student || teacher)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)  # KL(P || M)
    kl_student = F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)  # KL(Q || M)
    return beta * kl_teacher + (1 - beta) * kl_student


def token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """TRL's batchmean: the sum over unmasked positions over their count (at least 1)."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    return (values * mask).sum() / mask.sum().clamp_min(1)


@register_loss(view="distill", needs_reference=False, runner="gkd")
def gkd(inputs: DistillLogits, *, beta: float = 0.5, temperature: float = 1.0) -> Out:
    """GKD: the generalized JSD between teacher and student per completion token, averaged over tokens."""
    validate_knobs("gkd", locals())
    jsd = generalized_jsd(inputs.student_logits, inputs.teacher_logits, beta=beta, temperature=temperature)
    loss = token_mean(jsd, inputs.mask)
    return loss, {"jsd": loss.detach()}
