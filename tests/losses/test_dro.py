"""DRO (Richemond et al. 2024): the value against 1/2 mean((r - V - tau*h)^2) written here with ``math``,
the gradient signs and sizes in the policy and in the value, the runner's split into two partial
gradients against the joint gradient and against LLNL/protein_tune_rl's DRO-V surrogates (the one
public re-implementation of the paper's Algorithm 1 found), the fixed point, and the edges.

The registry-wide checks (scalar loss, detached metrics, +-1e4 log-ratios, empty completions) run on
``dro`` too, in test_offline_loss_edges.py, which reads the registry.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import SequenceLogps, available_losses

torch.set_num_threads(1)
LOSSES = available_losses()
DRO = LOSSES["dro"]
# (logp, ref_logp, reward, value) per group
ROWS = [(-12.0, -11.5, 1.0, 0.2), (-8.0, -9.0, 0.0, 0.4), (-20.0, -20.0, 1.5, -0.3), (-3.0, -2.0, -1.0, 0.0)]


def scalar(rows=ROWS, *, grad: bool = False, dtype=torch.float64) -> SequenceLogps:
    t = lambda i: torch.tensor([[row[i]] for row in rows], dtype=dtype)  # noqa: E731
    logps, values = t(0), t(3)
    if grad:
        logps.requires_grad_(True)
        values.requires_grad_(True)
    return SequenceLogps(logps=logps, lengths=torch.full_like(logps, 5.0), mask=torch.ones_like(logps, dtype=torch.bool),
                         ref_logps=t(1), scores=t(2), values=values)


def formula(rows, tau: float) -> float:
    return sum(0.5 * (r - v - tau * (lp - ref)) ** 2 for lp, ref, r, v in rows) / len(rows)


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 3.0])
def test_dro_value(tau):
    loss, metrics = LOSSES["dro"].fn(scalar(), tau=tau)
    assert loss.item() == pytest.approx(formula(ROWS, tau), rel=1e-12)
    residuals = [r - v - tau * (lp - ref) for lp, ref, r, v in ROWS]
    assert metrics["dro/residual"].item() == pytest.approx(sum(residuals) / 4)
    assert metrics["dro/abs_residual"].item() == pytest.approx(sum(map(abs, residuals)) / 4)
    assert metrics["dro/value"].item() == pytest.approx(sum(row[3] for row in ROWS) / 4)
    assert metrics["reward/mean"].item() == pytest.approx(sum(row[2] for row in ROWS) / 4)
    assert metrics["rewards/mean"].item() == pytest.approx(sum(tau * (lp - ref) for lp, ref, _, _ in ROWS) / 4)


def test_default_tau_is_one():
    assert DRO.hparams() == {"tau": 1.0}
    assert DRO.fn(scalar())[0].item() == pytest.approx(formula(ROWS, 1.0), rel=1e-12)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_gradients_push_h_toward_r_minus_v_over_tau_and_v_toward_r_minus_tau_h(tau):
    inputs = scalar(grad=True)
    DRO.fn(inputs, tau=tau)[0].backward()
    for g, (lp, ref, r, v) in enumerate(ROWS):
        residual = r - v - tau * (lp - ref)
        assert inputs.logps.grad[g, 0].item() == pytest.approx(-tau * residual / len(ROWS), rel=1e-12, abs=1e-15)
        assert inputs.values.grad[g, 0].item() == pytest.approx(-residual / len(ROWS), rel=1e-12, abs=1e-15)
        # descent raises h when tau*h < r - V (and lowers it when above), and moves V toward r - tau*h
        target_h, target_v = (r - v) / tau, r - tau * (lp - ref)
        if lp - ref != target_h:
            assert math.copysign(1, -inputs.logps.grad[g, 0].item()) == math.copysign(1, target_h - (lp - ref))
        if v != target_v:
            assert math.copysign(1, -inputs.values.grad[g, 0].item()) == math.copysign(1, target_v - v)


def test_reference_gets_no_gradient():
    inputs = scalar(grad=True)
    inputs.ref_logps.requires_grad_(True)
    loss, _ = DRO.fn(inputs)
    assert torch.autograd.grad(loss, inputs.ref_logps, allow_unused=True)[0] is None


def test_runner_split_gives_each_side_its_partial_gradient_of_the_joint_loss():
    """trainers/dro.py calls the loss once with V detached (policy) and once with the log-probs detached
    (value): each equals the joint gradient in its own variables, and no gradient leaks across."""
    from dataclasses import replace

    joint = scalar(grad=True)
    DRO.fn(joint, tau=0.7)[0].backward()
    policy_side = scalar(grad=True)
    DRO.fn(replace(policy_side, values=policy_side.values.detach()), tau=0.7)[0].backward()
    value_side = scalar(grad=True)
    DRO.fn(replace(value_side, logps=value_side.logps.detach()), tau=0.7)[0].backward()
    assert torch.equal(policy_side.logps.grad, joint.logps.grad) and policy_side.values.grad is None
    assert torch.equal(value_side.values.grad, joint.values.grad) and value_side.logps.grad is None


def test_matches_llnl_protein_tune_rl_dro_v_gradients():
    """LLNL/protein_tune_rl ``optimizer/dro.py`` (DRO-V, "algorithm 1 https://arxiv.org/pdf/2405.19107"),
    with mean=False (summed log-probs) and rescaling=False (policy_tau = tau), written out here:
    policy_loss = -tau * mean(logp * (r - sg V) - tau/2 * h^2), value_loss = mean((sg V - r + tau*sg h) * V).
    Their gradients are ours (their losses' values are surrogates, not the objective)."""
    tau = 0.8
    ours = scalar(grad=True)
    DRO.fn(ours, tau=tau)[0].backward()
    theirs = scalar(grad=True)
    logp, ref, r, v = theirs.logps[:, 0], theirs.ref_logps[:, 0], theirs.scores[:, 0], theirs.values[:, 0]
    h = logp - ref
    policy_loss = -tau * (logp * (r - v.detach()) - tau / 2 * h.pow(2)).mean()
    value_loss = ((v.detach() - r + tau * h.detach()) * v).mean()
    (policy_loss + value_loss).backward()
    assert torch.allclose(ours.logps.grad, theirs.logps.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ours.values.grad, theirs.values.grad, rtol=1e-12, atol=1e-15)


def test_minimiser_is_the_regularised_optimum():
    """Free h per completion and one V per prompt, minimised: tau*h = r - V on every completion and, with
    h tied to a normalised policy over the prompt's completions, V = tau * log sum_y pi_ref(y) exp(r_y/tau)
    (the soft value). Here the policy is a softmax over 3 completions of one prompt, pi_ref uniform."""
    tau, rewards = 0.5, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    value = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    ref = torch.full((3,), math.log(1 / 3), dtype=torch.float64)
    optimiser = torch.optim.LBFGS([logits, value], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimiser.zero_grad()
        logps = torch.log_softmax(logits, 0)
        inputs = SequenceLogps(logps=logps.view(3, 1), lengths=torch.ones(3, 1, dtype=torch.float64),
                               mask=torch.ones(3, 1, dtype=torch.bool), ref_logps=ref.view(3, 1),
                               scores=rewards.view(3, 1), values=value.expand(3).view(3, 1))
        loss, _ = DRO.fn(inputs, tau=tau)
        loss.backward()
        return loss

    optimiser.step(closure)
    soft_value = tau * math.log(sum(math.exp(r / tau) / 3 for r in rewards.tolist()))
    assert value.item() == pytest.approx(soft_value, abs=1e-6)
    optimum = [math.exp(r / tau) / sum(math.exp(x / tau) for x in rewards.tolist()) for r in rewards.tolist()]
    assert torch.softmax(logits, 0).tolist() == pytest.approx(optimum, abs=1e-6)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_tau_must_be_positive_and_finite(tau):
    with pytest.raises(ConfigError, match="tau"):
        DRO.fn(scalar(), tau=tau)


def test_tau_is_checked_at_compose_time():
    from alignkit.config.compose import compose

    with pytest.raises(ConfigError, match="tau"):
        compose(["recipe=dro_tiny", "loss.tau=0"])


def test_label_threshold_is_refused_under_dro():
    from alignkit.config.compose import compose

    with pytest.raises(ConfigError, match="label_threshold"):
        compose(["recipe=dro_tiny", "data.label_threshold=1.0"])


def test_missing_tensors_and_non_finite_rewards_are_refused():
    inputs = scalar()
    inputs.values = None
    with pytest.raises(ValueError, match="values"):
        DRO.fn(inputs)
    inputs = scalar()
    inputs.scores = None
    with pytest.raises(ValueError, match="scores"):
        DRO.fn(inputs)
    inputs = scalar()
    inputs.scores[1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        DRO.fn(inputs)


def test_registry_entry():
    assert DRO.view == "scalar" and DRO.runner == "dro" and DRO.reference_needed()
    assert not DRO.needs_kl_pairs and not DRO.needs_token_kl and not DRO.token_logps_needed()


def test_float32_inputs_keep_their_dtype():
    loss, _ = DRO.fn(scalar(dtype=torch.float32))
    assert loss.dtype == torch.float32
