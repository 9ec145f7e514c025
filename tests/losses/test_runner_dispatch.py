"""Runner dispatch comes from the loss registry and one runner table (``alignkit.losses.runners``).

Every registered loss declares a runner of the table, every runner's trainer module exists and has
``train``, and the config's ``runner`` choices, ``runner_for`` and ``run.run_in_process`` all read
the same table, so adding a loss or a runner cannot leave one of them behind. The loss-runner pairs
the table declares (``Runner.needs`` / ``only_here``: its losses under it only; ``Runner.alone``: that
one loss and nothing else) are refused both ways at compose time, for every runner that declares them;
so is each knob the table declares (``Runner.knobs``) set under a runner that does not read it, and each
of those knobs is a key of the typed schema.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import typing

import pytest
import yaml
from omegaconf import OmegaConf

from alignkit.config.compose import compose
from alignkit.config.schema import AlignkitConfig
from alignkit.config.validate import runner_for
from alignkit.errors import ConfigError
from alignkit.losses import available_losses, resolve_loss
from alignkit.losses.registry import register_loss
from alignkit.losses.runners import (JOINS_ANY, RUNNERS, VIEW_RUNNERS, check_knobs, knob_readers, offline_runners,
                                      runner_of)


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


KNOBS = knob_readers()  # each declared knob -> the runners that read it


def _schema_type(key: str) -> typing.Any:
    """The type the schema gives the dotted ``key``, walking its dataclasses (AssertionError where a part of the
    key is no field: a typo in the table, or a key under a free-form node such as ``loss``)."""
    cls: typing.Any = AlignkitConfig
    for part in key.split("."):
        assert dataclasses.is_dataclass(cls), f"{key}: {part!r} lies under a free-form node, not a schema field"
        names = [field.name for field in dataclasses.fields(cls)]
        assert part in names, f"{key}: the schema has no {part!r} here (fields: {', '.join(names)})"
        cls = typing.get_type_hints(cls)[part]
    assert not dataclasses.is_dataclass(cls), f"{key} is a whole section, not a knob"
    return cls


def _default(key: str) -> typing.Any:
    value: typing.Any = AlignkitConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _away_from_default(key: str) -> str:
    """A value of ``key``'s schema type other than its default, as an override writes it (and the message
    echoes it)."""
    hint, default = _schema_type(key), _default(key)
    kind = ([t for t in typing.get_args(hint) if t is not type(None)] or [hint])[0]  # Optional[float] -> float
    if kind is bool:
        return "false" if default else "true"
    if kind is int:
        return "3" if default is None else str(default + 1)
    if kind is float:
        return "0.75" if default == 0.25 else "0.25"
    if kind is str:
        assert default != "other"
        return "other"
    raise AssertionError(f"{key}: a knob of type {hint}; teach _away_from_default a value of that type")


def _not_reading(readers: tuple[str, ...]) -> list[str]:
    """Two runners that do not read a knob: an offline and an online one (each has its ``<runner>_tiny``)."""
    return [next(r for r in RUNNERS if r not in readers and RUNNERS[r].online is online) for online in (False, True)]


def test_the_table_declares_the_runner_only_knobs():  # the parametrized cases below are not empty by accident
    assert {"rl.mixture_coef", "rl.preference", "rl.teacher", "rl.teacher_seed", "rl.lmbda", "rl.seq_kd",
            "rl.sppo_samples", "rl.raft_min_reward", "data.train_on_last_step_only", "judge.kind"} <= set(KNOBS)
    assert KNOBS["judge.kind"] == ("online_dpo", "xpo", "nash_md", "sppo")  # one knob, several readers
    assert KNOBS["rl.lmbda"] == ("gkd",) and KNOBS["rl.mixture_coef"] == ("nash_md",)
    for key, readers in KNOBS.items():
        assert len(set(readers)) == len(readers) and set(readers) < set(RUNNERS), (key, readers)


@pytest.mark.parametrize("key", sorted(KNOBS))
def test_every_declared_knob_is_a_key_of_the_schema(key):
    _schema_type(key)
    _away_from_default(key)  # and the tests below can set it away from its default


@pytest.mark.parametrize("key, runner", [(key, runner) for key, readers in sorted(KNOBS.items())
                                         for runner in _not_reading(readers)])
def test_a_knob_set_under_a_runner_that_does_not_read_it_is_refused(key, runner):
    value, readers = _away_from_default(key), KNOBS[key]
    message = f"{key}={value} is read by runner={' / '.join(readers)} only; this run's runner is {runner}. Remove it."
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([f"recipe={runner}_tiny", f"{key}={value}"])


@pytest.mark.parametrize("key, runner", [(key, runner) for key, readers in sorted(KNOBS.items()) for runner in readers])
def test_a_knob_is_not_refused_under_a_runner_that_reads_it(key, runner):
    value = _away_from_default(key)
    cfg = compose([f"recipe={runner}_tiny"])
    assert runner_for(cfg) == runner
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.update(cfg, key, yaml.safe_load(value))  # the override's value: true, 0.25, 3, other
    check_knobs(runner, cfg)  # the knob rule itself passes, whatever ran before it in validate
    assert OmegaConf.select(cfg, key) != _default(key)
    try:  # composed: a rule on the value under its own runner may refuse it (rl.preference=other), not this one
        compose([f"recipe={runner}_tiny", f"{key}={value}"])
    except ConfigError as err:
        assert "is read by runner" not in str(err), str(err)
