"""DAPO's overlong reward shaping (the "soft overlong punishment"): ``overlong``.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476),
section 3.4: with the maximum length ``L_max`` and a punishment interval (cache) ``L_cache``, a
completion of ``|y|`` tokens gets the extra reward::

    R_length(y) = 0                                     |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                = -1                                    L_max < |y|

added to the task reward (``reward.fns=[accuracy,overlong]``; its weight is ``reward.weights``).
Here every value is multiplied by ``penalty_factor`` (default 1.0, the paper's formula), as
verl's DAPO reward manager (``verl/workers/reward_manager/dapo.py``, ``overlong_buffer.len`` =
``L_cache``, ``overlong_buffer.penalty_factor``, ``max_resp_len`` = ``L_max``) does::

    overlong_reward = min(-(valid_response_length - (max_resp_len - len)) / len * penalty_factor, 0)

The two agree wherever verl can be: verl's responses never exceed ``max_resp_len`` (generation
stops there), so it has no third case; this one pays ``-penalty_factor`` beyond ``L_max`` (the
paper's -1, scaled), which only a ``max_len`` below the generation limit can reach.

Knobs, per-function options of the reward mix (``reward.options.overlong.<knob>``; Hydra adds a
key to that free-form node with ``++``, e.g. ``++reward.options.overlong.cache=64``):

* ``max_len`` -- ``L_max`` in tokens; default the run's ``generation.max_new_tokens`` (the
  generation limit, as verl's ``max_response_length``);
* ``cache`` -- ``L_cache`` in tokens, ``1 <= cache <= max_len``; default ``max_len // 5`` (at least
  1): DAPO's 4,096 of 20,480 tokens;
* ``penalty_factor`` -- finite, ``>= 0``; default 1.0.

Anything else (``cache=0``, a cache longer than ``max_len``, a negative factor) is a
``ConfigError`` when the reward mix is built, before any model loads.

Length: ``|y|`` is the number of token ids of the completion *as generated* (the
``completion_ids`` the online runners hand the reward mix, one list per completion: they stop at
and include the first EOS, as verl's ``valid_response_length`` counts the response's attention
mask, EOS included), never characters or a re-tokenised text. A completion cut at the generation
limit has exactly ``max_new_tokens`` ids, so with the default ``max_len`` it counts as
``|y| = L_max`` (value ``-penalty_factor``, the end of the linear ramp), not as longer than
``L_max``. The reward API gives built-in (``alignkit``-convention) rewards the token ids and the
run's ``generation.max_new_tokens`` when they name ``completion_ids`` / ``max_new_tokens``
parameters (``alignkit.rewards.registry``); without token ids (a caller that passes only text)
this reward raises ``RewardFunctionError`` rather than guess a length from the text.

Left out: DAPO's *overlong filtering* (masking truncated samples out of the loss; a trainer
concern, not a reward), logging the overlong fraction as its own metric (``reward/overlong``
is logged as every reward is).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

from alignkit.errors import ConfigError
from alignkit.rewards.registry import RewardFunctionError, register_reward

DAPO_CACHE_DIVISOR = 5  # DAPO: a 4,096-token punishment interval in a 20,480-token generation limit


class OverlongSettings(NamedTuple):
    max_len: int  # L_max
    cache: int  # L_cache
    penalty_factor: float


def _whole(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ConfigError(f"reward.options.overlong.{key}={value!r} must be a whole number of tokens.")
    return int(value)


def overlong_settings(max_len: Any = None, cache: Any = None, penalty_factor: Any = 1.0,
                      max_new_tokens: Any = None) -> OverlongSettings:
    """The checked knobs: ``max_len`` defaults to ``max_new_tokens``, ``cache`` to ``max_len // 5`` (>= 1)."""
    if max_len is None:
        max_len = max_new_tokens
    if max_len is None:
        raise ConfigError(
            "reward 'overlong' needs L_max, the length limit in tokens: it defaults to the run's "
            "generation.max_new_tokens, which this reward mix was built without (build it with "
            "RewardMix.from_config(cfg)), or set reward.options.overlong.max_len.")
    max_len = _whole(max_len, "max_len")
    if max_len < 1:
        raise ConfigError(f"reward.options.overlong.max_len={max_len}: L_max must be at least 1 token.")
    cache = max(1, max_len // DAPO_CACHE_DIVISOR) if cache is None else _whole(cache, "cache")
    if cache < 1:
        raise ConfigError(
            f"reward.options.overlong.cache={cache}: the punishment interval L_cache must be at least 1 token "
            f"(the penalty ramps from 0 at L_max - L_cache down to -penalty_factor at L_max = {max_len}, over "
            "L_cache tokens). DAPO used 4096 of a 20480-token limit; leave it unset for max_len // 5.")
    if cache > max_len:
        raise ConfigError(
            f"reward.options.overlong.cache={cache} is longer than max_len={max_len}: L_max - L_cache would be "
            "negative. Give a cache of at most max_len tokens (verl asserts the same).")
    if isinstance(penalty_factor, bool) or not isinstance(penalty_factor, (int, float)) \
            or not math.isfinite(float(penalty_factor)) or penalty_factor < 0:
        raise ConfigError(
            f"reward.options.overlong.penalty_factor={penalty_factor!r} must be a finite number >= 0 (a negative "
            "factor would reward overlong completions).")
    return OverlongSettings(max_len, cache, float(penalty_factor))


def overlong_penalty(length: int, settings: OverlongSettings) -> float:
    """``R_length`` of a completion of ``length`` tokens, times ``penalty_factor`` (0 or negative)."""
    expected = settings.max_len - settings.cache
    if length <= expected:
        return 0.0
    if length <= settings.max_len:
        return (expected - length) / settings.cache * settings.penalty_factor
    return -settings.penalty_factor


@register_reward("overlong")
def overlong_reward(prompts: list[str], completions: list[Any], *, completion_ids: Sequence[Sequence[int]] | None = None,
                    max_new_tokens: int | None = None, max_len: int | None = None, cache: int | None = None,
                    penalty_factor: float = 1.0, **columns: list) -> list[float]:
    """DAPO's soft overlong punishment on the completions' token counts (0 down to -penalty_factor)."""
    settings = overlong_settings(max_len, cache, penalty_factor, max_new_tokens)
    if completion_ids is None:
        raise RewardFunctionError(
            "reward 'overlong' counts the tokens of each completion as generated, and was called without "
            "completion_ids (text only); the online runners pass them. It does not guess a length from the text.")
    if len(completion_ids) != len(completions):
        raise ValueError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
    return [overlong_penalty(len(ids), settings) for ids in completion_ids]


overlong_reward.check_options = overlong_settings  # the reward mix checks the knobs when it is built
