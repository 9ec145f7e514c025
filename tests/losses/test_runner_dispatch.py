"""Runner dispatch comes from the loss registry and one runner table (``alignkit.losses.runners``).

Every registered loss declares a runner of the table, every runner's trainer module exists and has
``train``, and the config's ``runner`` choices, ``runner_for`` and ``run.run_in_process`` all read
the same table, so adding a loss or a runner cannot leave one of them behind.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from alignkit.config.compose import compose
from alignkit.config.validate import runner_for
from alignkit.errors import ConfigError
from alignkit.losses import available_losses, resolve_loss
from alignkit.losses.registry import register_loss
from alignkit.losses.runners import RUNNERS, VIEW_RUNNERS, offline_runners, runner_of


@pytest.mark.parametrize("name", sorted(available_losses()))
def test_every_registered_loss_resolves_to_a_known_runner_module(name):
    spec = available_losses()[name]
    assert spec.runner in RUNNERS, f"loss {name!r} declares runner {spec.runner!r}, not in RUNNERS"
    assert importlib.util.find_spec(RUNNERS[spec.runner].module) is not None
    if spec.view == "distill":  # GKD: the teacher lives in its runner, which samples without a reward (offline)
        assert spec.runner == "gkd" and not RUNNERS["gkd"].online
    elif spec.view == "stepwise":  # a process reward model's step logits: only the prm runner computes them
        assert spec.runner == "prm" == VIEW_RUNNERS["stepwise"] and not RUNNERS["prm"].online
    elif spec.view != "rollout":
        # bradley_terry trains a reward model; xpo needs the xpo runner's (policy, reference) sample pairs
        assert spec.runner == VIEW_RUNNERS[spec.view] or (name, spec.runner) in {("bradley_terry", "reward"), ("pairwise_bce", "pm"),
                                                                                  ("xpo", "xpo")}
    else:
        assert RUNNERS[spec.runner].online


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_every_runner_module_has_train(runner):
    module = importlib.import_module(RUNNERS[runner].module)
    assert callable(getattr(module, "train", None))


def test_runner_of_the_registry_declarations():
    assert runner_of([resolve_loss("dpo"), resolve_loss("sft")]) == "preference"  # sft joins
    assert runner_of([resolve_loss("sft")]) == "sft"
    assert runner_of([resolve_loss("bradley_terry")]) == "reward"
    assert runner_of([resolve_loss("ppo"), resolve_loss("ppo_value")]) == "ppo"
    assert runner_of([resolve_loss("grpo")]) == "grpo"
    assert runner_of([resolve_loss("kto")]) == runner_of([resolve_loss("lipo")]) == "preference"
    with pytest.raises(ConfigError, match="need different runners"):
        runner_of([resolve_loss("grpo"), resolve_loss("ppo")])
    assert offline_runners() == ("sft", "preference", "reward", "pm", "dro", "gkd", "prm")
    assert runner_of([resolve_loss("prm")]) == "prm"
    assert runner_of([resolve_loss("gkd")]) == "gkd"
    assert {name for name, runner in RUNNERS.items() if runner.online} == {"ppo", "grpo", "online_dpo", "raft", "xpo",
                                                                            "nash_md", "sppo"}
    assert runner_of([resolve_loss("xpo")]) == runner_of([resolve_loss("xpo"), resolve_loss("sft")]) == "xpo"
    assert runner_of([resolve_loss("nash_md")]) == "nash_md"
    assert runner_of([resolve_loss("sppo")]) == "sppo"


def test_runner_for_and_the_runner_choices_read_the_table():
    assert runner_for(compose(["recipe=dpo_tiny"])) == "preference"
    assert runner_for(compose(["recipe=ppo_tiny", "runner=auto"])) == "ppo"  # derived, not the recipe's key
    assert runner_for(compose(["recipe=grpo_tiny", "runner=auto"])) == "grpo"
    assert runner_for(compose(["recipe=rm_tiny", "runner=auto"])) == "reward"
    assert runner_for(compose(["recipe=sft_tiny"])) == "sft"
    assert runner_for(compose(["recipe=dpo_tiny", "runner=sft"])) == "sft"  # an explicit runner overrides
    with pytest.raises(ConfigError, match="Valid choices: auto, " + ", ".join(RUNNERS)):
        compose(["recipe=dpo_tiny", "runner=raft_not_yet"])


def test_register_loss_refuses_a_runner_outside_the_table():
    with pytest.raises(ValueError, match="runner must be one of"):
        register_loss("bogus_rollout", view="rollout", needs_reference=False)(lambda inputs: None)
    with pytest.raises(ValueError, match="runner must be one of"):
        register_loss("bogus_runner", view="pairwise", needs_reference=False, runner="nope")(lambda inputs: None)
    assert "bogus_rollout" not in available_losses() and "bogus_runner" not in available_losses()
