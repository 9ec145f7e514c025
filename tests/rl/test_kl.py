"""KL estimators and PPO reward shaping against direct formulas."""

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rl.kl import kl_per_token, last_token_index, shape_token_rewards


def test_estimators_match_formulas():
    lp, ref = torch.tensor([[-1.0, -0.2, -3.0]]), torch.tensor([[-1.5, -0.1, -0.7]])
    for a, b, k1, k2, k3 in zip(
        lp[0].tolist(), ref[0].tolist(), *[kl_per_token(lp, ref, k)[0].tolist() for k in ("k1", "k2", "k3")]
    ):
        d = a - b
        assert k1 == pytest.approx(d)
        assert k2 == pytest.approx(d * d / 2)
        assert k3 == pytest.approx(math.exp(b - a) - (b - a) - 1)
        assert k3 >= 0
    with pytest.raises(ConfigError, match="k1, k2, k3"):
        kl_per_token(lp, ref, "k4")


def test_k1_and_k3_are_unbiased_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp, ref = p.log()[x], q.log()[x]
    assert kl_per_token(lp, ref, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_per_token(lp, ref, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_shape_token_rewards_puts_reward_on_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    lp = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-0.3, 9.0, 9.0, 9.0], [9.0, -1.0, -1.2, 9.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.5, 0.0], [-0.1, 0.0, 0.0, 0.0], [0.0, -2.0, -1.0, 0.0]])
    rewards = torch.tensor([1.0, -1.0, 0.5])
    got = shape_token_rewards(rewards, mask, logps=lp, ref_logps=ref, kl_coef=0.1, estimator="k1")
    for i in range(3):
        last = max(t for t in range(4) if mask[i, t])
        for t in range(4):
            want = 0.0
            if mask[i, t]:
                want = -0.1 * (lp[i, t].item() - ref[i, t].item()) + (rewards[i].item() if t == last else 0.0)
            assert got[i, t].item() == pytest.approx(want, abs=1e-6)
    assert last_token_index(mask).tolist() == [2, 0, 2]
    with pytest.raises(ValueError):
        last_token_index(torch.zeros(1, 3, dtype=torch.bool))
