"""Rollout losses (grpo, ppo, ppo_value) against per-token hand formulas written as plain loops."""

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import RolloutLogps, resolve_loss
from alignkit.losses.rollout import grpo, ppo, ppo_value

# three sequences of lengths 3, 1, 4 (T = 4); masked positions hold garbage on purpose
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
LOGPS = [[-1.0, -0.5, -2.0, 50.0], [-0.7, 80.0, -9.0, 3.0], [-1.2, -0.3, -0.9, -2.2]]
OLD = [[-1.1, -0.9, -1.9, -60.0], [-0.2, -70.0, 4.0, 1.0], [-1.2, -0.25, -1.5, -1.0]]
REF = [[-0.8, -0.6, -2.5, 0.0], [-0.9, 0.0, 0.0, 0.0], [-1.0, -0.4, -1.0, -2.0]]
ADV = [1.0, -0.5, 2.0]


def make_inputs(logps=LOGPS, old=OLD, adv=ADV, mask=MASK, ref=REF, token_adv=None):
    lp = torch.tensor(logps, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.bool)
    a = (
        torch.tensor(token_adv)
        if token_adv is not None
        else torch.tensor(adv)[:, None].expand(len(adv), len(mask[0])).clone()
    )
    return lp, RolloutLogps(
        logps=lp,
        old_logps=torch.tensor(old),
        advantages=a,
        mask=m,
        ref_logps=None if ref is None else torch.tensor(ref),
    )


def hand_token_loss(lp, old, a, ref, eps_low, eps_high, beta, ratio=None):
    r = math.exp(lp - old) if ratio is None else ratio
    clipped = min(max(r, 1 - eps_low), 1 + eps_high)
    loss = -min(r * a, clipped * a)
    if beta:
        loss += beta * (math.exp(ref - lp) - (ref - lp) - 1)
    return loss


def hand_objective(
    loss_agg, eps_low=0.2, eps_high=0.2, beta=0.0, level="token", max_len=None, token_adv=None
):
    per_seq = []
    for i, row in enumerate(MASK):
        pos = [t for t in range(len(row)) if row[t]]
        seq_ratio = (
            math.exp(sum(LOGPS[i][t] - OLD[i][t] for t in pos) / len(pos)) if level == "sequence" else None
        )
        per_seq.append(
            [
                hand_token_loss(
                    LOGPS[i][t],
                    OLD[i][t],
                    ADV[i] if token_adv is None else token_adv[i][t],
                    REF[i][t],
                    eps_low,
                    eps_high,
                    beta,
                    seq_ratio,
                )
                for t in pos
            ]
        )
    if loss_agg == "seq_mean_token_mean":
        return sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    if loss_agg == "token_mean":
        return sum(sum(s) for s in per_seq) / sum(len(s) for s in per_seq)
    return sum(sum(s) for s in per_seq) / (len(per_seq) * max_len)


@pytest.mark.parametrize("loss_agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_matches_hand_formula(loss_agg, level):
    _, inputs = make_inputs()
    hp = {
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "beta": 0.04,
        "importance_sampling_level": level,
        "loss_agg": loss_agg,
        "max_completion_length": 8,
    }
    loss, metrics = grpo(inputs, **hp)
    want = hand_objective(loss_agg, 0.2, 0.28, 0.04, level, max_len=8)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert torch.isfinite(loss)
    kl = [
        math.exp(REF[i][t] - LOGPS[i][t]) - (REF[i][t] - LOGPS[i][t]) - 1
        for i in range(3)
        for t in range(4)
        if MASK[i][t]
    ]
    assert metrics["kl"].item() == pytest.approx(sum(kl) / len(kl), rel=1e-5)


def test_loss_agg_modes_normalise_ragged_lengths_differently():
    _, inputs = make_inputs()
    values = {
        mode: grpo(inputs, loss_agg=mode, max_completion_length=4)[0].item()
        for mode in ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
    }
    assert len({round(v, 6) for v in values.values()}) == 3


def test_gradients_are_finite_and_zero_on_masked_tokens():
    lp, inputs = make_inputs()
    loss, _ = grpo(inputs, beta=0.1)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad[~inputs.mask].abs().max().item() == 0.0


def single_token(ratio, adv, eps_low=0.2, eps_high=0.2):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    inputs = RolloutLogps(
        logps=lp,
        old_logps=torch.zeros(1, 1),
        advantages=torch.tensor([[adv]]),
        mask=torch.ones(1, 1, dtype=torch.bool),
    )
    loss, metrics = grpo(inputs, epsilon_low=eps_low, epsilon_high=eps_high)
    loss.backward()
    return loss.item(), lp.grad.item(), metrics


@pytest.mark.parametrize(
    "ratio, adv, clipped, side",
    [
        (1.2 + 1e-3, 1.0, True, "high"),  # above 1 + eps with A > 0: clipped, no gradient
        (1.2 - 1e-3, 1.0, False, None),  # just inside
        (0.8 - 1e-3, -1.0, True, "low"),  # below 1 - eps with A < 0: clipped
        (0.8 + 1e-3, -1.0, False, None),
        (0.5, 1.0, False, None),  # below 1 - eps with A > 0: min picks the unclipped (pessimistic) term
        (1.5, -1.0, False, None),  # above 1 + eps with A < 0: unclipped too
    ],
)
def test_clip_boundaries(ratio, adv, clipped, side):
    loss, grad, metrics = single_token(ratio, adv)
    bound = min(max(ratio, 0.8), 1.2)
    assert loss == pytest.approx(-min(ratio * adv, bound * adv), rel=1e-5)
    # d(-r A)/d logp = -r A when unclipped; 0 when clipped
    assert grad == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-6)
    assert metrics["clip_fraction"].item() == float(clipped)
    assert metrics["clip_fraction/low"].item() == float(side == "low")
    assert metrics["clip_fraction/high"].item() == float(side == "high")


def test_dapo_clip_higher_separates_the_two_sides():
    assert single_token(1.25, 1.0, eps_low=0.2, eps_high=0.2)[2]["clip_fraction"].item() == 1.0
    assert single_token(1.25, 1.0, eps_low=0.2, eps_high=0.28)[2]["clip_fraction"].item() == 0.0
    assert single_token(0.75, -1.0, eps_low=0.2, eps_high=0.28)[2]["clip_fraction/low"].item() == 1.0


def test_gspo_sequence_ratio_gradient_is_shared_across_tokens():
    # no clipping (wide eps): loss = -(1/N) sum_i s_i A_i, d/dlogp_it = -(1/N) A_i s_i / L_i
    lp, inputs = make_inputs()
    loss, metrics = grpo(inputs, importance_sampling_level="sequence", epsilon_low=0.99, epsilon_high=100.0)
    loss.backward()
    ratios = []
    for i, row in enumerate(MASK):
        pos = [t for t in range(4) if row[t]]
        s = math.exp(sum(LOGPS[i][t] - OLD[i][t] for t in pos) / len(pos))
        ratios += [s] * len(pos)
        for t in range(4):
            want = -ADV[i] * s / len(pos) / 3 if row[t] else 0.0
            assert lp.grad[i, t].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert metrics["ratio/mean"].item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)


def test_ppo_uses_token_level_advantages():
    token_adv = [[0.5, -1.0, 2.0, 7.0], [1.5, 0.0, 0.0, 0.0], [-0.3, 0.2, 1.0, -2.0]]
    _, inputs = make_inputs(token_adv=token_adv, ref=None)
    loss, metrics = ppo(inputs, epsilon_low=0.2, epsilon_high=0.2)
    assert loss.item() == pytest.approx(hand_objective("token_mean", token_adv=token_adv), rel=1e-5)
    assert "kl" not in metrics


def test_beta_needs_reference_and_enums_are_validated():
    _, inputs = make_inputs(ref=None)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo(inputs, beta=0.1)
    with pytest.raises(ConfigError, match="token, sequence"):
        grpo(inputs, importance_sampling_level="seq")
    with pytest.raises(ConfigError, match="seq_mean_token_mean, token_mean, seq_mean_token_sum_norm"):
        grpo(inputs, loss_agg="mean")
    with pytest.raises(ConfigError, match="max_completion_length"):
        grpo(inputs, loss_agg="seq_mean_token_sum_norm")


def test_registration():
    for name in ("grpo", "ppo", "ppo_value"):
        spec = resolve_loss(name)
        assert spec.view == "rollout" and not spec.reference_needed()  # at the defaults (grpo: beta = 0)
        assert spec.runner == ("grpo" if name == "grpo" else "ppo")


def test_ppo_value_clipped_loss_matches_hand_formula():
    values = [[0.5, 1.5, -0.2, 9.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.1, 0.3, 0.2]]
    old = [[0.4, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.3, 0.0]]
    returns = [[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.0, -1.0, 0.5]]
    v = torch.tensor(values, requires_grad=True)
    inputs = RolloutLogps(
        logps=torch.zeros(3, 4),
        old_logps=torch.zeros(3, 4),
        advantages=torch.zeros(3, 4),
        mask=torch.tensor(MASK, dtype=torch.bool),
        values=v,
        old_values=torch.tensor(old),
        returns=torch.tensor(returns),
    )
    c = 0.2
    terms, clipped = [], []
    for i in range(3):
        for t in range(4):
            if MASK[i][t]:
                vc = old[i][t] + min(max(values[i][t] - old[i][t], -c), c)
                e, ec = (values[i][t] - returns[i][t]) ** 2, (vc - returns[i][t]) ** 2
                terms.append(0.5 * max(e, ec))
                clipped.append(ec > e)
    loss, metrics = ppo_value(inputs, value_clip=c)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert sum(clipped) == 1 and metrics["value/clip_fraction"].item() == pytest.approx(
        sum(clipped) / len(clipped)
    )
    loss_unclipped, _ = ppo_value(inputs, value_clip=None)
    plain = [0.5 * (values[i][t] - returns[i][t]) ** 2 for i in range(3) for t in range(4) if MASK[i][t]]
    assert loss_unclipped.item() == pytest.approx(sum(plain) / len(plain), rel=1e-5)
