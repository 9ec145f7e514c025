"""The reward model's Bradley-Terry loss against a scalar formula: margin (Llama-2 / TRL ``margin``) and
centering (TRL's ``center_rewards_coefficient``), written with ``math`` on floats."""

from __future__ import annotations

import pytest
import torch

from alignkit.losses import SequenceLogps, available_losses
from offline_loss_cases import log_sigmoid, mean

torch.set_num_threads(1)
LOSSES = available_losses()
# (score chosen, score rejected, rating chosen, rating rejected)
ROWS = [(1.5, -0.5, 9.0, 4.0), (-0.2, 0.3, 6.0, 5.0), (2.0, 1.0, 7.0, 7.0)]


def _inputs() -> SequenceLogps:
    col = lambda a, b: torch.tensor([[r[a], r[b]] for r in ROWS], dtype=torch.float64)  # noqa: E731
    return SequenceLogps(
        logps=col(0, 1), lengths=torch.ones(len(ROWS), 2, dtype=torch.float64),
        mask=torch.ones(len(ROWS), 2, dtype=torch.bool), scores=col(2, 3),
    )


@pytest.mark.parametrize("margin_coef,center_coef", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (0.3, 0.2)])
def test_bradley_terry_value(margin_coef, center_coef):
    expected = mean(-log_sigmoid(c - r - margin_coef * (sc - sr)) for c, r, sc, sr in ROWS)
    expected += center_coef * mean((c + r) ** 2 for c, r, _, _ in ROWS)
    loss, metrics = LOSSES["bradley_terry"].fn(_inputs(), margin_coef=margin_coef, center_coef=center_coef)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["rewards/margin"].item() == pytest.approx(mean(c - r for c, r, _, _ in ROWS))
    assert metrics["rewards/accuracy"].item() == pytest.approx(2 / 3)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(c for c, _, _, _ in ROWS))

