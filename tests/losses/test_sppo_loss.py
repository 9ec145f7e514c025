"""Values, gradients and edge cases of ``sppo`` (alignkit/losses/sppo.py), and its reduction to ``sppo_hard``.

Expected values are written here with ``math`` on floats from the paper's eq. (4.7),
``(log pi(y)/pi_t(y) - eta (P(y > pi_t) - 1/2))^2`` averaged over the samples, ``eta = 1 / beta``, and
from the reference code (uclaml/SPPO ``sppo/trainer.py``, ``loss_type="sppo"``:
``((logits_w - (1/beta)(P_w - 0.5))^2 + (logits_l - (1/beta)(P_l - 0.5))^2) / 2``), never with the
package's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import RolloutLogps, SequenceLogps, resolve_loss
from alignkit.losses.dpo import sppo_hard
from alignkit.losses.sppo import sppo

torch.set_num_threads(1)

# per sequence: (policy token log-probs, reference token log-probs, P(y > pi_t)); ragged, one empty
SEQUENCES = [
    ([-1.0, -2.0, -0.5], [-1.2, -1.5, -0.7], 0.9),
    ([-3.0, -0.25], [-2.5, -0.5], 0.25),
    ([-0.75, -1.0, -1.25, -2.0], [-0.75, -1.0, -1.25, -2.0], 0.5),  # policy == reference, a tie: zero residual
    ([], [], 0.8),  # no completion token: left out of the mean
    ([-4.0], [-3.0], 0.0),
]
T = 4


def _inputs(sequences=SEQUENCES, requires_grad=False) -> RolloutLogps:
    def pad(values):
        return values + [0.0] * (T - len(values))

    logps = torch.tensor([pad(s[0]) for s in sequences], dtype=torch.float64, requires_grad=requires_grad)
    mask = torch.tensor([[t < len(s[0]) for t in range(T)] for s in sequences])
    centred = torch.tensor([s[2] - 0.5 for s in sequences], dtype=torch.float64)
    return RolloutLogps(logps=logps, old_logps=logps.detach().clone(),
                        advantages=centred[:, None].expand(-1, T) * mask, mask=mask,
                        ref_logps=torch.tensor([pad(s[1]) for s in sequences], dtype=torch.float64))


def _expected(beta: float, sequences=SEQUENCES) -> tuple[float, list[list[float]]]:
    """The loss and d loss / d policy token log-prob, by hand."""
    kept = [s for s in sequences if s[0]]
    loss = 0.0
    grads = []
    for policy, ref, p in sequences:
        h = math.fsum(a - b for a, b in zip(policy, ref))
        residual = h - (p - 0.5) / beta
        if policy:
            loss += residual ** 2 / len(kept)
        grads.append([2.0 * residual / len(kept) if t < len(policy) else 0.0 for t in range(T)])
    return loss, grads


@pytest.mark.parametrize("beta", [0.001, 0.1, 1.0, 3.0])
def test_sppo_value(beta):
    inputs = _inputs(requires_grad=True)
    loss, metrics = sppo(inputs, beta=beta)
    value, grads = _expected(beta)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12)
    loss.backward()
    assert inputs.logps.grad.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-12) for row in grads]
    kept = [s for s in SEQUENCES if s[0]]
    log_ratios = [math.fsum(a - b for a, b in zip(s[0], s[1])) for s in kept]
    assert float(metrics["kl"]) == pytest.approx(sum(log_ratios) / len(kept))
    assert float(metrics["win_rate"]) == pytest.approx(sum(s[2] for s in kept) / len(kept))
    residuals = [abs(h - (s[2] - 0.5) / beta) for h, s in zip(log_ratios, kept)]
    assert float(metrics["sppo/residual"]) == pytest.approx(sum(residuals) / len(kept))
    assert resolve_loss("sppo").fn is sppo and resolve_loss("sppo").runner == "sppo"


def test_sppo_matches_the_reference_codes_pair_loss():
    """uclaml/SPPO's loss_type=sppo on (chosen, rejected) pairs with their win rates P_w, P_l."""
    beta = 0.01
    pairs = [((-5.0, -5.5, 0.8), (-7.0, -6.5, 0.3)), ((-2.0, -2.0, 0.6), (-9.0, -8.0, 0.55))]
    expected = sum(((lw - rw) - (pw - 0.5) / beta) ** 2 / 2 + ((ll - rl) - (pl - 0.5) / beta) ** 2 / 2
                   for (lw, rw, pw), (ll, rl, pl) in pairs) / len(pairs)
    sequences = [([x[0]], [x[1]], x[2]) for pair in pairs for x in pair]
    assert float(sppo(_inputs(sequences), beta=beta)[0]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [0.05, 0.1, 2.0])
def test_hard_win_rates_reduce_to_sppo_hard(beta):
    """P = 1 for the chosen and 0 for the rejected: the mean of the pair's two terms, so exactly half of
    sppo_hard (TRL's sum of them), and the gradients are half of sppo_hard's (the same direction)."""
    pairs = [(-5.0, -7.0, -6.0, -6.5), (-3.0, -2.0, -3.5, -2.2), (-10.0, -9.0, -9.8, -9.5)]
    paired = SequenceLogps(logps=torch.tensor([[p[0], p[1]] for p in pairs], dtype=torch.float64, requires_grad=True),
                           lengths=torch.full((len(pairs), 2), 3.0, dtype=torch.float64),
                           mask=torch.ones(len(pairs), 2, dtype=torch.bool),
                           ref_logps=torch.tensor([[p[2], p[3]] for p in pairs], dtype=torch.float64))
    # the same sums spread over 3 tokens each, chosen then rejected per prompt (group-major)
    sequences = [([s / 3] * 3, [r / 3] * 3, win) for c, rj, rc, rr in pairs for s, r, win in ((c, rc, 1.0), (rj, rr, 0.0))]
    rollout = _inputs(sequences, requires_grad=True)
    hard, _ = sppo_hard(paired, beta=beta)
    soft, _ = sppo(rollout, beta=beta)
    assert float(soft.detach()) == pytest.approx(float(hard.detach()) / 2, rel=1e-12)
    hard.backward()
    soft.backward()
    token_grads = rollout.logps.grad[:, :3]
    assert torch.allclose(token_grads, token_grads[:, :1].expand(-1, 3))  # every token of a sequence alike
    assert token_grads[:, 0].view(len(pairs), 2).tolist() == [
        pytest.approx([g / 2 for g in row], rel=1e-12) for row in paired.logps.grad.tolist()]


def test_gradient_signs_at_the_previous_iterate():
    """At pi = pi_t (h = 0): a reply that beats pi_t more often than not is pushed up, one that loses
    pushed down, a tie (P = 1/2) not moved; a reply already at its target is not moved either."""
    beta = 0.1
    sequences = [([-1.0, -2.0], [-1.0, -2.0], p) for p in (0.9, 0.6, 0.5, 0.4, 0.0)]
    sequences.append(([-1.0, -2.0 + 4.0], [-1.0, -2.0], 0.9))  # h = 4 = (0.9 - 0.5) / 0.1: on target
    inputs = _inputs(sequences, requires_grad=True)
    sppo(inputs, beta=beta)[0].backward()
    grad = inputs.logps.grad[:, 0]
    assert (grad[:2] < 0).all() and grad[2] == 0 and (grad[3:5] > 0).all(), grad
    assert float(grad[5]) == pytest.approx(0.0, abs=1e-12)
    assert float(grad[1]) > float(grad[0])  # the larger win rate pulls harder


def test_reference_and_win_rates_get_no_gradient_and_large_values_stay_finite():
    inputs = _inputs()
    inputs.logps.requires_grad_(True)
    inputs.ref_logps.requires_grad_(True)
    inputs.advantages.requires_grad_(True)
    loss, metrics = sppo(inputs, beta=0.1)
    grads = torch.autograd.grad(loss, [inputs.ref_logps, inputs.advantages], allow_unused=True)
    assert all(g is None or not g.abs().sum() for g in grads)
    huge = _inputs([([1e4, -1e4], [-1e4, 1e4], 1.0), ([-1e4], [1e4], 0.0)], requires_grad=True)
    loss, metrics = sppo(huge, beta=1e-4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(huge.logps.grad).all()
    assert all(torch.isfinite(v) and not v.requires_grad for v in metrics.values())


def test_only_empty_completions_give_a_zero_loss():
    loss, metrics = sppo(_inputs([([], [], 0.9), ([], [], 0.1)]), beta=0.1)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in metrics.values())


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_bad_beta_and_missing_reference_fail_clearly(beta):
    with pytest.raises(ConfigError, match="sppo.*beta"):
        sppo(_inputs(), beta=beta)
    inputs = _inputs()
    inputs.ref_logps = None
    with pytest.raises(ValueError, match="ref_logps"):
        sppo(inputs)
