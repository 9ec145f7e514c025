"""Advantage estimators against hand formulas written with plain Python loops."""

import math
import statistics

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rl.advantages import (
    compute_advantages,
    compute_gae,
    frac_zero_std_groups,
    resolve_advantage,
    whiten,
    zero_std_groups_mask,
)

# groups 0 (varied), 7 (all equal), 3 (one sample), 5 (varied, size 3); ids deliberately not contiguous
REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 5.0, 0.5, -1.0, 3.0]
GROUPS = [0, 0, 0, 0, 7, 7, 7, 7, 3, 5, 5, 5]


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def assert_nested_close(got: torch.Tensor, expected: list, atol: float = 1e-5):
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=atol, rtol=1e-5)


def _groups():
    out = {}
    for r, g in zip(REWARDS, GROUPS):
        out.setdefault(g, []).append(r)
    return out


def hand_grpo(scale, eps=1e-6):
    groups = _groups()
    batch_std = statistics.stdev(REWARDS)
    out = []
    for r, g in zip(REWARDS, GROUPS):
        members = groups[g]
        if len(members) == 1:
            out.append(0.0)
            continue
        centred = r - statistics.fmean(members)
        denom = {"group": statistics.stdev(members) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out.append(centred / denom)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_hand_formula(scale):
    got = compute_advantages("grpo", _t(REWARDS), _t(GROUPS, torch.long), scale=scale)
    assert got.tolist() == pytest.approx(hand_grpo(scale), rel=1e-5, abs=1e-6)


def test_grpo_zero_std_group_and_singleton_get_zero():
    got = compute_advantages("grpo", _t(REWARDS), _t(GROUPS, torch.long))
    assert got[4:9].abs().max().item() == 0.0
    assert torch.isfinite(got).all()


def test_grpo_scale_choices_are_validated():
    with pytest.raises(ConfigError, match="group, batch, none"):
        compute_advantages("grpo", _t(REWARDS), _t(GROUPS, torch.long), scale="std")


def test_rloo_is_reward_minus_mean_of_others():
    groups = _groups()
    expected = []
    for i, (r, g) in enumerate(zip(REWARDS, GROUPS)):
        others = [REWARDS[j] for j in range(len(REWARDS)) if GROUPS[j] == g and j != i]
        expected.append(r - sum(others) / len(others) if others else 0.0)
    got = compute_advantages("rloo", _t(REWARDS), _t(GROUPS, torch.long))
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert len(groups[3]) == 1 and got[8].item() == 0.0


# ragged completions: lengths 3, 1, 4, 2 over T = 4; row 2 has a hole at t=1 (e.g. an env token)
MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 1, 1], [1, 1, 0, 0]]
TOKEN_REWARDS = [[0.1, -0.2, 1.5, 0.0], [2.0, 0.0, 0.0, 0.0], [-0.1, 0.0, 0.3, -1.0], [0.0, 0.7, 0.0, 0.0]]
VALUES = [[0.5, 0.4, 0.9, 0.0], [1.0, 0.0, 0.0, 0.0], [0.2, 9.0, -0.3, 0.1], [0.3, 0.6, 0.0, 0.0]]
SEQ_REWARDS = [1.0, 0.0, 2.0, 0.5]
SEQ_GROUPS = [0, 0, 1, 1]


def valid_positions(row):
    return [t for t in range(len(MASK[row])) if MASK[row][t]]


def hand_returns(row, gamma):
    pos = valid_positions(row)
    out, running = {}, 0.0
    for t in reversed(pos):
        running = TOKEN_REWARDS[row][t] + gamma * running
        out[t] = running
    return out


def hand_token_whiten(per_row):  # per_row: list of {t: value}
    flat = [v for d in per_row for v in d.values()]
    mean, var = statistics.fmean(flat), statistics.variance(flat)
    return [[(d[t] - mean) / math.sqrt(var + 1e-8) if t in d else 0.0 for t in range(4)] for d in per_row]


def test_reinforce_pp_discounted_token_returns_whitened_over_batch():
    gamma = 0.9
    expected = hand_token_whiten([hand_returns(i, gamma) for i in range(4)])
    got = compute_advantages(
        "reinforce_pp",
        _t(SEQ_REWARDS),
        _t(SEQ_GROUPS, torch.long),
        token_rewards=_t(TOKEN_REWARDS),
        mask=_t(MASK, torch.bool),
        gamma=gamma,
    )
    assert_nested_close(got, expected)


def test_reinforce_pp_baseline_subtracts_group_mean_then_whitens_tokens():
    means = {
        g: statistics.fmean([r for r, gg in zip(SEQ_REWARDS, SEQ_GROUPS) if gg == g]) for g in set(SEQ_GROUPS)
    }
    per_row = [{t: SEQ_REWARDS[i] - means[SEQ_GROUPS[i]] for t in valid_positions(i)} for i in range(4)]
    got = compute_advantages(
        "reinforce_pp_baseline", _t(SEQ_REWARDS), _t(SEQ_GROUPS, torch.long), mask=_t(MASK, torch.bool)
    )
    assert_nested_close(got, hand_token_whiten(per_row))


def test_reinforce_pp_without_mask_whitens_sequence_rewards():
    mean, sd = statistics.fmean(SEQ_REWARDS), statistics.stdev(SEQ_REWARDS)
    got = compute_advantages("reinforce_pp", _t(SEQ_REWARDS), _t(SEQ_GROUPS, torch.long))
    assert_nested_close(got, [(r - mean) / sd for r in SEQ_REWARDS])


def hand_gae(row, gamma, lam):
    pos = valid_positions(row)
    adv = {}
    next_v, next_a = 0.0, 0.0
    for t in reversed(pos):
        delta = TOKEN_REWARDS[row][t] + gamma * next_v - VALUES[row][t]
        next_a = delta + gamma * lam * next_a
        next_v = VALUES[row][t]
        adv[t] = next_a
    return adv


def test_gae_matches_hand_recursion_with_ragged_and_holey_masks():
    gamma, lam = 0.95, 0.8
    adv, ret = compute_gae(_t(TOKEN_REWARDS), _t(VALUES), _t(MASK, torch.bool), gamma=gamma, lam=lam)
    for i in range(4):
        h = hand_gae(i, gamma, lam)
        for t in range(4):
            want_a = h.get(t, 0.0)
            want_r = want_a + VALUES[i][t] if t in h else 0.0
            assert adv[i, t].item() == pytest.approx(want_a, abs=1e-5)
            assert ret[i, t].item() == pytest.approx(want_r, abs=1e-5)
    whitened = compute_advantages(
        "gae",
        _t(SEQ_REWARDS),
        _t(SEQ_GROUPS, torch.long),
        token_rewards=_t(TOKEN_REWARDS),
        values=_t(VALUES),
        mask=_t(MASK, torch.bool),
        gamma=gamma,
        lam=lam,
    )
    assert_nested_close(whitened, hand_token_whiten([hand_gae(i, gamma, lam) for i in range(4)]))


def test_gae_gamma_lam_one_is_return_minus_value():
    adv, _ = compute_gae(_t(TOKEN_REWARDS), _t(VALUES), _t(MASK, torch.bool), gamma=1.0, lam=1.0)
    for i in range(4):
        rets = hand_returns(i, 1.0)
        for t, g in rets.items():
            assert adv[i, t].item() == pytest.approx(g - VALUES[i][t], abs=1e-5)


def test_whiten_and_zero_std_groups():
    x = _t([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = _t([[1, 1, 0], [1, 1, 0]], torch.bool)
    vals = [1.0, 2.0, 3.0, 4.0]
    mean, sd = statistics.fmean(vals), statistics.stdev(vals)
    assert_nested_close(
        whiten(x, m), [[(1 - mean) / sd, (2 - mean) / sd, 0.0], [(3 - mean) / sd, (4 - mean) / sd, 0.0]]
    )
    zero = zero_std_groups_mask(_t(REWARDS), _t(GROUPS, torch.long))
    assert zero.tolist() == [False] * 4 + [True] * 5 + [False] * 3
    assert frac_zero_std_groups(_t(REWARDS), _t(GROUPS, torch.long)).item() == pytest.approx(2 / 4)


def test_registry_validates_names():
    with pytest.raises(ConfigError, match="gae, grpo, reinforce_pp, reinforce_pp_baseline, rloo"):
        resolve_advantage("ppo")
    with pytest.raises(ConfigError, match="lam"):
        compute_advantages("grpo", _t(REWARDS), _t(GROUPS, torch.long), lam=0.9)


def test_sequence_advantages_are_broadcast_over_the_mask():
    got = compute_advantages("rloo", _t(SEQ_REWARDS), _t(SEQ_GROUPS, torch.long), mask=_t(MASK, torch.bool))
    seq = compute_advantages("rloo", _t(SEQ_REWARDS), _t(SEQ_GROUPS, torch.long))
    for i in range(4):
        for t in range(4):
            assert got[i, t].item() == (seq[i].item() if MASK[i][t] else 0.0)
