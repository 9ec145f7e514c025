"""The process reward model's objective: cross-entropy on each step's correct/incorrect label (``runner=prm``).

A process reward model (PRM; Lightman et al. 2023, "Let's Verify Step by Step"; Uesato et al. 2022;
Math-Shepherd, Wang et al. 2024) classifies every step of a solution as correct or not. As TRL's
``PRMTrainer`` (token classification, ``num_labels=2``, labels only at the last token of each step),
the loss is the cross-entropy of the 2-class head at the labelled tokens, averaged over all labelled
steps of the micro-batch (``transformers``' token-classification loss over the tokens whose label is
not -100, which is what TRL trains). ``StepLogits`` holds the head's logits at those tokens
(``alignkit.trainers.prm``); class 1 = correct, class 0 = incorrect.

Metrics: ``prm/step_accuracy`` (argmax = label; TRL's ``compute_accuracy`` over labelled tokens), also
logged as ``rewards/accuracy`` (the name sweeps maximise, ``objective``); ``prm/first_error_accuracy``
(the share of solutions whose first predicted-incorrect step is their first labelled-incorrect step,
"no error" matching "no error"); ``prm/prob_correct`` (mean P(correct)); ``prm/positive_rate`` (the share
of steps labelled correct: the accuracy a constant guess reaches). ``last_steps`` keeps each solution's
last step only (TRL's ``train_on_last_step_only``). Left out: soft (probability) labels such as
Math-Shepherd's completion rates, and class weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.losses.registry import register_loss


@dataclass
class StepLogits:
    """The 2-class head at each labelled step's last token, in order within each solution."""

    logits: torch.Tensor  # [N, 2] (incorrect, correct) logits, one row per labelled step
    labels: torch.Tensor  # [N] long, 1 = correct, 0 = incorrect
    solution: torch.Tensor  # [N] long, which solution (group) each step belongs to; a solution's steps are in order


def last_steps(inputs: StepLogits) -> StepLogits:
    """Each solution's last step only (TRL's ``train_on_last_step_only``)."""
    solution = inputs.solution
    is_last = torch.ones_like(solution, dtype=torch.bool)
    if solution.numel() > 1:
        is_last[:-1] = solution[1:] != solution[:-1]
    return StepLogits(inputs.logits[is_last], inputs.labels[is_last], solution[is_last])


def first_errors(wrong: torch.Tensor, solution: torch.Tensor) -> torch.Tensor:
    """Per solution (0..max id), the index of its first step where ``wrong`` holds, ``N`` where none does."""
    count = int(solution.max()) + 1 if solution.numel() else 0
    index = torch.arange(solution.numel(), device=solution.device)
    marked = torch.where(wrong, index, torch.full_like(index, solution.numel()))
    out = torch.full((count,), solution.numel(), dtype=torch.long, device=solution.device)
    return out.scatter_reduce(0, solution, marked, reduce="amin")


@register_loss(view="stepwise", runner="prm", needs_reference=False)
def prm(inputs: StepLogits):
    """Cross-entropy of a process reward model's 2-class head at each labelled step (TRL's PRMTrainer loss)."""
    logits, labels = inputs.logits, inputs.labels
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in fp32; fp32/fp64 logits as they are
        logits = logits.float()
    loss = F.cross_entropy(logits, labels, reduction="mean") if labels.numel() else logits.sum() * 0.0
    with torch.no_grad():
        predicted = logits.argmax(-1)
        right = (predicted == labels).float()
        present = torch.unique(inputs.solution)
        true_first = first_errors(labels == 0, inputs.solution)[present]
        predicted_first = first_errors(predicted == 0, inputs.solution)[present]
        step_accuracy = right.mean() if labels.numel() else right.sum()
        metrics = {
            "prm/step_accuracy": step_accuracy,
            "rewards/accuracy": step_accuracy,
            "prm/first_error_accuracy": (true_first == predicted_first).float().mean() if present.numel()
            else right.sum(),
            "prm/prob_correct": torch.softmax(logits, -1)[:, 1].mean() if labels.numel() else right.sum(),
            "prm/positive_rate": labels.float().mean() if labels.numel() else right.sum(),
        }
    return loss, metrics
