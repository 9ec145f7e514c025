"""Reward functions by name: the registry (``@register_reward``) and resolving a name or a dotted path.

* ``@register_reward(name)`` adds a function to the registry; the built-in ones (the demo
  task's ``accuracy``, ``format``, ``concise``, ``judge``; ``correctness`` from
  ``alignkit.rewards.math``; DAPO's ``overlong`` from ``alignkit.rewards.overlong``) register when
  ``alignkit.rewards`` is imported, and ``resolve_reward`` imports them on first use.
* ``resolve_reward("judge")`` looks a name up; ``resolve_reward("mypkg.rewards:fn")`` or
  ``resolve_reward("mypkg.rewards.fn")`` imports only the module ``mypkg.rewards`` (also from the
  working directory) and takes its attribute ``fn``; ``resolve_reward("path/to/my_rewards.py:fn")``
  loads that file (verl's ``custom_reward_function.path`` + ``name``). Unknown names and
  unimportable paths raise ``ConfigError`` listing the valid names, so a typo fails at compose time.

``short_name`` is the metric name of a reward (the registry name, or a dotted path's attribute). The
calling conventions, the weighted mix and its dry run are ``alignkit.rewards.registry``'s, which
re-exports these names.

Left out: listing the functions a module offers, reloading a changed file in a running process.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Sequence

from alignkit.errors import ConfigError

RewardFn = Callable[..., Sequence[float]]

BUILTIN_MODULES = ("alignkit.rewards.judge", "alignkit.rewards.math", "alignkit.rewards.overlong")

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name`` (a plain identifier, no dots or colons)."""
    if not name or "." in name or ":" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no '.' or ':'")

    def decorate(fn: RewardFn) -> RewardFn:
        known = _REGISTRY.get(name)
        if known is not None and qualified_name(known) != qualified_name(fn):
            raise ValueError(f"reward {name!r} is already registered by {qualified_name(known)}")
        _REGISTRY[name] = fn
        return fn

    return decorate


def is_registered(fn: Callable) -> bool:
    """Whether ``fn`` itself is a registered reward (the built-ins loaded first)."""
    _load_builtins()
    return any(fn is known for known in _REGISTRY.values())


def qualified_name(fn: Callable) -> str:
    """``module.qualname`` of ``fn``."""
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


def _import_module(module_name: str):
    """``importlib.import_module``, also from the working directory (a console script does not put it on sys.path)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if exc.name != top or os.getcwd() in sys.path or "" in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(module_name)


def _import_file(file_name: str):
    """The module of a ``.py`` file named in ``reward.fns`` (``my_rewards.py:fn``), as verl's
    ``custom_reward_function.path`` names one."""
    import importlib.util
    from pathlib import Path

    path = Path(file_name).expanduser().resolve()
    if not path.is_file():
        raise ImportError(f"no such file {path}")
    key = f"alignkit_user_rewards_{abs(hash(str(path)))}_{path.stem}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[key]
        raise ImportError(f"{path} raised {type(exc).__name__}: {exc} on import") from exc
    return module


def resolve_reward(name_or_path: str) -> RewardFn:
    """The reward function registered as ``name_or_path``, or the one a dotted path points to."""
    _load_builtins()
    name = str(name_or_path).strip()
    if name in _REGISTRY:
        return _REGISTRY[name]
    valid = ", ".join(sorted(_REGISTRY))
    hint = (
        f"Valid reward names: {valid}; or give a dotted path to your own function "
        "('mypkg.rewards:my_reward', 'mypkg.rewards.my_reward' or 'path/to/my_rewards.py:my_reward'): "
        "a TRL-style function called by keyword "
        "with prompts, completions and the record's columns, returning one float (or None) per completion, "
        "or a verl-style compute_score(data_source, solution_str, ground_truth, extra_info)."
    )
    if "." not in name and ":" not in name:
        raise ConfigError(f"reward.fns: unknown reward function {name!r}. {hint}")
    module_name, attr = _split_path(name)
    if not module_name or not attr:
        raise ConfigError(f"reward.fns: {name!r} is not a valid dotted path. {hint}")
    try:
        module = _import_file(module_name) if module_name.endswith(".py") else _import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"reward.fns: cannot import module {module_name!r} for reward {name!r} ({exc}). {hint}") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"reward.fns: module {module_name!r} has no callable {attr!r} (from {name!r}). {hint}")
    return fn
