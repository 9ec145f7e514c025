"""The process reward model's loss (``prm``) against a cross-entropy written with ``math``; its gradient
signs, TRL's ``train_on_last_step_only`` selection, the first-error metric, and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import available_losses
from alignkit.losses.process import StepLogits, last_steps

# two solutions: (correct, correct, incorrect) and (incorrect, correct)
LOGITS = [[0.3, 1.2], [-0.5, 0.4], [1.5, -0.7], [0.2, 0.9], [-1.0, 2.0]]
LABELS = [1, 1, 0, 0, 1]
SOLUTION = [0, 0, 0, 1, 1]


def _inputs(logits=LOGITS, labels=LABELS, solution=SOLUTION, grad=False) -> StepLogits:
    return StepLogits(torch.tensor(logits, dtype=torch.float64, requires_grad=grad),
                      torch.tensor(labels, dtype=torch.long), torch.tensor(solution, dtype=torch.long))


def _ce(row: list[float], label: int) -> float:
    """-log softmax(row)[label], written out."""
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    return log_z - row[label]


def test_prm_value():
    loss, metrics = available_losses()["prm"].fn(_inputs())
    expected = sum(_ce(r, y) for r, y in zip(LOGITS, LABELS)) / len(LABELS)  # mean over every labelled step
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    argmax = [max(range(2), key=lambda c: r[c]) for r in LOGITS]  # [1, 1, 0, 1, 1]
    assert metrics["prm/step_accuracy"].item() == pytest.approx(sum(a == y for a, y in zip(argmax, LABELS)) / 5)
    assert metrics["rewards/accuracy"].item() == metrics["prm/step_accuracy"].item()
    # first predicted error: solution 0 at its step 3 (= its label), solution 1 none (label: its step 1)
    assert metrics["prm/first_error_accuracy"].item() == pytest.approx(0.5)
    p_correct = [math.exp(r[1]) / (math.exp(r[0]) + math.exp(r[1])) for r in LOGITS]
    assert metrics["prm/prob_correct"].item() == pytest.approx(sum(p_correct) / 5, rel=1e-12)
    assert metrics["prm/positive_rate"].item() == pytest.approx(3 / 5)


def test_prm_matches_transformers_token_classification_loss():
    """TRL's PRMTrainer trains the token-classification model's own loss: CE over tokens whose label is not -100."""
    from torch.nn import CrossEntropyLoss

    # the same steps inside a [2, 6] token grid, -100 on the unlabelled tokens
    token_logits = torch.zeros(2, 6, 2, dtype=torch.float64)
    token_labels = torch.full((2, 6), -100)
    where = [(0, 1), (0, 3), (0, 5), (1, 2), (1, 4)]
    for (b, t), row, y in zip(where, LOGITS, LABELS):
        token_logits[b, t] = torch.tensor(row, dtype=torch.float64)
        token_labels[b, t] = y
    reference = CrossEntropyLoss()(token_logits.view(-1, 2), token_labels.view(-1))
    loss, _ = available_losses()["prm"].fn(_inputs())
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)


def test_gradient_raises_the_labelled_class():
    inputs = _inputs(grad=True)
    loss, _ = available_losses()["prm"].fn(inputs)
    loss.backward()
    grad = inputs.logits.grad
    for row, label in zip(grad.tolist(), LABELS):
        assert row[label] < 0 < row[1 - label]  # descending the loss raises the labelled logit, lowers the other
        assert row[0] + row[1] == pytest.approx(0.0, abs=1e-12)  # softmax: only the difference matters


def test_last_steps_keeps_each_solutions_last_step():
    kept = last_steps(_inputs())
    assert kept.labels.tolist() == [0, 1] and kept.solution.tolist() == [0, 1]
    assert kept.logits.tolist() == [LOGITS[2], LOGITS[4]]
    loss, _ = available_losses()["prm"].fn(kept)
    assert loss.item() == pytest.approx((_ce(LOGITS[2], 0) + _ce(LOGITS[4], 1)) / 2, rel=1e-12)


def test_first_error_accuracy_counts_no_error_as_a_match():
    # one solution all correct and predicted all correct; one whose first error is predicted a step late
    logits = [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    _, metrics = available_losses()["prm"].fn(_inputs(logits, [1, 1, 0, 0], [0, 0, 1, 1]))
    assert metrics["prm/first_error_accuracy"].item() == pytest.approx(0.5)
    _, metrics = available_losses()["prm"].fn(_inputs(logits, [1, 1, 1, 0], [0, 0, 1, 1]))
    assert metrics["prm/first_error_accuracy"].item() == pytest.approx(1.0)


def test_edges_single_step_one_class_and_empty():
    loss, metrics = available_losses()["prm"].fn(_inputs([[2.0, -1.0]], [0], [0]))
    assert loss.item() == pytest.approx(_ce([2.0, -1.0], 0), rel=1e-12)
    assert metrics["prm/step_accuracy"].item() == 1.0 and metrics["prm/positive_rate"].item() == 0.0
    # huge logits stay finite
    loss, _ = available_losses()["prm"].fn(_inputs([[500.0, -500.0]], [1], [0]))
    assert loss.item() == pytest.approx(1000.0, rel=1e-12)
    empty = StepLogits(torch.zeros(0, 2, requires_grad=True), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long))
    loss, metrics = available_losses()["prm"].fn(empty)
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in metrics.values())
    loss.backward()  # a micro-batch without a labelled step still backpropagates (zero)
    assert all(not v.requires_grad for v in metrics.values())
