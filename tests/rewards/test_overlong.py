"""DAPO's overlong reward shaping (``overlong``): values, knobs, and the token counts it is called with."""

from __future__ import annotations

import pytest

from alignkit.errors import ConfigError
from alignkit.rewards import RewardFunctionError, RewardMix, resolve_reward
from alignkit.rewards import overlong as overlong_module


def paper(length: int, l_max: int, l_cache: int, factor: float = 1.0) -> float:
    """DAPO eq. (13), written out independently, times the penalty factor (verl's overlong_buffer)."""
    if length > l_max:
        return -1.0 * factor
    if length <= l_max - l_cache:
        return 0.0
    return factor * ((l_max - l_cache) - length) / l_cache


def ids(*lengths: int) -> list[list[int]]:
    return [[7] * n for n in lengths]


def score(lengths, **options) -> list[float]:
    max_new_tokens = options.pop("max_new_tokens", None)
    mix = RewardMix(["overlong"], options={"overlong": options}, max_new_tokens=max_new_tokens)
    n = len(lengths)
    return mix(["p"] * n, ["reply"] * n, completion_ids=ids(*lengths)).per_function["overlong"]


def test_registered_under_its_name():
    assert resolve_reward("overlong") is overlong_module.overlong_reward


def test_boundaries_against_the_formula():
    l_max, l_cache = 20, 5
    lengths = [0, 1, 14, 15, 16, 17, 19, 20, 21, 40]
    got = score(lengths, max_len=l_max, cache=l_cache)
    assert got == pytest.approx([paper(n, l_max, l_cache) for n in lengths])
    # the same boundaries as literals: L_max - L_cache, L_max - L_cache + 1, L_max, L_max + 1
    at = dict(zip(lengths, got))
    assert at[15] == 0.0
    assert at[16] == pytest.approx(-0.2)
    assert at[20] == pytest.approx(-1.0)
    assert at[21] == pytest.approx(-1.0)  # the paper's -1, not the ramp extrapolated (-1.2)
    assert at[40] == pytest.approx(-1.0)


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_penalty_factor_scales_every_value(factor):
    lengths = [10, 11, 13, 16, 17]
    got = score(lengths, max_len=16, cache=6, penalty_factor=factor)
    assert got == pytest.approx([paper(n, 16, 6, factor) for n in lengths])
    if factor:
        assert got[-2] == pytest.approx(-factor) and got[-1] == pytest.approx(-factor)
        assert got[2] == pytest.approx(-factor * 3 / 6)


def test_max_len_defaults_to_max_new_tokens_and_a_cut_completion_counts_as_l_max():
    # a completion cut at the generation limit has exactly max_new_tokens ids: |y| = L_max (-1), not > L_max
    got = score([8, 9, 12], cache=4, max_new_tokens=12)
    assert got == pytest.approx([0.0, -0.25, -1.0])
    # an explicit max_len wins over the generation limit
    assert score([8, 9, 12], max_len=10, cache=2, max_new_tokens=12) == pytest.approx([0.0, -0.5, -1.0])


def test_cache_defaults_to_a_fifth_of_l_max():
    assert overlong_module.overlong_settings(max_new_tokens=20480).cache == 4096  # DAPO's setting
    assert overlong_module.overlong_settings(max_len=24).cache == 4
    assert overlong_module.overlong_settings(max_len=3).cache == 1  # never 0
    assert score([20, 21], max_new_tokens=24) == pytest.approx([0.0, -0.25])


def test_tokens_not_characters():
    mix = RewardMix(["overlong"], options={"overlong": {"cache": 2}}, max_new_tokens=4)
    got = mix(["p", "p"], ["x" * 1000, ""], completion_ids=ids(1, 4)).per_function["overlong"]
    assert got == [0.0, -1.0]


@pytest.mark.parametrize("cache", [0, -3])
def test_cache_below_one_is_a_config_error(cache):
    with pytest.raises(ConfigError, match=r"reward\.options\.overlong\.cache=.*at least 1 token"):
        RewardMix(["overlong"], options={"overlong": {"cache": cache}}, max_new_tokens=16)
    with pytest.raises(ConfigError, match="at least 1 token"):
        overlong_module.overlong_reward(["p"], ["r"], completion_ids=ids(3), max_len=16, cache=cache)


@pytest.mark.parametrize("options, message", [
    ({"cache": 17}, "longer than max_len=16"),
    ({"cache": 2.5}, "whole number"),
    ({"penalty_factor": -1.0}, "finite number >= 0"),
    ({"penalty_factor": float("inf")}, "finite number >= 0"),
    ({"max_len": 0}, "at least 1 token"),
    ({"cach": 4}, "takes no option 'cach'. Its options: max_len, cache, penalty_factor"),
    ({"completion_ids": [[1]]}, "takes no option 'completion_ids'"),
])
def test_bad_knobs_fail_when_the_mix_is_built(options, message):
    with pytest.raises(ConfigError, match=message):
        RewardMix(["accuracy", "overlong"], options={"overlong": options}, max_new_tokens=16)


def test_without_a_length_limit_or_token_ids_it_says_so():
    with pytest.raises(ConfigError, match="needs L_max"):
        RewardMix(["overlong"])  # no max_new_tokens, no max_len
    mix = RewardMix(["overlong"], max_new_tokens=16)
    with pytest.raises(RewardFunctionError, match="without completion_ids"):
        mix(["p"], ["reply"])


def test_options_for_a_function_not_listed_are_refused():
    with pytest.raises(ConfigError, match=r"reward\.options has options for 'overlong', which is not in reward\.fns"):
        RewardMix(["accuracy"], options={"overlong": {"cache": 4}}, max_new_tokens=16)


def test_other_builtins_do_not_get_ids_or_options():
    with pytest.raises(ConfigError, match="takes no option 'cache'"):
        RewardMix(["accuracy"], options={"accuracy": {"cache": 4}})
    mix = RewardMix(["accuracy", "overlong"], max_new_tokens=8)
    got = mix(["p", "p"], ["Answer: 3", "Answer: 4"], answer=["3", "3"], completion_ids=ids(2, 8))
    assert got.per_function == {"accuracy": [1.0, 0.0], "overlong": [0.0, -1.0]}
    assert got.total == pytest.approx([1.0, -1.0])


# ------------------------------------------------------------------ a GRPO config, through the runners' scoring


class _Tokenizer:
    pad_token_id = 0

    def decode(self, token_ids, skip_special_tokens=True):
        return " ".join(str(t) for t in token_ids)

    def encode(self, text, add_special_tokens=False):
        return [5] * len(text.split())


class _Generator:
    """Samples completions of the planned lengths, cut at max_new_tokens as a real engine cuts them."""

    def __init__(self, lengths):
        self.lengths, self.max_new_tokens = lengths, None

    def generate(self, prompts, *, num_samples, max_new_tokens, **sampling):
        from alignkit.rl.generation import Rollout

        self.max_new_tokens = max_new_tokens
        out = []
        for p in range(len(prompts)):
            for s in range(num_samples):
                n = self.lengths[p * num_samples + s]
                kept = min(n, max_new_tokens)
                out.append(Rollout(p, s, [9] * kept, [0.0] * kept, finished=n <= max_new_tokens))
        return out


def test_grpo_config_composes_and_the_reward_sees_the_token_counts(monkeypatch):
    from alignkit.config.compose import compose
    from alignkit.config.schema import GenerationConfig, section
    from alignkit.data.batch import TokenizedGroup
    from alignkit.trainers.common import typed_run
    from alignkit.trainers.rollout import build_reward_mix, sample_groups

    cfg = compose(["recipe=grpo_tiny", "reward.fns=[accuracy,overlong]", "reward.weights=[1.0,0.5]",
                   "++reward.options.overlong.cache=4", "++reward.options.overlong.penalty_factor=2.0",
                   "generation.max_new_tokens=12", "rl.num_generations=4"])
    assert list(cfg.reward.fns) == ["accuracy", "overlong"]
    assert dict(cfg.reward.options.overlong) == {"cache": 4, "penalty_factor": 2.0}
    reward = build_reward_mix(typed_run(cfg))  # what the GRPO / PPO / online DPO trainers build
    mix = reward.mix
    fn = mix.functions[1]
    assert (fn.name, fn.options, fn.max_new_tokens) == ("overlong", {"cache": 4, "penalty_factor": 2.0}, 12)

    seen = []
    real = overlong_module.overlong_penalty
    monkeypatch.setattr(overlong_module, "overlong_penalty", lambda n, s: seen.append((n, s)) or real(n, s))
    prompts = [TokenizedGroup([1, 2], [], [], extra={"answer": "3"}),
               TokenizedGroup([1, 3], [], [], extra={"answer": "9"})]
    planned = [3, 8, 9, 11, 12, 13, 30, 10]  # 13 and 30 are cut at 12 tokens
    generator = _Generator(planned)
    sampled = sample_groups(generator, _Tokenizer(), prompts, reward, section(cfg, "generation", GenerationConfig),
                            num_samples=4, seed=0)  # run.generation, as the trainers pass it
    assert generator.max_new_tokens == 12
    lengths = [min(n, 12) for n in planned]
    assert [n for n, _ in seen] == lengths
    assert {s for _, s in seen} == {overlong_module.OverlongSettings(max_len=12, cache=4, penalty_factor=2.0)}
    expected = [paper(n, 12, 4, 2.0) for n in lengths]
    assert sampled.reward_parts["overlong"].tolist() == pytest.approx(expected)
    accuracy = [0.0] * 4 + [1.0] * 4  # the replies read "9 9 9 ...": right for the second prompt only
    assert sampled.reward_parts["accuracy"].tolist() == accuracy
    assert sampled.rewards.tolist() == pytest.approx([a + 0.5 * e for a, e in zip(accuracy, expected)])


def test_grpo_config_with_cache_zero_fails_before_any_model_loads():
    from alignkit.config.compose import compose

    from alignkit.trainers.common import typed_run
    from alignkit.trainers.rollout import build_reward_mix

    cfg = compose(["recipe=grpo_tiny", "reward.fns=[accuracy,overlong]", "++reward.options.overlong.cache=0"])
    with pytest.raises(ConfigError, match=r"reward\.options\.overlong\.cache=0: the punishment interval"):
        build_reward_mix(typed_run(cfg))
