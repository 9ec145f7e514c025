"""``pairwise_bce`` (the pm runner's loss) against binary cross-entropy written with ``math`` on floats:
values with preferences and ties, gradient signs, the accuracy / antisymmetry metrics."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import SequenceLogps, available_losses

torch.set_num_threads(1)
LOSSES = available_losses()
# (logit of order (chosen, rejected), logit of order (rejected, chosen), target of order 0); 0.5 = a tie
ROWS = [(1.2, -0.7, 1.0), (-0.3, 0.4, 1.0), (0.8, -0.8, 0.5), (2.5, 1.0, 1.0)]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(logit: float, target: float) -> float:
    return -(target * math.log(_sigmoid(logit)) + (1.0 - target) * math.log(1.0 - _sigmoid(logit)))


def _inputs(rows=ROWS, scores=True) -> SequenceLogps:
    """A tie is a pair with equal record scores (3.0, 3.0); a preference has (2.0, 1.0)."""
    return SequenceLogps(
        logps=torch.tensor([[s0, s1] for s0, s1, _ in rows], dtype=torch.float64, requires_grad=True),
        lengths=torch.ones(len(rows), 2, dtype=torch.float64), mask=torch.ones(len(rows), 2, dtype=torch.bool),
        scores=torch.tensor([[3.0, 3.0] if t == 0.5 else [2.0, 1.0] for _, _, t in rows],
                            dtype=torch.float64) if scores else None,
    )


def test_pairwise_bce_value():
    expected = sum(_bce(s0, t) + _bce(s1, 1.0 - t) for s0, s1, t in ROWS) / (2 * len(ROWS))
    loss, metrics = LOSSES["pairwise_bce"].fn(_inputs())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    probs = [(_sigmoid(s0) + 1.0 - _sigmoid(s1)) / 2.0 for s0, s1, _ in ROWS]
    decisive = [p for p, (_, _, t) in zip(probs, ROWS) if t != 0.5]
    assert metrics["rewards/accuracy"].item() == pytest.approx(sum(p > 0.5 for p in decisive) / len(decisive))
    assert metrics["rewards/accuracy"].item() == pytest.approx(2 / 3)  # row 2 is wrong, the tie is left out
    assert metrics["pm/antisymmetry"].item() == pytest.approx(
        sum(abs(_sigmoid(s0) + _sigmoid(s1) - 1.0) for s0, s1, _ in ROWS) / len(ROWS))
    assert metrics["pm/prob_chosen"].item() == pytest.approx(sum(probs) / len(probs))
    assert metrics["rewards/margin"].item() == pytest.approx(sum(s0 - s1 for s0, s1, _ in ROWS) / len(ROWS))


def test_without_scores_slot_0_is_the_preferred_order():
    rows = [(s0, s1, 1.0) for s0, s1, _ in ROWS]
    with_scores = LOSSES["pairwise_bce"].fn(_inputs(rows))[0]
    assert LOSSES["pairwise_bce"].fn(_inputs(rows, scores=False))[0].item() == pytest.approx(with_scores.item())


def test_gradient_signs_preference_and_tie():
    inputs = _inputs([(0.3, 0.3, 1.0), (0.3, 0.3, 0.5), (0.0, 0.0, 0.5)])
    LOSSES["pairwise_bce"].fn(inputs)[0].backward()
    grad = inputs.logps.grad
    assert grad[0, 0] < 0 and grad[0, 1] > 0  # preference: up the (chosen, rejected) logit, down the other
    assert grad[1, 0] > 0 and grad[1, 1] > 0  # a tie at logit 0.3 > 0 pulls both orders towards P = 0.5
    assert grad[2].abs().max() == 0.0  # a tie at P = 0.5 is at its optimum
    # d/ds BCE = sigmoid(s) - t, averaged over the 6 slots
    assert grad[0, 0].item() == pytest.approx((_sigmoid(0.3) - 1.0) / 6)
    assert grad[1, 1].item() == pytest.approx((_sigmoid(0.3) - 0.5) / 6)


def test_a_perfectly_antisymmetric_model_scores_zero_antisymmetry():
    _, metrics = LOSSES["pairwise_bce"].fn(_inputs([(1.3, -1.3, 1.0), (-0.2, 0.2, 1.0)]))
    assert metrics["pm/antisymmetry"].item() == pytest.approx(0.0, abs=1e-12)
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)
