"""Gradient signs, edge cases (equal log-probs, huge margins, empty completions) and checks of every
offline loss; the values themselves are tested in test_offline_loss_values / test_listwise_losses."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import available_losses
from offline_loss_cases import for_view, paired, token_level

torch.set_num_threads(1)
# every registered offline loss, read from the registry (a new loss is checked here without listing it)
# rollout, distill (GKD, logits in: tests/losses/test_distill.py) and stepwise (PRM step logits:
# tests/losses/test_process_loss.py) losses take no SequenceLogps
OFFLINE = {name: spec for name, spec in available_losses().items()
           if spec.view not in ("rollout", "distill", "stepwise")}
PAIRED = sorted(name for name, spec in OFFLINE.items() if spec.view == "pairwise")
SCORE_LOSSES = {"bradley_terry", "pairwise_bce"}  # reward / pairwise models: inputs are a head's scores, not log-probs
K_OF_VIEW = {"sft": 1, "pairwise": 2, "unpaired": 1, "listwise": 3, "scalar": 1}


def _inputs(name, logps_row, ref_row=None, lengths_row=None, groups=2):
    spec = OFFLINE[name]
    k = K_OF_VIEW[spec.view]
    rows = lambda row: None if row is None else [list(row[:k])] * groups  # noqa: E731
    return for_view(spec.view, rows(logps_row), rows(ref_row), rows(lengths_row))


def test_every_offline_view_is_covered():
    assert {spec.view for spec in OFFLINE.values()} == {"sft", "pairwise", "unpaired", "listwise", "scalar"}
    assert SCORE_LOSSES <= set(OFFLINE)
    assert len(PAIRED) >= 16


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_returns_scalar_loss_and_detached_scalar_metrics(name):
    inputs = _inputs(name, [-5.0, -6.0, -7.0], [-5.5, -5.8, -6.0])
    inputs.logps.requires_grad_(True)
    loss, metrics = OFFLINE[name].fn(inputs)
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert "loss" not in metrics
    for key, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, key
    if OFFLINE[name].view == "pairwise":
        assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(metrics)
        if name not in SCORE_LOSSES:
            assert {"logps/chosen", "logps/rejected"} <= set(metrics)


# Raising the chosen log-prob lowers the loss, raising the rejected raises it, at policy == reference
# (h = 0). apo_down deliberately pushes the chosen down as well, so only its rejected sign is fixed;
# DiscoPOP is not monotone near a zero margin (its modulation term), see the dedicated test.
CHOSEN_SIGN_EXEMPT = {"apo_down"}


@pytest.mark.parametrize("name", [n for n in PAIRED if n != "discopop"])
def test_paired_gradient_signs(name):
    inputs = _inputs(name, [-5.0, -6.0], lengths_row=[4.0, 5.0])
    inputs.logps.requires_grad_(True)
    OFFLINE[name].fn(inputs)[0].backward()
    grad_chosen, grad_rejected = inputs.logps.grad[:, 0], inputs.logps.grad[:, 1]
    if name not in CHOSEN_SIGN_EXEMPT:
        assert (grad_chosen < 0).all(), grad_chosen
    assert (grad_rejected > 0).all(), grad_rejected


@pytest.mark.parametrize("margin", [-1.0, 1.0, 5.0])
def test_discopop_gradient_signs_away_from_zero_margin(margin):
    inputs = _inputs("discopop", [-5.0, -6.0], [-5.0 - margin / 2, -6.0 + margin / 2])
    inputs.logps.requires_grad_(True)
    OFFLINE["discopop"].fn(inputs, beta=1.0)[0].backward()
    assert (inputs.logps.grad[:, 0] < 0).all() and (inputs.logps.grad[:, 1] > 0).all()
    near_zero = _inputs("discopop", [-5.0, -6.0])
    near_zero.logps.requires_grad_(True)
    OFFLINE["discopop"].fn(near_zero, beta=1.0)[0].backward()
    assert (near_zero.logps.grad[:, 0] > 0).all()  # the documented non-monotone region (tau = 0.05)


def test_apo_down_lowers_the_chosen_when_it_leads():
    inputs = _inputs("apo_down", [-5.0, -6.0], [-6.0, -4.0])
    inputs.logps.requires_grad_(True)
    OFFLINE["apo_down"].fn(inputs, beta=1.0)[0].backward()
    assert (inputs.logps.grad[:, 0] > 0).all()


def test_sft_and_unpaired_gradient_signs():
    inputs = _inputs("sft", [-5.0])
    inputs.logps.requires_grad_(True)
    OFFLINE["sft"].fn(inputs)[0].backward()
    assert (inputs.logps.grad < 0).all()
    for name in ("kto", "apo_zero_unpaired"):
        inputs = _inputs(name, [-5.0], [-5.2], groups=4)  # labels 1, 0, 1, 0
        inputs.logps.requires_grad_(True)
        OFFLINE[name].fn(inputs)[0].backward()
        grad = inputs.logps.grad[:, 0]
        assert (grad[0::2] < 0).all() and (grad[1::2] > 0).all(), (name, grad)


def test_kto_batch_kl_is_detached_and_clamped():
    inputs = _inputs("kto", [-5.0], [-5.2], groups=4)
    inputs.kl_logps.requires_grad_(True)
    inputs.ref_kl_logps = inputs.kl_logps.detach() + 1.0  # negative estimate -> clamped to 0
    loss, metrics = OFFLINE["kto"].fn(inputs)
    assert metrics["kl"].item() == 0.0
    inputs.ref_kl_logps = inputs.kl_logps.detach() - 1.0
    loss, metrics = OFFLINE["kto"].fn(inputs)
    assert metrics["kl"].item() == pytest.approx(1.0)
    with pytest.raises(RuntimeError):  # no path from the loss back to kl_logps
        torch.autograd.grad(loss, inputs.kl_logps)


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_equal_log_probs(name):
    inputs = _inputs(name, [-5.0, -5.0, -5.0], [-5.0, -5.0, -5.0])
    inputs.logps.requires_grad_(True)
    loss, metrics = OFFLINE[name].fn(inputs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs.logps.grad).all()
    if name in ("dpo", "sigmoid_norm", "robust"):
        assert loss.item() == pytest.approx(math.log(2.0))
    if "rewards/accuracy" in metrics:
        assert metrics["rewards/accuracy"].item() == 0.0


@pytest.mark.parametrize("scale", [1e4, -1e4])
@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_large_margins_stay_finite(name, scale):
    """Policy log-ratios of +-1e4 on the chosen (and the opposite on the others): no inf or nan."""
    inputs = _inputs(name, [-50.0 + scale / 2, -50.0 - scale / 2, -50.0 - scale / 2], [-50.0] * 3)
    inputs.logps.requires_grad_(True)
    loss, metrics = OFFLINE[name].fn(inputs)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(inputs.logps.grad).all(), inputs.logps.grad
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kind", ["js_divergence", "alpha_divergence"])
def test_f_divergences_stay_finite_at_large_margins(kind):
    inputs = paired([(0.0, -1e4, -1e4, 0.0, 3, 3), (-1e4, 0.0, 0.0, -1e4, 3, 3)])
    loss, _ = OFFLINE["dpo"].fn(inputs, f_divergence=kind)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(OFFLINE))  # the length-normalised ones (simpo, orpo, ipo, ...) above all
def test_zero_length_completions_do_not_divide_by_zero(name):
    inputs = _inputs(name, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], lengths_row=[0.0, 0.0, 0.0])
    inputs.logps.requires_grad_(True)
    loss, metrics = OFFLINE[name].fn(inputs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inputs.logps.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_orpo_certain_completion_is_finite():
    loss, _ = OFFLINE["orpo"].fn(paired([(0.0, -3.0, 0.0, 0.0, 3, 3)]))
    assert torch.isfinite(loss)


def test_float32_inputs_work():
    loss, _ = OFFLINE["dpo"].fn(paired(dtype=torch.float32), use_weighting=False)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("robust", {"label_smoothing": 0.5}),
        ("exo_pair", {"label_smoothing": 0.0}),
        ("dpo", {"label_smoothing": 0.7}),
        ("dpo", {"f_divergence": "kl"}),
        ("ipo", {"ld_alpha": 1.5}),
        ("simpo", {"beta": 0.0}),
    ],
)
def test_bad_knob_values_raise_config_error_listing_what_is_valid(name, hparams):
    with pytest.raises(ConfigError) as err:
        OFFLINE[name].fn(paired(), **hparams)
    assert name in str(err.value)
    if "f_divergence" in hparams:
        assert "reverse_kl" in str(err.value) and "alpha_divergence" in str(err.value)


def test_missing_tensors_say_which_field():
    inputs = paired()
    inputs.ref_logps = None
    with pytest.raises(ValueError, match="ref_logps"):
        OFFLINE["dpo"].fn(inputs)
    with pytest.raises(ValueError, match="use_weighting"):
        OFFLINE["dpo"].fn(paired(), use_weighting=True)
    with pytest.raises(ValueError, match="ld_alpha"):
        OFFLINE["ipo"].fn(paired(), ld_alpha=0.5)
    assert torch.isfinite(OFFLINE["ipo"].fn(token_level(), ld_alpha=0.5, use_weighting=True)[0])


def test_registry_flags():
    assert not OFFLINE["simpo"].needs_reference and not OFFLINE["cpo"].needs_reference
    assert not OFFLINE["orpo"].needs_reference and not OFFLINE["pro"].needs_reference
    assert not OFFLINE["sft"].needs_reference
    assert OFFLINE["kto"].needs_kl_pairs and not OFFLINE["apo_zero_unpaired"].needs_kl_pairs
    assert all(OFFLINE[n].needs_reference for n in PAIRED if n not in {"simpo", "cpo", "orpo", "repo", "cpl"} | SCORE_LOSSES)
    assert not any(spec.token_logps_needed() for spec in OFFLINE.values())  # at the defaults; asked per value
    assert "f_divergence" in OFFLINE["dpo"].hparams() and "f_divergence" not in OFFLINE["nca_pair"].hparams()
    assert "use_weighting" not in OFFLINE["aot"].hparams()
