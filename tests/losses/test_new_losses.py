"""RePO, R-DPO, MODPO, CPL and BCO: values against scalar formulas written here from the papers and
their reference code (``math`` on floats, never the package's helpers), gradient signs, edges, knob
checks, and values of a peer implementation where one exists (TRL 1.16's CPOTrainer, DPO).

The registry-wide checks (scalar loss, detached metrics, equal log-probs, +-1e4 margins, empty
completions, gradient signs at policy == reference) run on these losses too, in
test_offline_loss_edges.py, which reads the registry.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import SequenceLogps, available_losses
from alignkit.losses.combine import build_objective
from offline_loss_cases import PAIRS, log_sigmoid, mean, paired

torch.set_num_threads(1)
LOSSES = available_losses()


def _relu(x: float) -> float:
    return x if x > 0 else 0.0


# --- RePO -------------------------------------------------------------------------------------------
# PAIRS' mean-log-prob margins are -0.083, 0.0 and 0.371: gamma = 0.2 leaves the third pair outside.


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 1.3])
def test_repo_value(gamma):
    expected = mean(_relu(gamma - (p[0] / p[4] - p[1] / p[5])) for p in PAIRS)
    loss, metrics = LOSSES["repo"].fn(paired(), gamma=gamma)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    active = mean(float(p[0] / p[4] - p[1] / p[5] < gamma) for p in PAIRS)
    assert metrics["repo/active"].item() == pytest.approx(active)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(p[0] / p[4] for p in PAIRS))


def test_repo_gradient_is_binary_per_pair():
    """Inside the margin a pair's gradient is -1/(G len_c) on the chosen, +1/(G len_r) on the rejected;
    outside it is exactly zero (no logistic weighting)."""
    inputs = paired(requires_grad=True)
    LOSSES["repo"].fn(inputs, gamma=0.2)[0].backward()
    grad = inputs.logps.grad
    for g, p in enumerate(PAIRS):
        inside = p[0] / p[4] - p[1] / p[5] < 0.2
        assert grad[g, 0].item() == pytest.approx(-1 / (3 * p[4]) if inside else 0.0)
        assert grad[g, 1].item() == pytest.approx(1 / (3 * p[5]) if inside else 0.0)


def test_repo_needs_no_reference_and_ignores_it():
    inputs = paired()
    inputs.ref_logps = None
    assert not LOSSES["repo"].needs_reference
    a, _ = LOSSES["repo"].fn(inputs)
    b, _ = LOSSES["repo"].fn(paired())
    assert a.item() == b.item()


def _trl_cpo(loss_type: str, beta: float):
    """TRL 1.16's CPOTrainer with just the attributes ``cpo_loss`` reads."""
    cpo_trainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
    trainer = object.__new__(cpo_trainer)
    trainer.alpha, trainer.loss_type, trainer.beta, trainer.label_smoothing = 0.0, loss_type, beta, 0.0
    trainer.simpo_gamma = 0.0
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"))
    return trainer


@pytest.mark.parametrize("gamma", [0.2, 0.5])
def test_repo_is_trl_cpo_hinge_on_mean_logps_scaled(gamma):
    """relu(gamma - M) = gamma * relu(1 - M / gamma): TRL's CPO hinge with beta = 1/gamma on mean log-probs."""
    trainer = _trl_cpo("hinge", 1.0 / gamma)
    chosen = torch.tensor([p[0] / p[4] for p in PAIRS], dtype=torch.float64)
    rejected = torch.tensor([p[1] / p[5] for p in PAIRS], dtype=torch.float64)
    trl_losses, _, _ = trainer.cpo_loss(chosen, rejected)
    ours, _ = LOSSES["repo"].fn(paired(), gamma=gamma)
    assert ours.item() == pytest.approx(gamma * trl_losses.mean().item(), rel=1e-12)


# --- R-DPO ------------------------------------------------------------------------------------------
# PAIRS' length gaps len_c - len_r are -2, +1 and +2 tokens.


@pytest.mark.parametrize("beta,alpha", [(0.3, 0.0), (0.3, 0.05), (0.1, 0.5)])
def test_rdpo_value(beta, alpha):
    expected = mean(-log_sigmoid(beta * ((p[0] - p[2]) - (p[1] - p[3])) + alpha * (p[4] - p[5])) for p in PAIRS)
    loss, metrics = LOSSES["rdpo"].fn(paired(), beta=beta, alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["rdpo/length_gap"].item() == pytest.approx(mean(p[4] - p[5] for p in PAIRS))
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(beta * (p[0] - p[2]) for p in PAIRS))


def test_rdpo_without_penalty_is_dpo():
    a, _ = LOSSES["rdpo"].fn(paired(), beta=0.3, alpha=0.0)
    b, _ = LOSSES["dpo"].fn(paired(), beta=0.3)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_rdpo_pushes_less_on_a_longer_chosen_and_more_on_a_shorter_one():
    """The length penalty's direction: at equal log-ratios, a pair whose chosen is longer gets a smaller
    gradient than under DPO (length explains part of the preference), a shorter chosen a larger one."""
    rows = [(-5.0, -6.0, -5.0, -6.0, 30.0, 10.0), (-5.0, -6.0, -5.0, -6.0, 10.0, 30.0)]
    grads = {}
    for name, hparams in (("rdpo", {"alpha": 0.05}), ("dpo", {})):
        inputs = paired(rows, requires_grad=True)
        LOSSES[name].fn(inputs, beta=0.1, **hparams)[0].backward()
        grads[name] = inputs.logps.grad[:, 0]
    assert (grads["rdpo"] < 0).all() and (grads["dpo"] < 0).all()
    assert abs(grads["rdpo"][0]) < abs(grads["dpo"][0]) < abs(grads["rdpo"][1])
    # sigmoid(-z) / G with z = +-alpha * 20 (h = 0): the exact weights
    assert grads["rdpo"][0].item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-1.0))) / 2)
    assert grads["rdpo"][1].item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(1.0))) / 2)


# --- MODPO ------------------------------------------------------------------------------------------
MODPO_SCORES = [(0.8, 0.1), (-0.5, 0.4), (1.2, 1.2)]  # auxiliary reward (s_c, s_r) of each pair of PAIRS


def _scored(pairs=PAIRS, scores=MODPO_SCORES, **kwargs) -> SequenceLogps:
    inputs = paired(pairs, **kwargs)
    inputs.scores = torch.tensor(scores, dtype=inputs.logps.dtype)
    return inputs


@pytest.mark.parametrize("beta,w,margin_weight", [(0.3, 0.5, None), (0.1, 0.25, None), (0.3, 0.7, 2.0)])
def test_modpo_value(beta, w, margin_weight):
    aux = 1 - w if margin_weight is None else margin_weight
    expected = mean(
        -log_sigmoid((beta * ((p[0] - p[2]) - (p[1] - p[3])) - aux * (s[0] - s[1])) / w)
        for p, s in zip(PAIRS, MODPO_SCORES)
    )
    loss, metrics = LOSSES["modpo"].fn(_scored(), beta=beta, w=w, margin_weight=margin_weight)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["modpo/aux_gap"].item() == pytest.approx(mean(s[0] - s[1] for s in MODPO_SCORES))


def test_modpo_with_all_weight_on_the_pairs_is_dpo():
    a, _ = LOSSES["modpo"].fn(_scored(), beta=0.3, w=1.0)
    b, _ = LOSSES["dpo"].fn(paired(), beta=0.3)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_modpo_with_a_length_penalty_reward_is_rdpo():
    """MODPO's reference length-penalty run: margin reward -|y|, w = (1, alpha). That is R-DPO."""
    lengths = [(-p[4], -p[5]) for p in PAIRS]
    a, _ = LOSSES["modpo"].fn(_scored(scores=lengths), beta=0.3, w=1.0, margin_weight=0.05)
    b, _ = LOSSES["rdpo"].fn(paired(), beta=0.3, alpha=0.05)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_modpo_pushes_harder_where_the_auxiliary_reward_agrees():
    """The policy carries both objectives (r* = w r_k + (1-w) r_aux = beta h): where the auxiliary reward
    also prefers the chosen, the policy margin must exceed that share too, so the push is larger; where
    it prefers the rejected, the pair's preference is partly the other objective's, so the push is smaller."""
    grads = []
    for scores in ([(1.0, 0.0)] * 3, [(0.0, 0.0)] * 3, [(0.0, 1.0)] * 3):
        inputs = _scored(scores=scores, requires_grad=True)
        LOSSES["modpo"].fn(inputs, beta=0.3)[0].backward()
        grads.append(inputs.logps.grad[:, 0])
    assert (grads[0] < grads[1]).all() and (grads[1] < grads[2]).all() and (grads[2] < 0).all()


def test_modpo_needs_finite_scores_for_every_pair():
    from alignkit.errors import DataError

    with pytest.raises(DataError, match="chosen_score/rejected_score"):
        LOSSES["modpo"].fn(paired())
    with pytest.raises(DataError, match="1 of 3 pairs"):
        LOSSES["modpo"].fn(_scored(scores=[(0.8, 0.1), (math.nan, 0.4), (1.2, 1.2)]))


# --- CPL ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,bias", [(0.1, 0.5), (0.3, 1.0), (1.0, 0.2)])
def test_cpl_value(alpha, bias):
    """-log [e^(a S_c) / (e^(a S_c) + e^(lambda a S_r))], S = summed log-prob (jhejna/cpl, biased BCE)."""
    expected = mean(
        -(alpha * p[0]) + math.log(math.exp(alpha * p[0]) + math.exp(bias * alpha * p[1])) for p in PAIRS
    )
    loss, metrics = LOSSES["cpl"].fn(paired(), alpha=alpha, contrastive_bias=bias)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(alpha * p[0] for p in PAIRS))
    assert metrics["rewards/accuracy"].item() == pytest.approx(mean(float(p[0] > p[1]) for p in PAIRS))


def test_cpl_bias_scales_the_rejected_gradient_only():
    """d loss / d logp_r = -lambda * d loss / d logp_c, pair by pair: the bias sits on the dispreferred term."""
    inputs = paired(requires_grad=True)
    LOSSES["cpl"].fn(inputs, alpha=0.3, contrastive_bias=0.4)[0].backward()
    grad = inputs.logps.grad
    assert (grad[:, 0] < 0).all()
    assert torch.allclose(grad[:, 1], -0.4 * grad[:, 0], rtol=1e-12)


def test_cpl_unbiased_is_trl_cpo_sigmoid():
    """With lambda = 1, CPL is CPO's preference term at beta = alpha: TRL 1.16's CPOTrainer.cpo_loss (sigmoid)."""
    trainer = _trl_cpo("sigmoid", 0.3)
    trl_losses, _, _ = trainer.cpo_loss(torch.tensor([p[0] for p in PAIRS], dtype=torch.float64),
                                        torch.tensor([p[1] for p in PAIRS], dtype=torch.float64))
    ours, _ = LOSSES["cpl"].fn(paired(), alpha=0.3, contrastive_bias=1.0)
    assert ours.item() == pytest.approx(trl_losses.mean().item(), rel=1e-12)
    cpo, _ = LOSSES["cpo"].fn(paired(), beta=0.3, cpo_alpha=0.0)
    assert ours.item() == pytest.approx(cpo.item(), rel=1e-12)


# --- BCO ----------------------------------------------------------------------------------------------
UNPAIRED = [(-4.0, -4.5, 1.0), (-6.0, -5.0, 0.0), (-2.0, -2.6, 1.0), (-3.0, -3.4, 0.0), (-1.0, -1.5, 0.0)]


def _unpaired(rows=UNPAIRED, *, requires_grad: bool = False) -> SequenceLogps:
    col = lambda i: torch.tensor([[r[i]] for r in rows], dtype=torch.float64)  # noqa: E731
    logps = col(0).requires_grad_(requires_grad)
    return SequenceLogps(logps=logps, ref_logps=col(1), labels=col(2), lengths=torch.ones(len(rows), 1),
                         mask=torch.ones(len(rows), 1, dtype=torch.bool))


def _bco_terms(beta, delta, rows=UNPAIRED):
    """Per-completion BCO losses as TRL's BCOTrainer.bco_loss writes them (before its removal)."""
    rewards = [beta * (lp - ref) for lp, ref, _ in rows]
    if delta is None:  # RunningMoments after its first update: the mean of all the batch's rewards
        delta = mean(rewards)
    terms = [-log_sigmoid(r - delta) if y else -log_sigmoid(-(r - delta)) for r, (_, _, y) in zip(rewards, rows)]
    return terms, delta


@pytest.mark.parametrize("beta,delta", [(0.4, None), (0.4, 0.0), (0.1, 0.3), (1.0, -0.2)])
def test_bco_value(beta, delta):
    terms, shift = _bco_terms(beta, delta)
    loss, metrics = LOSSES["bco"].fn(_unpaired(), beta=beta, delta=delta)
    assert loss.item() == pytest.approx(mean(terms), rel=1e-12)
    assert metrics["bco/delta"].item() == pytest.approx(shift)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(beta * (a - b) for a, b, y in UNPAIRED if y))
    assert metrics["rewards/rejected"].item() == pytest.approx(mean(beta * (a - b) for a, b, y in UNPAIRED if not y))


def test_bco_running_mean_passed_in_reproduces_trl_over_steps():
    """A trainer keeping TRL's running mean (count-weighted over every reward so far, updated before the
    loss) and passing it as delta gets TRL's loss at every step, not only the first."""
    steps = [UNPAIRED[:3], UNPAIRED[3:], UNPAIRED[1:4]]
    total, count = 0.0, 0
    for rows in steps:
        rewards = [0.4 * (lp - ref) for lp, ref, _ in rows]
        total, count = total + sum(rewards), count + len(rewards)
        terms, _ = _bco_terms(0.4, total / count, rows)
        loss, _ = LOSSES["bco"].fn(_unpaired(rows), beta=0.4, delta=total / count)
        assert loss.item() == pytest.approx(mean(terms), rel=1e-12)
    first, _ = LOSSES["bco"].fn(_unpaired(steps[0]), beta=0.4)
    assert first.item() == pytest.approx(mean(_bco_terms(0.4, None, steps[0])[0]), rel=1e-12)


def test_bco_batch_shift_is_detached_and_gradients_have_the_classifier_signs():
    shifted = _unpaired(requires_grad=True)
    loss, metrics = LOSSES["bco"].fn(shifted, beta=0.4)
    loss.backward()
    fixed = _unpaired(requires_grad=True)
    LOSSES["bco"].fn(fixed, beta=0.4, delta=metrics["bco/delta"].item())[0].backward()
    assert torch.allclose(shifted.logps.grad, fixed.logps.grad, rtol=1e-12)  # no gradient through the mean
    grad, desirable = shifted.logps.grad[:, 0], shifted.labels[:, 0] > 0.5
    assert (grad[desirable] < 0).all() and (grad[~desirable] > 0).all()


def test_bco_on_split_pairs_is_half_of_bco_pair():
    """With a fixed shift, BCO over the 2G completions of G pairs (chosen desirable, rejected not) is
    bco_pair's per-pair sum averaged over 2G (bco_pair is checked against TRL 1.16)."""
    rows = [r for p in PAIRS for r in ((p[0], p[2], 1.0), (p[1], p[3], 0.0))]
    ours, _ = LOSSES["bco"].fn(_unpaired(rows), beta=0.3, delta=0.25)
    pair, _ = LOSSES["bco_pair"].fn(paired(), beta=0.3, delta=0.25)
    assert ours.item() == pytest.approx(pair.item() / 2, rel=1e-12)


# --- all five learn the preference from an inverted start (the harness of test_offline_losses_learn) --


@pytest.mark.parametrize("name", ["repo", "rdpo", "modpo", "cpl"])
def test_new_paired_losses_learn_the_preference(name):
    from test_offline_losses_learn import _train

    _, before, after = _train(name)
    assert before["rewards/accuracy"] == 0.0 and after["rewards/accuracy"] == 1.0
    assert after["rewards/margin"] > before["rewards/margin"]


def test_bco_raises_desirable_and_lowers_undesirable():
    from test_offline_losses_learn import _train

    _, _, after = _train("bco")
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]


# --- knob checks (at call time and at compose time) ------------------------------------------------

BAD_KNOBS = [
    ("repo", {"gamma": -0.1}),
    ("repo", {"gamma": "wide"}),
    ("rdpo", {"alpha": -0.01}),
    ("rdpo", {"beta": 0.0}),
    ("modpo", {"w": 0.0}),
    ("modpo", {"w": 1.5}),
    ("modpo", {"margin_weight": -1.0}),
    ("cpl", {"alpha": 0.0}),
    ("cpl", {"contrastive_bias": 0.0}),
    ("cpl", {"contrastive_bias": 1.2}),
    ("bco", {"delta": math.inf}),
    ("bco", {"beta": -0.1}),
]


@pytest.mark.parametrize("name,hparams", BAD_KNOBS)
def test_bad_knobs_raise_config_error_naming_the_key(name, hparams):
    key = next(iter(hparams))
    with pytest.raises(ConfigError, match=f"loss {name!r}: {key}="):
        LOSSES[name].fn(_unpaired() if name == "bco" else _scored(), **hparams)
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        build_objective([name], hparams={name: hparams})


# --- end to end on the tiny model: the preference runner gives each loss what it reads ---------------


@pytest.mark.parametrize("recipe,loss,key", [
    ("dpo_tiny", "repo", "repo/active"), ("dpo_tiny", "rdpo", "rdpo/length_gap"),
    ("dpo_tiny", "modpo", "modpo/aux_gap"),
    ("dpo_tiny", "cpl", "rewards/accuracy"), ("kto_tiny", "bco", "bco/delta"),
])
def test_new_losses_train_on_the_tiny_runner(tmp_path, recipe, loss, key):
    """Two steps of the preference trainer on the demo data (paired scores = MODPO's auxiliary reward,
    token counts = R-DPO's lengths): finite losses and each loss's own metric in train and eval rows."""
    import json

    from alignkit.run import train_from_overrides

    code = train_from_overrides([f"recipe={recipe}", f"loss={loss}", "trainer.max_steps=2", "trainer.eval_every=2",
                                 "trainer.export=false", f"trainer.reference_cache_dir={tmp_path / 'ref'}",
                                 f"output_dir={tmp_path}", "run_name=run"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) and key in r for r in train)
    assert any(r.get("split") == "eval" and key in r for r in rows)
