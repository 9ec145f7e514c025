"""TDPO (Token-level DPO): values against the paper's formula written here with ``math`` on floats,
the sequential KL computed from explicit per-position logits, gradient signs (TDPO1 vs TDPO2's
stop-gradient), edges (alpha = 0 is DPO, policy == reference gives ln 2), knob checks, the
compose-time rules of ``needs_token_kl`` and a learning check on free per-position logits.

Formula (Zeng et al. 2024; reference code ``tdpo_loss`` in github.com/Vance0124/Token-level-Direct-
Preference-Optimization): with h = logp - ref_logp and SeqKL(y) = sum_t sum_v p_ref(v) log(p_ref(v) / p(v)),
TDPO1: -log sigmoid(beta * (h_w - h_l - (SeqKL_l - SeqKL_w))),
TDPO2: -log sigmoid(beta * (h_w - h_l - alpha * (SeqKL_l - sg SeqKL_w))), averaged over pairs.
The runner's chunked KL against full logits of a real model is in tests/models/test_token_kl.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.config.compose import compose
from alignkit.errors import ConfigError
from alignkit.losses import SequenceLogps, available_losses
from alignkit.losses.combine import build_objective
from offline_loss_cases import PAIRS, log_sigmoid, mean, paired

torch.set_num_threads(1)
LOSSES = available_losses()
SEQ_KL = [(0.3, 1.2), (2.0, 0.5), (0.0, 0.7)]  # (chosen, rejected) per pair of PAIRS


def with_kl(inputs: SequenceLogps, seq_kl=SEQ_KL, requires_grad: bool = False) -> SequenceLogps:
    inputs.seq_kl = torch.tensor(seq_kl, dtype=inputs.logps.dtype, requires_grad=requires_grad)
    return inputs


def tdpo_formula(pairs, seq_kl, beta: float, alpha: float, tdpo2: bool) -> float:
    losses = []
    for p, (kl_w, kl_l) in zip(pairs, seq_kl):
        h_w, h_l = p[0] - p[2], p[1] - p[3]
        delta = alpha * (kl_l - kl_w) if tdpo2 else kl_l - kl_w
        losses.append(-log_sigmoid(beta * (h_w - h_l - delta)))
    return mean(losses)


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.3, 0.2), (1.0, 2.0)])
@pytest.mark.parametrize("tdpo2", [True, False])
def test_tdpo_value(beta, alpha, tdpo2):
    hp = {"beta": beta, "if_tdpo2": tdpo2, **({"alpha": alpha} if tdpo2 else {})}
    loss, metrics = LOSSES["tdpo"].fn(with_kl(paired()), **hp)
    assert loss.item() == pytest.approx(tdpo_formula(PAIRS, SEQ_KL, beta, alpha, tdpo2), rel=1e-12)
    # metrics as the reference code: rewards = beta * (h + SeqKL), plus the mean SeqKL per side
    chosen = [beta * (p[0] - p[2] + kl[0]) for p, kl in zip(PAIRS, SEQ_KL)]
    rejected = [beta * (p[1] - p[3] + kl[1]) for p, kl in zip(PAIRS, SEQ_KL)]
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(chosen))
    assert metrics["rewards/margin"].item() == pytest.approx(mean(c - r for c, r in zip(chosen, rejected)))
    assert metrics["rewards/accuracy"].item() == pytest.approx(mean(float(c > r) for c, r in zip(chosen, rejected)))
    assert metrics["kl/chosen"].item() == pytest.approx(mean(kl[0] for kl in SEQ_KL))
    assert metrics["kl/rejected"].item() == pytest.approx(mean(kl[1] for kl in SEQ_KL))


def test_defaults_are_the_reference_codes_tdpo2():
    assert LOSSES["tdpo"].hparams() == {"beta": 0.1, "alpha": 0.5, "if_tdpo2": True}
    loss, _ = LOSSES["tdpo"].fn(with_kl(paired()))
    assert loss.item() == pytest.approx(tdpo_formula(PAIRS, SEQ_KL, 0.1, 0.5, True), rel=1e-12)


# Two pairs, completions of 2 tokens over a vocabulary of 4: explicit logits per position.
POLICY_LOGITS = [[[[0.2, -1.0, 0.5, 0.0], [1.5, 0.3, -0.2, 0.1]], [[0.0, 0.0, 0.9, -0.4], [-1.0, 2.0, 0.0, 0.3]]],
                 [[[0.7, 0.1, -0.3, 0.2], [0.0, -0.5, 0.4, 1.1]], [[-0.2, 0.6, 0.0, 0.0], [0.3, 0.3, -1.2, 0.8]]]]
REF_LOGITS = [[[[0.0, -0.5, 0.5, 0.2], [1.0, 0.0, 0.0, 0.0]], [[0.4, -0.1, 0.2, 0.0], [-0.5, 1.0, 0.5, 0.0]]],
              [[[0.3, 0.3, 0.0, 0.0], [0.2, -0.2, 0.1, 0.6]], [[0.0, 0.1, 0.2, -0.3], [0.0, 0.9, -0.9, 0.4]]]]
TARGETS = [[[2, 0], [2, 1]], [[0, 3], [1, 3]]]  # [pair][slot][position]


def _log_softmax(row):
    top = max(row)
    norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - norm for v in row]


def _from_logits():
    """(pairs rows as in PAIRS, seq_kl rows) computed from the explicit logits with math."""
    pairs, kls = [], []
    for g in range(2):
        logp, ref_logp, kl = [], [], []
        for k in range(2):
            lp = [_log_softmax(row) for row in POLICY_LOGITS[g][k]]
            lr = [_log_softmax(row) for row in REF_LOGITS[g][k]]
            logp.append(sum(lp[t][TARGETS[g][k][t]] for t in range(2)))
            ref_logp.append(sum(lr[t][TARGETS[g][k][t]] for t in range(2)))
            kl.append(sum(math.exp(r) * (r - p) for t in range(2) for r, p in zip(lr[t], lp[t])))
        pairs.append((logp[0], logp[1], ref_logp[0], ref_logp[1], 2.0, 2.0))
        kls.append(tuple(kl))
    return pairs, kls


def _torch_inputs(policy_logits: torch.Tensor) -> SequenceLogps:
    """The same quantities with torch from logits [G, 2, T, V] (gradient flows to ``policy_logits``)."""
    targets = torch.tensor(TARGETS).unsqueeze(-1)
    logp = torch.log_softmax(policy_logits, -1)
    ref = torch.log_softmax(torch.tensor(REF_LOGITS, dtype=torch.float64), -1)
    kl = (ref.exp() * (ref - logp)).sum(-1).sum(-1)
    return SequenceLogps(logps=logp.gather(-1, targets).squeeze(-1).sum(-1), lengths=torch.full((2, 2), 2.0),
                         mask=torch.ones(2, 2, dtype=torch.bool), ref_logps=ref.gather(-1, targets).squeeze(-1).sum(-1),
                         seq_kl=kl)


@pytest.mark.parametrize("tdpo2", [True, False])
def test_tdpo_value_with_the_kl_from_explicit_logits(tdpo2):
    pairs, kls = _from_logits()
    assert all(kl > 0 for row in kls for kl in row)
    expected = tdpo_formula(pairs, kls, 0.5, 0.7, tdpo2)
    hp = {"beta": 0.5, "if_tdpo2": tdpo2, **({"alpha": 0.7} if tdpo2 else {})}
    loss, _ = LOSSES["tdpo"].fn(with_kl(paired(pairs), kls), **hp)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch_loss, _ = LOSSES["tdpo"].fn(_torch_inputs(torch.tensor(POLICY_LOGITS, dtype=torch.float64)), **hp)
    assert torch_loss.item() == pytest.approx(expected, rel=1e-10)


def test_gradient_through_the_logits_matches_finite_differences():
    """d loss / d policy logits, through the log-probs and the (non-detached) rejected SeqKL, against
    central differences of the math formula (TDPO2: the chosen SeqKL's own path carries no gradient,
    so the finite difference is taken with the chosen KL held at its value)."""
    logits = torch.tensor(POLICY_LOGITS, dtype=torch.float64, requires_grad=True)
    LOSSES["tdpo"].fn(_torch_inputs(logits), beta=0.5, alpha=0.7)[0].backward()
    _, kls0 = _from_logits()
    eps = 1e-6
    for index in [(0, 0, 0, 1), (0, 1, 1, 1), (1, 0, 1, 3), (1, 1, 0, 2)]:
        values = []
        for sign in (1, -1):
            g, k, t, v = index
            POLICY_LOGITS[g][k][t][v] += sign * eps
            pairs, kls = _from_logits()
            POLICY_LOGITS[g][k][t][v] -= sign * eps
            kls = [(kl0[0], kl[1]) for kl0, kl in zip(kls0, kls)]  # sg(SeqKL_w)
            values.append(tdpo_formula(pairs, kls, 0.5, 0.7, True))
        assert logits.grad[index].item() == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-5, abs=1e-9)


def test_gradient_signs_tdpo2_stops_the_chosen_kl_and_tdpo1_does_not():
    for tdpo2, chosen_kl_sign in ((True, 0.0), (False, -1.0)):
        inputs = with_kl(paired(requires_grad=True), requires_grad=True)
        LOSSES["tdpo"].fn(inputs, if_tdpo2=tdpo2)[0].backward()
        assert (inputs.logps.grad[:, 0] < 0).all() and (inputs.logps.grad[:, 1] > 0).all()
        assert (inputs.seq_kl.grad[:, 1] > 0).all()  # a larger rejected KL costs: training lowers it
        assert (torch.sign(inputs.seq_kl.grad[:, 0]) == chosen_kl_sign).all(), (tdpo2, inputs.seq_kl.grad)


def test_alpha_zero_is_dpo_in_value_and_gradient():
    a = with_kl(paired(requires_grad=True), requires_grad=True)
    loss, _ = LOSSES["tdpo"].fn(a, beta=0.3, alpha=0.0)
    loss.backward()
    b = paired(requires_grad=True)
    dpo_loss, _ = LOSSES["dpo"].fn(b, beta=0.3)
    dpo_loss.backward()
    assert loss.item() == pytest.approx(dpo_loss.item(), rel=1e-14)
    torch.testing.assert_close(a.logps.grad, b.logps.grad, rtol=1e-14, atol=0)
    assert (a.seq_kl.grad == 0).all()


def test_policy_equal_to_reference_gives_ln2_and_zero_kl():
    inputs = paired([(-5.0, -7.0, -5.0, -7.0, 4, 6), (-3.0, -2.0, -3.0, -2.0, 3, 2)])
    for tdpo2 in (True, False):
        loss, metrics = LOSSES["tdpo"].fn(with_kl(inputs, [(0.0, 0.0), (0.0, 0.0)]), if_tdpo2=tdpo2)
        assert loss.item() == pytest.approx(math.log(2.0), rel=1e-14)
        assert metrics["kl/chosen"].item() == 0.0 and metrics["rewards/accuracy"].item() == 0.0
    same = torch.tensor(REF_LOGITS, dtype=torch.float64)
    assert _torch_inputs(same).seq_kl.abs().max().item() == pytest.approx(0.0, abs=1e-15)


def test_huge_kls_stay_finite():
    loss, _ = LOSSES["tdpo"].fn(with_kl(paired(), [(1e6, 0.0), (0.0, 1e6), (1e6, 1e6)]), alpha=1.0)
    assert torch.isfinite(loss)


def test_missing_seq_kl_says_which_field():
    with pytest.raises(ValueError, match="seq_kl"):
        LOSSES["tdpo"].fn(paired())


@pytest.mark.parametrize("hparams,message", [
    ({"alpha": -0.1}, ">= 0"),
    ({"alpha": float("nan")}, ">= 0"),
    ({"beta": 0.0}, "> 0"),
    ({"if_tdpo2": False, "alpha": 0.3}, "TDPO2 only"),
])
def test_bad_knobs_fail_in_the_function_and_at_compose_time(hparams, message):
    with pytest.raises(ConfigError, match=message):
        LOSSES["tdpo"].fn(with_kl(paired()), **hparams)
    with pytest.raises(ConfigError, match=message):
        build_objective(["tdpo"], None, {"tdpo": hparams})


def test_registry_need_and_objective():
    assert LOSSES["tdpo"].needs_token_kl and LOSSES["tdpo"].needs_reference
    assert [n for n, s in LOSSES.items() if s.needs_token_kl] == ["tdpo"]
    assert build_objective(["tdpo", "sft"], [1.0, 0.1]).needs_token_kl
    assert not build_objective(["dpo", "sft"]).needs_token_kl


def test_compose_time_rules_of_the_token_kl():
    assert compose(["recipe=tdpo_tiny"]).trainer.reference == "auto"  # the runner picks separate, and says so
    compose(["recipe=tdpo_tiny", "trainer.reference=separate"])
    compose(["recipe=tdpo_tiny", "trainer.reference=lora", "model.lora.r=4"])
    with pytest.raises(ConfigError, match="precomputed caches only"):
        compose(["recipe=tdpo_tiny", "trainer.reference=precomputed"])
    with pytest.raises(ConfigError, match="zero_stage=3"):
        compose(["recipe=tdpo_tiny", "deepspeed=zero3"])
    with pytest.raises(ConfigError, match="only the preference runner"):
        compose(["recipe=tdpo_tiny", "runner=online_dpo", "reward.fns=[judge]"])
    with pytest.raises(ConfigError, match="needs a reference"):
        compose(["recipe=tdpo_tiny", "trainer.reference=none"])


def test_tdpo_learns_on_free_per_position_logits():
    """Adam on free policy logits [G, 2, T, V], starting at the reference with every preference inverted
    (the reference ranks the rejected tokens higher): afterwards h_w > h_l on every pair, for both variants."""
    g, t, v = 4, 3, 6
    gen = torch.Generator().manual_seed(0)
    ref_logits = torch.randn(g, 2, t, v, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (g, 2, t), generator=gen)
    ref_logits[:, 1].scatter_add_(-1, targets[:, 1].unsqueeze(-1), torch.full((g, t, 1), 2.0, dtype=torch.float64))
    ref = torch.log_softmax(ref_logits, -1)

    def inputs(logits):
        logp = torch.log_softmax(logits, -1)
        return SequenceLogps(logps=logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1),
                             lengths=torch.full((g, 2), float(t)), mask=torch.ones(g, 2, dtype=torch.bool),
                             ref_logps=ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1),
                             seq_kl=(ref.exp() * (ref - logp)).sum(-1).sum(-1))

    for tdpo2 in (True, False):
        logits = torch.nn.Parameter(ref_logits.clone())
        optimiser = torch.optim.Adam([logits], lr=0.05)
        first = None
        for _ in range(100):
            optimiser.zero_grad()
            loss = LOSSES["tdpo"].fn(inputs(logits), beta=0.1, if_tdpo2=tdpo2)[0]
            first = loss.item() if first is None else first
            loss.backward()
            optimiser.step()
        final = inputs(logits.detach())
        h = final.logps - final.ref_logps
        assert (h[:, 0] > h[:, 1]).all(), (tdpo2, h)
        assert LOSSES["tdpo"].fn(final, beta=0.1, if_tdpo2=tdpo2)[0].item() < first - 0.1
