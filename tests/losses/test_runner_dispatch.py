"""Runner dispatch comes from the loss registry and one runner table (``alignkit.losses.runners``).

Every registered loss declares a runner of the table, every runner's trainer module exists and has
``train``, and the config's ``runner`` choices, ``runner_for`` and ``run.run_in_process`` all read
the same table, so adding a loss or a runner cannot leave one of them behind. The loss-runner pairs
the table declares (``Runner.needs`` / ``only_here``: its losses under it only; ``Runner.alone``: that
one loss and nothing else) are refused both ways at compose time, for every runner that declares them.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import pytest

from alignkit.config.compose import compose
from alignkit.config.validate import runner_for
from alignkit.errors import ConfigError
from alignkit.losses import available_losses, resolve_loss
from alignkit.losses.registry import register_loss
from alignkit.losses.runners import JOINS_ANY, RUNNERS, VIEW_RUNNERS, offline_runners, runner_of


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


EXCLUSIVE = sorted(name for name, runner in RUNNERS.items() if runner.exclusive)
ALONE = sorted(name for name, runner in RUNNERS.items() if runner.alone)


def _elsewhere(owner: str) -> list[str]:
    """Two other runners to try a loss of ``owner`` under: an offline and an online one."""
    return [next(r for r in RUNNERS if r != owner and RUNNERS[r].online is online) for online in (False, True)]


def test_the_table_declares_exclusive_runners():  # the parametrized cases below are not empty by accident
    assert {"pm", "prm", "xpo", "nash_md", "sppo", "gkd"} <= set(EXCLUSIVE)
    assert {"pm", "prm", "nash_md", "sppo", "gkd"} <= set(ALONE) and "xpo" not in ALONE  # xpo: any pairwise loss


@pytest.mark.parametrize("runner", EXCLUSIVE + [r for r in ALONE if r not in EXCLUSIVE])
def test_each_declared_runner_has_its_loss_and_the_recipe_its_messages_cite(runner):
    alone, own = RUNNERS[runner].alone, [n for n, spec in available_losses().items() if spec.runner == runner]
    assert own, f"runner {runner} declares losses of its own, but no registered loss declares runner={runner}"
    assert not alone or alone in own  # runner=auto reaches it from its one loss
    assert runner != JOINS_ANY
    assert runner_for(compose([f"recipe={runner}_tiny"])) == runner  # the recipe the messages name is valid


@pytest.mark.parametrize("owner, loss, runner", [
    (owner, name, runner) for owner in EXCLUSIVE
    for name, spec in sorted(available_losses().items()) if spec.runner == owner for runner in _elsewhere(owner)])
def test_an_exclusive_runners_loss_is_refused_under_another_runner(owner, loss, runner):
    declared = RUNNERS[owner]
    why = declared.only_here or f"is trained by runner={owner} only (it needs {declared.needs})"
    message = f"loss {loss} {why}; this run's runner is {runner}. Use runner=auto (recipe={owner}_tiny)."
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([f"recipe={owner}_tiny", f"loss={loss}", f"runner={runner}"])


@pytest.mark.parametrize("runner", ALONE)
def test_a_runner_that_trains_one_loss_alone_refuses_any_other(runner):
    declared = RUNNERS[runner]
    assert declared.alone != "sft"  # the loss given instead below
    trains = f"{declared.trains} with " if declared.trains else ""
    message = (f"runner={runner} trains {trains}loss={declared.alone} alone; loss.name=sft. "
               f"Use loss={declared.alone} (recipe={runner}_tiny).")
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([f"recipe={runner}_tiny", "loss=sft", f"runner={runner}"])
