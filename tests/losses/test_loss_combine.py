"""build_objective / WeightedLoss: weighted sums, view checks, needs, hyper-parameter checks."""

from __future__ import annotations

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.losses import resolve_loss
from alignkit.losses.combine import WeightedLoss, build_objective
from offline_loss_cases import PAIRS, log_sigmoid, mean, paired, token_level

torch.set_num_threads(1)


def test_rpo_is_dpo_plus_weighted_token_mean_nll():
    objective = build_objective(["dpo", "sft"], [1.0, 0.2], {"dpo": {"beta": 0.3}})
    assert isinstance(objective, WeightedLoss) and objective.view == "pairwise"
    dpo = mean(-log_sigmoid(0.3 * ((p[0] - p[2]) - (p[1] - p[3]))) for p in PAIRS)
    nll = -sum(p[0] for p in PAIRS) / sum(p[4] for p in PAIRS)
    loss, metrics = objective(paired())
    assert loss.item() == pytest.approx(dpo + 0.2 * nll)
    assert metrics["loss/dpo"].item() == pytest.approx(dpo)
    assert metrics["loss/sft"].item() == pytest.approx(nll)
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(0.3 * (p[0] - p[2]) for p in PAIRS))
    assert "loss" not in metrics


def test_default_weights_are_one_and_gradients_flow():
    inputs = paired(requires_grad=True)
    loss, _ = build_objective(["simpo", "sft"])(inputs)
    direct = resolve_loss("simpo").fn(inputs)[0] + resolve_loss("sft").fn(inputs)[0]
    assert loss.item() == pytest.approx(direct.item())
    loss.backward()
    assert inputs.logps.grad is not None


def test_first_part_wins_a_metric_clash():
    _, metrics = build_objective(["dpo", "sft"], hparams={"dpo": {"ld_alpha": 0.0}})(token_level())
    ld_chosen = resolve_loss("dpo").fn(token_level(), ld_alpha=0.0)[1]["logps/chosen"]
    assert metrics["logps/chosen"].item() == pytest.approx(ld_chosen.item())


def test_needs_over_the_parts():
    assert build_objective(["dpo", "sft"]).needs_reference
    assert not build_objective(["simpo", "sft"]).needs_reference
    assert not build_objective(["sft"]).needs_reference and build_objective(["sft"]).view == "sft"
    assert build_objective(["kto"]).needs_kl_pairs and not build_objective(["dpo"]).needs_kl_pairs
    assert not build_objective(["dpo", "sft"]).needs_token_logps
    assert build_objective(["dpo"], hparams={"dpo": {"use_weighting": True}}).needs_token_logps
    assert build_objective(["ipo", "sft"], hparams={"ipo": {"ld_alpha": 0.5}}).needs_token_logps


def test_requires_token_logps_reads_the_values():
    spec = resolve_loss("dpo")
    assert not spec.token_logps_needed({})
    assert not spec.token_logps_needed({"use_weighting": False, "ld_alpha": None})
    assert spec.token_logps_needed({"use_weighting": True})
    assert spec.token_logps_needed({"ld_alpha": 0.0})
    # the loss declares it (a function of its hyper-parameters); a loss without the knobs never needs them
    assert not resolve_loss("simpo").token_logps_needed({"ld_alpha": 0.0})


def test_reference_need_reads_the_values():
    grpo = resolve_loss("grpo")
    assert not grpo.reference_needed() and not grpo.reference_needed({"beta": 0.0})
    assert grpo.reference_needed({"beta": 0.04})  # the KL term reads ref_logps
    assert build_objective(["grpo"], hparams={"grpo": {"beta": 0.04}}).needs_reference
    assert not build_objective(["grpo"]).needs_reference


@pytest.mark.parametrize(
    "names", [["dpo", "kto"], ["kto", "sft"], ["lipo", "sft"], ["lipo", "dpo"], ["apo_zero_unpaired", "simpo"]]
)
def test_mixed_views_are_rejected(names):
    with pytest.raises(ConfigError, match="view"):
        build_objective(names)


@pytest.mark.parametrize(
    "args,match",
    [
        ((["dpo"], None, {"dpo": {"betta": 0.1}}), "betta"),
        ((["dpo"], None, {"ipo": {"beta": 0.1}}), "ipo"),
        ((["dpo", "sft"], [1.0], None), "weight"),
        ((["dpo", "dpo"], None, None), "twice"),
        (([], None, None), "no loss"),
        ((["dpoo"], None, None), "Valid choices"),
        ((["robust"], None, {"robust": {"label_smoothing": 0.6}}), "label_smoothing"),
        ((["dpo"], None, {"dpo": {"f_divergence": "chi2"}}), "js_divergence"),
    ],
)
def test_config_mistakes_fail_at_build_time(args, match):
    with pytest.raises(ConfigError, match=match):
        build_objective(*args)


def test_unknown_hyper_parameter_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_objective(["sft"], hparams={"sft": {"beta": 0.1}})
    assert "(none)" in str(err.value)


def test_user_loss_by_dotted_path():
    objective = build_objective(["offline_loss_cases:user_margin_loss", "sft"], [2.0, 1.0],
                                {"offline_loss_cases:user_margin_loss": {"scale": 0.5}})
    assert objective.needs_reference  # a bare function is treated as pairwise with a reference
    margin = mean(p[1] - p[0] for p in PAIRS)
    nll = -sum(p[0] for p in PAIRS) / sum(p[4] for p in PAIRS)
    loss, metrics = objective(paired())
    assert loss.item() == pytest.approx(2.0 * 0.5 * margin + nll)
    assert "loss/offline_loss_cases:user_margin_loss" in metrics
    with pytest.raises(ConfigError):
        build_objective(["offline_loss_cases:user_margin_loss"],
                        hparams={"offline_loss_cases:user_margin_loss": {"beta": 1.0}})
