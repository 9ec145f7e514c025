"""Reward functions by name or dotted path, and their weighted mix.

A reward function is batched and synchronous::

    fn(prompts: list[str], completions: list[str], **columns: list) -> list[float]

``prompts[i]`` is the rendered prompt text of ``completions[i]``; ``columns`` holds the prompt
record's extra columns (the demo task's ``answer``, ...), one list entry per completion. A function
must accept (and may ignore) columns it does not use, so always give it ``**columns``.

* ``@register_reward(name)`` adds a function to the registry; the built-in ones (the demo
  task's ``accuracy``, ``format``, ``concise``, ``judge``) register when ``alignkit.rewards`` is
  imported, and ``resolve_reward`` imports them on first use.
* ``resolve_reward("judge")`` looks a name up; ``resolve_reward("mypkg.rewards:fn")`` or
  ``resolve_reward("mypkg.rewards.fn")`` imports only the module ``mypkg.rewards`` and takes its
  attribute ``fn``. Unknown names and unimportable paths raise ``ConfigError`` listing the valid
  names, so a typo fails at compose time.
* ``RewardMix(names, weights)`` resolves every name once; calling it returns
  ``MixedRewards(total, per_function)``: ``total[i] = sum_k weights[k] * r_k[i]`` and the
  unweighted ``r_k`` per function, keyed by the function's short name (the registry name, or the
  attribute name of a dotted path) for the ``reward/<name>`` metrics. A weight of 0 logs a
  function without rewarding it. A function that returns the wrong number of values, or a value
  that is not a finite number, raises ``ConfigError`` naming it.

Left out: asynchronous reward functions beyond the trivial case (a coroutine result is run with
``asyncio.run``, so not from inside a running event loop), remote reward servers, reward models
(the online trainers add those themselves).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
from typing import Any, Callable, NamedTuple, Sequence

from alignkit.errors import ConfigError

RewardFn = Callable[..., Sequence[float]]

BUILTIN_MODULES = ("alignkit.rewards.judge",)

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name`` (a plain identifier, no dots or colons)."""
    if not name or "." in name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no '.' or ':'")

    def decorate(fn: RewardFn) -> RewardFn:
        known = _REGISTRY.get(name)
        if known is not None and _qualified(known) != _qualified(fn):
            raise ValueError(f"reward {name!r} is already registered by {_qualified(known)}")
        _REGISTRY[name] = fn
        return fn

    return decorate


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def reward_names() -> list[str]:
    """Every registered reward name, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def _split_path(path: str) -> tuple[str, str]:
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    return module, attr


def short_name(name_or_path: str) -> str:
    """The metric name of a reward: the registry name, or the attribute name of a dotted path."""
    return _split_path(name_or_path)[1] if ("." in name_or_path or ":" in name_or_path) else name_or_path


def resolve_reward(name_or_path: str) -> RewardFn:
    """The reward function registered as ``name_or_path``, or the one a dotted path points to."""
    _load_builtins()
    name = str(name_or_path).strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
    valid = ", ".join(sorted(_REGISTRY))
    hint = (
        f"Valid reward names: {valid}; or give a dotted path to your own function "
        "('mypkg.rewards:my_reward' or 'mypkg.rewards.my_reward') taking "
        "(prompts, completions, **columns) and returning one float per completion."
    )
    if "." not in name and ":" not in name:
        raise ConfigError(f"reward.fns: unknown reward function {name!r}. {hint}")
    module_name, attr = _split_path(name)
    if not module_name or not attr:
        raise ConfigError(f"reward.fns: {name!r} is not a valid dotted path. {hint}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"reward.fns: cannot import module {module_name!r} for reward {name!r} ({exc}). {hint}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"reward.fns: module {module_name!r} has no callable {attr!r} (from {name!r}). {hint}")
    return fn


class MixedRewards(NamedTuple):
    total: list[float]  # weighted sum per completion
    per_function: dict[str, list[float]]  # unweighted rewards per function short name


def _call(fn: RewardFn, name: str, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
    result: Any = fn(prompts, completions, **columns)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    try:
        values = [float(v) for v in result]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"reward function {name!r} must return a list of numbers; it returned {result!r:.200}") from exc
    if len(values) != len(completions):
        raise ConfigError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ConfigError(f"reward function {name!r} returned non-finite rewards ({bad[:3]}); return finite floats")
    return values


class RewardMix:
    """A weighted sum of reward functions; ``weights`` default to 1.0 each."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None):
        names = [str(n) for n in names]
        if not names:
            raise ConfigError(f"reward.fns is empty: name at least one reward function ({', '.join(reward_names())}).")
        weights = [1.0] * len(names) if weights is None or len(weights) == 0 else [float(w) for w in weights]
        if len(weights) != len(names):
            raise ConfigError(
                f"reward.weights has {len(weights)} entries for {len(names)} reward.fns {names}: "
                "give one weight per function, or none for all 1.0."
            )
        if not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"reward.weights must be finite numbers, got {weights}.")
        keys = [short_name(n) for n in names]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ConfigError(f"reward.fns names {duplicates} more than once; list each reward function once.")
        self.names = keys
        self.weights = weights
        self.fns = [resolve_reward(n) for n in names]

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> MixedRewards:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        per_function = {name: _call(fn, name, prompts, completions, columns) for name, fn in zip(self.names, self.fns)}
        total = [
            sum(w * per_function[name][i] for name, w in zip(self.names, self.weights)) for i in range(len(completions))
        ]
        return MixedRewards(total, per_function)

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights))
        return f"RewardMix({terms})"
