"""Every offline loss against an independent scalar formula on the fixed inputs of offline_loss_cases."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses import SequenceLogps, available_losses
from offline_loss_cases import (
    PAIRS,
    REF_TOKEN_LOGPS,
    TOKEN_LENGTHS,
    TOKEN_LOG_SQ_MASS,
    TOKEN_LOGPS,
    log_sigmoid,
    mean,
    paired,
    sigmoid,
    token_level,
)

torch.set_num_threads(1)
LOSSES = available_losses()
BETA = 0.3


def _h(p):
    """(h_c, h_r, logp_c, logp_r, len_c, len_r) of one pair."""
    return p[0] - p[2], p[1] - p[3], p[0], p[1], p[4], p[5]


def _cdpo(z, e):
    return -(1 - e) * log_sigmoid(z) - e * log_sigmoid(-z)


def _per_pair_formula(name: str, beta: float, extra: dict):
    """The per-pair loss of each reference paired loss, written from the papers / TRL docs."""
    e = extra.get("label_smoothing", 0.0)
    formulas = {
        "dpo": lambda hc, hr, *_: _cdpo(beta * (hc - hr), e),
        "hinge": lambda hc, hr, *_: max(0.0, 1 - beta * (hc - hr)),
        "ipo": lambda hc, hr, lc, lr, nc, nr: (hc / nc - hr / nr - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": lambda hc, hr, lc, lr, nc, nr: -log_sigmoid(beta * (hc / nc - hr / nr)),
        "robust": lambda hc, hr, *_: (-(1 - e) * log_sigmoid(beta * (hc - hr)) + e * log_sigmoid(-beta * (hc - hr)))
        / (1 - 2 * e),
        "exo_pair": lambda hc, hr, *_: sum(
            q * math.log(q / p)
            for q, p in ((sigmoid(beta * (hc - hr)), 1 - e), (sigmoid(-beta * (hc - hr)), e))
        ),
        "discopop": lambda hc, hr, *_: (
            (1 - sigmoid(beta * (hc - hr) / extra["tau"])) * -log_sigmoid(beta * (hc - hr))
            + sigmoid(beta * (hc - hr) / extra["tau"]) * math.exp(-beta * (hc - hr))
        ),
        "nca_pair": lambda hc, hr, *_: -log_sigmoid(beta * hc) - 0.5 * log_sigmoid(-beta * hc)
        - 0.5 * log_sigmoid(-beta * hr),
        "bco_pair": lambda hc, hr, *_: -log_sigmoid(beta * hc - extra["delta"]) - log_sigmoid(
            -(beta * hr - extra["delta"])
        ),
        "sppo_hard": lambda hc, hr, *_: (hc - 1 / (2 * beta)) ** 2 + (hr + 1 / (2 * beta)) ** 2,
        "apo_zero": lambda hc, hr, *_: (1 - sigmoid(beta * hc)) + sigmoid(beta * hr),
        "apo_down": lambda hc, hr, *_: sigmoid(beta * hc) + (1 - sigmoid(beta * (hc - hr))),
    }
    return formulas[name]


PAIRED_CASES = [
    ("dpo", {}),
    ("dpo", {"label_smoothing": 0.2}),
    ("hinge", {}),
    ("ipo", {}),
    ("sigmoid_norm", {}),
    ("robust", {"label_smoothing": 0.1}),
    ("robust", {"label_smoothing": 0.0}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.1}),
    ("discopop", {"tau": 0.05}),
    ("discopop", {"tau": 0.7}),
    ("nca_pair", {}),
    ("bco_pair", {"delta": 0.0}),
    ("bco_pair", {"delta": 0.25}),
    ("sppo_hard", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
]


@pytest.mark.parametrize("name,extra", PAIRED_CASES)
def test_paired_reference_loss_value(name, extra):
    formula = _per_pair_formula(name, BETA, extra)
    expected = mean(formula(*_h(p)) for p in PAIRS)
    loss, metrics = LOSSES[name].fn(paired(), beta=BETA, **extra)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert "loss" not in metrics


AOT_PAIRS = [(-5.0, -7.0, -6.0, -6.5, 4, 6), (-3.0, -2.0, -6.0, -4.0, 3, 2), (-10.0, -9.0, -9.0, -12.0, 7, 5)]


def test_aot_sorts_over_the_batch():
    policy = sorted(p[0] - p[1] for p in AOT_PAIRS)
    ref = sorted(p[2] - p[3] for p in AOT_PAIRS)
    expected = mean(_cdpo(BETA * (a - b), 0.1) for a, b in zip(policy, ref))
    loss, _ = LOSSES["aot"].fn(paired(AOT_PAIRS), beta=BETA, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # not the unsorted pairing (these pairs are chosen so that the two differ)
    unsorted = mean(_cdpo(BETA * ((p[0] - p[1]) - (p[2] - p[3])), 0.1) for p in AOT_PAIRS)
    assert abs(loss.item() - unsorted) > 1e-4


def test_reference_metrics_are_beta_times_log_ratio():
    _, metrics = LOSSES["dpo"].fn(paired(), beta=BETA)
    chosen = [BETA * (p[0] - p[2]) for p in PAIRS]
    rejected = [BETA * (p[1] - p[3]) for p in PAIRS]
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(chosen))
    assert metrics["rewards/rejected"].item() == pytest.approx(mean(rejected))
    assert metrics["rewards/margin"].item() == pytest.approx(mean(c - r for c, r in zip(chosen, rejected)))
    assert metrics["rewards/accuracy"].item() == pytest.approx(mean(float(c > r) for c, r in zip(chosen, rejected)))
    assert metrics["logps/chosen"].item() == pytest.approx(mean(p[0] for p in PAIRS))
    assert metrics["logps/rejected"].item() == pytest.approx(mean(p[1] for p in PAIRS))
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


# --- f-divergences: f'(u) at u = pi/pi_ref, TRL's parametrisation -------------------------------


def _f_prime(kind: str, h: float, alpha: float = 0.5) -> float:
    u = math.exp(h)
    return {
        "reverse_kl": math.log(u),
        "forward_kl": 1 - 1 / u,
        "js_divergence": math.log(2 * u / (1 + u)),
        "alpha_divergence": (u ** (alpha - 1) - 1) / (alpha - 1),
    }[kind]


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["dpo", "hinge", "ipo", "sigmoid_norm"])
def test_f_divergence_values(kind, name):
    alpha = 0.3

    def score(p, i):
        return _f_prime(kind, p[i] - p[i + 2], alpha)

    per_pair = {
        "dpo": lambda p: -log_sigmoid(BETA * (score(p, 0) - score(p, 1))),
        "hinge": lambda p: max(0.0, 1 - BETA * (score(p, 0) - score(p, 1))),
        "ipo": lambda p: (score(p, 0) / p[4] - score(p, 1) / p[5] - 1 / (2 * BETA)) ** 2,
        "sigmoid_norm": lambda p: -log_sigmoid(BETA * (score(p, 0) / p[4] - score(p, 1) / p[5])),
    }[name]
    loss, _ = LOSSES[name].fn(paired(), beta=BETA, f_divergence=kind, f_alpha=alpha)
    assert loss.item() == pytest.approx(mean(per_pair(p) for p in PAIRS), rel=1e-9)


def test_alpha_divergence_at_one_is_reverse_kl():
    a, _ = LOSSES["dpo"].fn(paired(), f_divergence="alpha_divergence", f_alpha=1.0)
    b, _ = LOSSES["dpo"].fn(paired())
    assert a.item() == pytest.approx(b.item())


# --- WPO weighting and LD-DPO ----------------------------------------------------------------------


def _token_rows():
    for g in range(2):
        yield [
            (TOKEN_LOGPS[g][k][: TOKEN_LENGTHS[g][k]], REF_TOKEN_LOGPS[g][k][: TOKEN_LENGTHS[g][k]],
             TOKEN_LOG_SQ_MASS[g][k][: TOKEN_LENGTHS[g][k]])
            for k in range(2)
        ]


def test_wpo_weighting_multiplies_by_length_normalised_probability_weights():
    expected = []
    for (pc, rc, sq_c), (pr, rr, sq_r) in _token_rows():
        w_c = math.exp(mean(a - b for a, b in zip(pc, sq_c)))
        w_r = math.exp(mean(a - b for a, b in zip(pr, sq_r)))
        expected.append(w_c * w_r * -log_sigmoid(BETA * ((sum(pc) - sum(rc)) - (sum(pr) - sum(rr)))))
    inputs = token_level()
    loss, _ = LOSSES["dpo"].fn(inputs, beta=BETA, use_weighting=True)
    assert loss.item() == pytest.approx(mean(expected), rel=1e-9)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
def test_ld_dpo_down_weights_tokens_past_the_shared_length(ld_alpha):
    expected = []
    for (pc, rc, _), (pr, rr, _) in _token_rows():
        shared = min(len(pc), len(pr))

        def ld(tokens):
            return sum(tokens[:shared]) + ld_alpha * sum(tokens[shared:])

        expected.append(-log_sigmoid(BETA * ((ld(pc) - ld(rc)) - (ld(pr) - ld(rr)))))
    loss, metrics = LOSSES["dpo"].fn(token_level(), beta=BETA, ld_alpha=ld_alpha)
    assert loss.item() == pytest.approx(mean(expected), rel=1e-9)
    if ld_alpha == 1.0:
        plain, _ = LOSSES["dpo"].fn(token_level(), beta=BETA)
        assert loss.item() == pytest.approx(plain.item())


def test_ld_dpo_gradient_flows_through_token_logps():
    inputs = token_level()
    inputs.token_logps.requires_grad_(True)
    loss, _ = LOSSES["dpo"].fn(inputs, ld_alpha=0.5)
    loss.backward()
    grad = inputs.token_logps.grad
    assert grad[0, 0, :3].lt(0).all()  # chosen tokens: more log-prob, less loss
    assert grad[0, 1, 3].abs() < grad[0, 1, 0].abs()  # the tail token of the longer rejected is down-weighted
    assert grad[~inputs.token_mask].eq(0).all()


# --- reference-free -------------------------------------------------------------------------------


def test_simpo_value():
    beta, gamma, e = 2.5, 1.2, 0.1
    expected = mean(
        _cdpo(beta * (p[0] / p[4] - p[1] / p[5]) - gamma, e) for p in PAIRS
    )
    loss, metrics = LOSSES["simpo"].fn(paired(), beta=beta, gamma=gamma, label_smoothing=e)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(beta * p[0] / p[4] for p in PAIRS))


def test_cpo_value_adds_token_mean_nll_of_chosen():
    beta, alpha = 0.2, 0.7
    nll = -sum(p[0] for p in PAIRS) / sum(p[4] for p in PAIRS)
    expected = mean(-log_sigmoid(beta * (p[0] - p[1])) for p in PAIRS) + alpha * nll
    loss, metrics = LOSSES["cpo"].fn(paired(), beta=beta, cpo_alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["cpo/nll"].item() == pytest.approx(nll)


def test_orpo_value():
    lam = 0.25

    def log_odds(mean_logp):
        return mean_logp - math.log(1 - math.exp(mean_logp))

    nll = -sum(p[0] for p in PAIRS) / sum(p[4] for p in PAIRS)
    ratio = mean(log_sigmoid(log_odds(p[0] / p[4]) - log_odds(p[1] / p[5])) for p in PAIRS)
    loss, metrics = LOSSES["orpo"].fn(paired(), beta=lam)
    assert loss.item() == pytest.approx(nll - lam * ratio, rel=1e-9)
    assert metrics["orpo/log_odds_ratio"].item() == pytest.approx(ratio)


def test_sft_normalises_by_all_target_tokens_of_slot_0():
    loss, metrics = LOSSES["sft"].fn(paired())
    assert loss.item() == pytest.approx(-(-5 - 3 - 10) / (4 + 3 + 7))
    one = SequenceLogps(logps=torch.tensor([[-6.0]]), lengths=torch.tensor([[3.0]]),
                        mask=torch.ones(1, 1, dtype=torch.bool))
    assert LOSSES["sft"].fn(one)[0].item() == pytest.approx(2.0)


# --- unpaired -------------------------------------------------------------------------------------

UNPAIRED = [(-4.0, -4.5, 1.0), (-6.0, -5.0, 0.0), (-2.0, -2.6, 1.0), (-3.0, -3.4, 0.0)]  # logp, ref, label
KL_PAIRS = [(-5.0, -5.5), (-4.0, -4.1), (-6.0, -5.0), (-3.0, -3.3)]  # kl_logps, ref_kl_logps


def _unpaired(kl=KL_PAIRS) -> SequenceLogps:
    col = lambda i: torch.tensor([[r[i]] for r in UNPAIRED], dtype=torch.float64)  # noqa: E731
    return SequenceLogps(
        logps=col(0), ref_logps=col(1), labels=col(2), lengths=torch.ones(len(UNPAIRED), 1, dtype=torch.float64),
        mask=torch.ones(len(UNPAIRED), 1, dtype=torch.bool),
        kl_logps=None if kl is None else torch.tensor([k[0] for k in kl], dtype=torch.float64),
        ref_kl_logps=None if kl is None else torch.tensor([k[1] for k in kl], dtype=torch.float64),
    )


@pytest.mark.parametrize("kl", [KL_PAIRS, [(-5.0, -4.0), (-4.0, -4.0), (-6.0, -6.5), (-3.0, -3.0)], None])
def test_kto_value(kl):
    beta, wd, wu = 0.4, 1.3, 0.8
    z0 = 0.0 if kl is None else max(0.0, mean(a - b for a, b in kl))
    terms = [
        wd * (1 - sigmoid(beta * ((lp - ref) - z0))) if y else wu * (1 - sigmoid(beta * (z0 - (lp - ref))))
        for lp, ref, y in UNPAIRED
    ]
    loss, metrics = LOSSES["kto"].fn(_unpaired(kl), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert loss.item() == pytest.approx(mean(terms), rel=1e-9)
    assert metrics["kl"].item() == pytest.approx(z0)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(beta * (lp - ref) for lp, ref, y in UNPAIRED if y))


def test_apo_zero_unpaired_value():
    beta, wd, wu = 0.4, 1.3, 0.8
    terms = [
        wd * (1 - sigmoid(beta * (lp - ref))) if y else wu * sigmoid(beta * (lp - ref)) for lp, ref, y in UNPAIRED
    ]
    loss, _ = LOSSES["apo_zero_unpaired"].fn(_unpaired(None), beta=beta, desirable_weight=wd, undesirable_weight=wu)
    assert loss.item() == pytest.approx(mean(terms), rel=1e-9)


def test_unpaired_metrics_leave_out_an_absent_class():
    inputs = _unpaired()
    inputs.labels = torch.ones_like(inputs.labels)
    _, metrics = LOSSES["kto"].fn(inputs)
    assert "rewards/chosen" in metrics and "rewards/rejected" not in metrics and "rewards/margin" not in metrics
