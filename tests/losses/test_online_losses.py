"""Values, gradient signs and edge cases of ``xpo`` and ``nash_md`` (alignkit/losses/online.py).

Expected values are written here from the papers / TRL's ``_compute_losses`` with ``math`` on floats
(XPO: TRL ``XPOTrainer._compute_losses``, ``dpo_losses + alpha * model_logprobs_ref_data_sum``;
Nash-MD: TRL ``NashMDTrainer._compute_losses``, ``beta * sum(stopgrad(log_ratio) * logp) -
(P - 0.5) * sum(logp)``), never with the package's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import RolloutLogps, SequenceLogps, resolve_loss
from alignkit.losses.dpo import dpo, ipo
from alignkit.losses.online import nash_md, xpo
from offline_loss_cases import log_sigmoid, mean

torch.set_num_threads(1)

# (policy chosen, policy rejected, ref chosen, ref rejected, len chosen, len rejected, slot of the reference sample)
XPO_PAIRS = [
    (-5.0, -7.0, -6.0, -6.5, 4.0, 6.0, 1),  # the policy's sample won
    (-3.0, -2.0, -3.5, -2.2, 3.0, 2.0, 0),  # the reference's sample won
    (-10.0, -9.0, -9.8, -9.5, 7.0, 5.0, 1),
]


def _xpo_inputs(pairs=XPO_PAIRS, requires_grad=False) -> SequenceLogps:
    return SequenceLogps(
        logps=torch.tensor([[p[0], p[1]] for p in pairs], dtype=torch.float64, requires_grad=requires_grad),
        lengths=torch.tensor([[p[4], p[5]] for p in pairs], dtype=torch.float64),
        mask=torch.ones(len(pairs), 2, dtype=torch.bool),
        ref_logps=torch.tensor([[p[2], p[3]] for p in pairs], dtype=torch.float64),
        from_reference=torch.tensor([[p[6] == 0, p[6] == 1] for p in pairs]),
    )


def _xpo_expected(beta: float, alpha: float, loss_type: str) -> float:
    per_pair = []
    for lc, lr, rc, rr, nc, nr, ref_slot in XPO_PAIRS:
        if loss_type == "sigmoid":
            preference = -log_sigmoid(beta * ((lc - rc) - (lr - rr)))
        else:  # alignkit's ipo: per-token log-ratios (lengths clamped at 1)
            preference = ((lc - rc) / nc - (lr - rr) / nr - 1.0 / (2.0 * beta)) ** 2
        per_pair.append(preference + alpha * (lc, lr)[ref_slot])
    return mean(per_pair)


@pytest.mark.parametrize("beta, alpha, loss_type", [(0.1, 1e-5, "sigmoid"), (0.5, 0.3, "sigmoid"), (0.1, 0.2, "ipo"),
                                                    (1.0, 0.0, "ipo")])
def test_xpo_value(beta, alpha, loss_type):
    loss, metrics = xpo(_xpo_inputs(), beta=beta, alpha=alpha, loss_type=loss_type)
    assert float(loss) == pytest.approx(_xpo_expected(beta, alpha, loss_type), rel=1e-12)
    reference_samples = [(p[0], p[1])[p[6]] for p in XPO_PAIRS]
    assert float(metrics["logps/reference_sample"]) == pytest.approx(mean(reference_samples))
    assert float(metrics["loss/exploration"]) == pytest.approx(alpha * mean(reference_samples))
    assert float(metrics["loss/preference"]) == pytest.approx(_xpo_expected(beta, 0.0, loss_type), rel=1e-12)
    assert resolve_loss("xpo").fn is xpo  # the registered loss is the one tested


def test_xpo_defaults_are_trls():
    assert resolve_loss("xpo").hparams() == {"beta": 0.1, "alpha": 1e-5, "loss_type": "sigmoid"}
    assert resolve_loss("xpo").runner == "xpo" and resolve_loss("xpo").view == "pairwise"


@pytest.mark.parametrize("loss_type, base", [("sigmoid", dpo), ("ipo", ipo)])
def test_xpo_at_alpha_zero_is_the_online_dpo_loss(loss_type, base):
    inputs = _xpo_inputs()
    loss, metrics = xpo(inputs, beta=0.3, alpha=0.0, loss_type=loss_type)
    expected, expected_metrics = base(inputs, beta=0.3)
    assert torch.equal(loss, expected)
    for key, value in expected_metrics.items():
        assert torch.equal(metrics[key], value), key


def test_xpo_exploration_pushes_the_reference_sample_down_and_leaves_the_policy_sample():
    """d loss / d log pi(reference sample) grows by alpha / G; the policy's sample's gradient is DPO's alone."""
    alpha, g = 0.7, len(XPO_PAIRS)
    with_term, without = _xpo_inputs(requires_grad=True), _xpo_inputs(requires_grad=True)
    xpo(with_term, alpha=alpha)[0].backward()
    xpo(without, alpha=0.0)[0].backward()
    delta = with_term.logps.grad - without.logps.grad
    from_ref = with_term.from_reference.double()
    assert torch.allclose(delta, alpha / g * from_ref, atol=1e-15), delta
    # the DPO part: the chosen goes up, the rejected down, whichever sampler produced it
    assert (without.logps.grad[:, 0] < 0).all() and (without.logps.grad[:, 1] > 0).all()
    # with a large alpha the reference's chosen sample is pushed down (gradient > 0) despite winning
    assert with_term.logps.grad[1, 0] > 0


def test_xpo_refuses_missing_sampler_slots_and_bad_knobs():
    inputs = _xpo_inputs()
    inputs.from_reference = None
    with pytest.raises(ValueError, match="from_reference"):
        xpo(inputs)
    with pytest.raises(ConfigError, match="loss_type"):
        xpo(_xpo_inputs(), loss_type="hinge")
    with pytest.raises(ConfigError, match="alpha"):
        xpo(_xpo_inputs(), alpha=-1.0)
    with pytest.raises(ConfigError, match="beta"):
        xpo(_xpo_inputs(), beta=0.0)


# Nash-MD: 3 policy samples, T=4, ragged (lengths 3, 4, 1); P = preference of each over its mixture sample
NASH_LOGPS = [[-0.5, -1.0, -0.2, 0.0], [-0.3, -0.7, -1.1, -0.4], [-2.0, 0.0, 0.0, 0.0]]
NASH_REF = [[-0.6, -0.8, -0.5, 0.0], [-0.2, -0.9, -1.0, -0.6], [-1.5, 0.0, 0.0, 0.0]]
NASH_LENGTHS = [3, 4, 1]
NASH_P = [0.8, 0.3, 0.5]


def _nash_inputs(requires_grad=False, with_ref=True) -> RolloutLogps:
    logps = torch.tensor(NASH_LOGPS, dtype=torch.float64, requires_grad=requires_grad)
    mask = torch.arange(4)[None, :] < torch.tensor(NASH_LENGTHS)[:, None]
    garbage = torch.where(mask, 0.0, 7.0).double()  # values outside the mask must not count
    return RolloutLogps(
        logps=logps + garbage,
        old_logps=(logps + garbage).detach(),
        advantages=(torch.tensor(NASH_P, dtype=torch.float64) - 0.5)[:, None].expand(3, 4),
        mask=mask,
        ref_logps=torch.tensor(NASH_REF, dtype=torch.float64) + garbage if with_ref else None,
    )


def _nash_expected(beta: float) -> tuple[float, float, float]:
    losses, scores, kls = [], [], []
    for lp, ref, n, p in zip(NASH_LOGPS, NASH_REF, NASH_LENGTHS, NASH_P):
        score = (p - 0.5) * sum(lp[:n])
        kl_loss = sum((lp[t] - ref[t]) * lp[t] for t in range(n))  # stopgrad(log ratio) * logp
        losses.append(beta * kl_loss - score)
        scores.append(score)
        kls.append(sum(lp[t] - ref[t] for t in range(n)))
    return mean(losses), mean(scores), mean(kls)


@pytest.mark.parametrize("beta", [0.1, 0.0, 2.0])
def test_nash_md_value(beta):
    loss, metrics = nash_md(_nash_inputs(), beta=beta)
    expected, score, kl = _nash_expected(beta)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(metrics["loss/score"]) == pytest.approx(score, rel=1e-12)
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-12)
    assert resolve_loss("nash_md").fn is nash_md
    assert resolve_loss("nash_md").hparams() == {"beta": 0.1}


def test_nash_md_gradient_is_reinforce_plus_the_kl_score_function():
    """d loss / d log pi_t = (-(P - 0.5) + beta * (log pi_t - log ref_t)) / S on the mask, 0 elsewhere:
    a preferred sample (P > 0.5) is pushed up, a dispreferred one down; the KL term pulls toward the reference."""
    beta = 0.4
    mask = torch.arange(4)[None, :] < torch.tensor(NASH_LENGTHS)[:, None]
    base = torch.tensor(NASH_LOGPS, dtype=torch.float64, requires_grad=True)
    inputs = _nash_inputs()
    inputs.logps = base + torch.where(mask, 0.0, 7.0).double()  # garbage outside the mask, as _nash_inputs
    nash_md(inputs, beta=beta)[0].backward()
    for s, (lp, ref, n, p) in enumerate(zip(NASH_LOGPS, NASH_REF, NASH_LENGTHS, NASH_P)):
        for t in range(4):
            expected = (-(p - 0.5) + beta * (lp[t] - ref[t])) / 3 if t < n else 0.0
            assert float(base.grad[s, t]) == pytest.approx(expected, abs=1e-12), (s, t)
    no_kl = torch.tensor(NASH_LOGPS, dtype=torch.float64, requires_grad=True)
    inputs = _nash_inputs()
    inputs.logps = no_kl + torch.where(mask, 0.0, 7.0).double()
    nash_md(inputs, beta=0.0)[0].backward()
    assert (no_kl.grad[0, :3] < 0).all() and (no_kl.grad[1] > 0).all() and (no_kl.grad[2] == 0).all()


def test_nash_md_reference_needs():
    spec = resolve_loss("nash_md")
    assert spec.reference_needed({"beta": 0.1}) and not spec.reference_needed({"beta": 0.0})
    loss, metrics = nash_md(_nash_inputs(with_ref=False), beta=0.0)
    assert "kl" not in metrics and float(loss) == pytest.approx(_nash_expected(0.0)[0], rel=1e-12)
    with pytest.raises(ValueError, match="ref_logps"):
        nash_md(_nash_inputs(with_ref=False), beta=0.1)
    with pytest.raises(ConfigError, match="beta"):
        nash_md(_nash_inputs(), beta=-0.1)


def test_preference_probability_choices():
    from alignkit.trainers.nash_md import preference

    policy, mixture = torch.tensor([1.0, 0.2, 0.5]), torch.tensor([0.0, 0.7, 0.5])
    sig = preference(policy, mixture, "sigmoid")
    assert [float(x) for x in sig] == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5)), 0.5])
    assert preference(policy, mixture, "hard").tolist() == pytest.approx([1.0, 0.0, 0.5])
    with pytest.raises(ConfigError, match="rl.preference"):
        preference(policy, mixture, "soft")
