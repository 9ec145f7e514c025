"""The reward registry: names, dotted paths, errors that list the valid names, and RewardMix."""

import sys
import textwrap

import pytest

from alignkit.errors import ConfigError
from alignkit.rewards import RewardMix, register_reward, resolve_reward, reward_names
from alignkit.rewards import judge


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package with two modules; only the named one may be imported by a dotted path."""
    pkg = tmp_path / "myrewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "lengthy.py").write_text(textwrap.dedent("""
        import asyncio

        def length(prompts, completions, **columns):
            return [float(len(c)) for c in completions]

        def wrong_count(prompts, completions, **columns):
            return [1.0]

        def not_finite(prompts, completions, **columns):
            return [float("nan")] * len(completions)

        def not_numbers(prompts, completions, **columns):
            return ["high"] * len(completions)

        async def async_len(prompts, completions, **columns):
            await asyncio.sleep(0)
            return [float(len(c)) for c in completions]

        NOT_CALLABLE = 3
    """))
    (pkg / "other.py").write_text("raise RuntimeError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myrewards_pkg"
    for name in [m for m in sys.modules if m.startswith("myrewards_pkg")]:
        del sys.modules[name]


def test_builtin_names():
    assert set(reward_names()) >= {"accuracy", "format", "concise", "judge"}
    assert resolve_reward("judge") is judge.judge_reward
    assert resolve_reward(" format ") is judge.format_reward


@pytest.mark.parametrize("path", ["alignkit.rewards.judge:concise_reward", "alignkit.rewards.judge.concise_reward"])
def test_dotted_path_to_a_builtin(path):
    assert resolve_reward(path) is judge.concise_reward


def test_dotted_path_imports_only_the_named_module(user_module):
    fn = resolve_reward(f"{user_module}.lengthy:length")
    assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert f"{user_module}.lengthy" in sys.modules
    assert f"{user_module}.other" not in sys.modules


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        resolve_reward("acuracy")
    message = str(info.value)
    assert "acuracy" in message
    for name in ("accuracy", "format", "concise", "judge"):
        assert name in message


@pytest.mark.parametrize("path", ["no_such_module_xyz:fn", "alignkit.rewards.judge:no_such_fn", "alignkit.rewards.judge:WEIGHTS.x",
                                  ":fn", "alignkit.rewards.judge:"])
def test_bad_dotted_paths(path):
    with pytest.raises(ConfigError) as info:
        resolve_reward(path)
    assert "judge" in str(info.value)  # the valid names are listed


def test_not_callable(user_module):
    with pytest.raises(ConfigError):
        resolve_reward(f"{user_module}.lengthy:NOT_CALLABLE")


def test_register_reward_rejects_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError):
        register_reward("judge")(lambda prompts, completions, **columns: [0.0] * len(completions))
    with pytest.raises(ValueError):
        register_reward("my.reward")


def test_register_and_resolve_a_new_name():
    @register_reward("test_registry_constant")
    def constant(prompts, completions, **columns):
        return [0.5] * len(completions)

    assert resolve_reward("test_registry_constant") is constant
    assert "test_registry_constant" in reward_names()


def test_mix_weights_totals_and_parts(user_module):
    mix = RewardMix(["judge", "accuracy", f"{user_module}.lengthy:length"], [2.0, 0.0, -0.1])
    completions = ["Answer: 5", "it is 4"]
    total, parts = mix(["q", "q"], completions, answer=["5", "5"])
    assert list(parts) == ["judge", "accuracy", "length"]
    assert parts["judge"] == [1.5, 0.0]  # a wrong answer earns no format or brevity credit
    assert parts["accuracy"] == [1.0, 0.0]
    assert parts["length"] == [9.0, 7.0]
    assert total == pytest.approx([2 * 1.5 - 0.9, 2 * 0.0 - 0.7])


def test_mix_default_weights_are_one():
    for weights in (None, []):
        total, parts = RewardMix(["format", "concise"], weights)(["q"], ["7 + 5 = 12"], answer=["12"])
        assert total == [0.5 + 1.0]


@pytest.mark.parametrize("names,weights", [(["judge"], [1.0, 2.0]), ([], None), (["judge", "judge"], None),
                                           (["judge"], [float("inf")]), (["nope"], None)])
def test_mix_config_errors(names, weights):
    with pytest.raises(ConfigError):
        RewardMix(names, weights)


@pytest.mark.parametrize("fn", ["wrong_count", "not_finite", "not_numbers"])
def test_mix_rejects_bad_outputs_naming_the_function(user_module, fn):
    mix = RewardMix([f"{user_module}.lengthy:{fn}"])
    with pytest.raises(ConfigError) as info:
        mix(["a", "b"], ["x", "y"])
    assert fn in str(info.value)


def test_async_reward_function(user_module):
    total, parts = RewardMix([f"{user_module}.lengthy:async_len"])(["a"], ["xyz"])
    assert total == [3.0] and parts == {"async_len": [3.0]}
