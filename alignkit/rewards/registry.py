"""Reward functions by name or dotted path, the conventions they are called in, and their weighted mix.

Three calling conventions, told apart by the function itself (``reward_style``):

* ``alignkit`` -- the built-ins and anything ``@register_reward`` adds::

      fn(prompts: list[str], completions: list[str], **columns: list) -> list[float]

  ``prompts[i]`` is the rendered prompt text of ``completions[i]``; ``columns`` holds the prompt
  record's extra columns (the demo task's ``answer``, ...), one list entry per completion. A
  function that names a ``completion_ids`` parameter also gets the token ids of each completion as
  generated (when the caller has them: the online runners and eval do), one that names
  ``max_new_tokens`` the run's ``generation.max_new_tokens`` (when the mix was built with
  ``RewardMix.from_config``); functions that do not name them never see them.
* ``trl`` -- any other function given by dotted path, called as TRL's
  ``GRPOTrainer._calculate_rewards`` (TRL 1.16) calls it: by keyword,
  ``fn(prompts=..., completions=..., completion_ids=..., **columns)`` with every column of the record
  except ``prompt``. ``prompts`` are the records' prompts as the data has them (a string, or a list
  of ``{role, content}`` messages); a completion is a string for a string prompt and
  ``[{"role": "assistant", "content": text}]`` for a conversational one. ``None`` in the returned
  list means "not applicable": it becomes NaN, the weighted sum skips it (TRL's ``nansum``), and a
  completion no function applies to scores 0 (said once, counted in ``RewardMix.unscored``). TRL's
  ``trainer_state``, ``log_extra``, ``log_metric`` and ``environments`` are not provided: a function
  that requires one is rejected by the dry call; one that takes ``**kwargs`` works. A function
  without ``**kwargs`` gets only the columns it names.
* ``verl`` -- a function with a ``solution_str`` parameter, called as verl's reward managers call
  ``compute_score``: once per completion, by keyword, ``data_source`` (the ``data_source`` column),
  ``solution_str`` (the completion text), ``ground_truth`` (``reward_model["ground_truth"]`` of a
  verl parquet row, else a ``ground_truth`` column, else the reference read from an ``answer``
  column) and ``extra_info`` (the ``extra_info`` column, ``{}`` without one), each only when the
  function accepts it. It returns a number, or a dict whose ``"score"`` is the reward; ``None`` is
  "not applicable".

Names and paths (``alignkit.rewards.names``, re-exported here): ``@register_reward``,
``resolve_reward``, ``reward_names``, ``short_name``.

The mix:

* ``RewardMix(names, weights)`` resolves every name once; calling it returns
  ``MixedRewards(total, per_function)``: ``total[i] = nansum_k weights[k] * r_k[i]`` and the
  unweighted ``r_k`` per function (NaN where it returned ``None``), keyed by the function's short
  name (the registry name, or the attribute name of a dotted path) for the ``reward/<name>``
  metrics. A weight of 0 logs a function without rewarding it.
* Per-function options: ``RewardMix(names, weights, options={"overlong": {"cache": 64}})``, from the
  config's free-form ``reward.options.<short name>.<knob>`` node (``RewardMix.from_config(cfg)``
  reads it with ``reward.fns``, ``reward.weights`` and ``generation.max_new_tokens``). Each knob is
  passed to its function by keyword on every call, so it must be a parameter the function names (a
  keyword-only one for the ``alignkit`` convention, whose ``**columns`` are the record's columns;
  any name for a TRL/verl function with ``**kwargs``), and not one of the arguments alignkit itself
  passes; options of a function not in ``names``, or knobs it does not take, are a ``ConfigError``
  listing the valid ones. A function with a ``check_options`` attribute has it called once, as
  ``check_options(max_new_tokens=..., **its_options)``, when the mix is built, so a bad value fails
  before any model loads.
* ``RewardMix.dry_run(prompt, columns)`` calls every function once on one record, with the
  completion ``DRY_RUN_COMPLETION``, before any model loads: a function whose signature cannot be
  served, that raises, or that returns the wrong thing fails there with ``RewardFunctionError``
  (a ``ConfigError``) naming it, its ``file:line``, what it was called with and what went wrong.
  The same error, with the line that raised, stops a run when a function fails later; no
  traceback either way.

Left out: asynchronous reward functions beyond the trivial case (a coroutine result is run with
``asyncio.run``, so not from inside a running event loop), remote reward servers, reward models
(the online trainers add those themselves), TRL's trainer state and logging callbacks.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import traceback
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from alignkit.errors import ConfigError, UserError
from alignkit.rewards.names import (  # noqa: F401 -- re-exported: callers import them from here
    BUILTIN_MODULES, RewardFn, is_registered, qualified_name, register_reward, resolve_reward, reward_names,
    short_name)

TRL_EXTRAS = ("trainer_state", "log_extra", "log_metric", "environments")  # TRL passes these; alignkit does not
RUN_FACTS = ("completion_ids", "max_new_tokens")  # given to an alignkit-convention function that names them
PASSED_ARGS = ("prompts", "completions", *RUN_FACTS, "data_source", "solution_str", "ground_truth", "extra_info",
               *TRL_EXTRAS)  # never per-function options: alignkit (or TRL) passes these itself
DRY_RUN_COMPLETION = "The answer is 0."


class RewardFunctionError(ConfigError):
    """A reward function cannot be called, raised, or returned something that is not one reward per completion."""


def where_defined(fn: Callable) -> str:
    """``file:line`` of a function's definition (``module.qualname`` when the source is unknown)."""
    target = inspect.unwrap(fn)
    target = getattr(target, "__func__", target)
    if not inspect.isfunction(target) and not inspect.ismethod(target) and hasattr(target, "__call__"):
        target = getattr(type(target), "__call__", target)
    try:
        file = inspect.getsourcefile(target) or inspect.getfile(target)
        line = inspect.getsourcelines(target)[1]
        return f"{file}:{line}"
    except (TypeError, OSError):
        return qualified_name(fn)


def reward_style(fn: Callable) -> str:
    """``alignkit`` (registered), ``verl`` (has ``solution_str``) or ``trl`` (anything else)."""
    if is_registered(fn):
        return "alignkit"
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "trl"
    return "verl" if "solution_str" in params else "trl"


def _short(value: Any, width: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _user_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of the traceback outside alignkit (where the user's code raised)."""
    frames = traceback.extract_tb(exc.__traceback__)
    outside = [f for f in frames if "/alignkit/rewards/registry.py" not in f.filename.replace("\\", "/")]
    frame = (outside or frames or [None])[-1]
    return f"{frame.filename}:{frame.lineno}" if frame is not None else "?"


def _ground_truth(columns: dict[str, list], i: int) -> Any:
    """The reference a verl ``compute_score`` gets, read the way verl's reward managers read it."""
    reward_model = columns.get("reward_model")
    if reward_model is not None and isinstance(reward_model[i], dict) and "ground_truth" in reward_model[i]:
        return reward_model[i]["ground_truth"]
    if "ground_truth" in columns:
        return columns["ground_truth"][i]
    for key in ("answer", "label"):  # label: OpenRLHF's --label_key under data.columns=openrlhf
        if key in columns:
            from alignkit.rewards.answer import gold_answer

            value = columns[key][i]
            return gold_answer(value) if gold_answer(value) is not None else value
    raise KeyError("ground_truth")


class RewardFunction:
    """One reward function with its calling convention, its name and where it is defined."""

    def __init__(self, name: str, fn: Callable, options: dict[str, Any] | None = None,
                 max_new_tokens: int | None = None):
        self.name, self.fn, self.style = name, fn, reward_style(fn)
        self.where = where_defined(fn)
        try:
            self.params = dict(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            self.params = {}
        self.var_kw = any(p.kind is p.VAR_KEYWORD for p in self.params.values()) or not self.params
        self.options, self.max_new_tokens = dict(options or {}), max_new_tokens
        self._check_options()

    def _named(self, key: str) -> bool:
        """The function has a parameter ``key`` that can be given by keyword."""
        param = self.params.get(key)
        return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)

    def option_names(self) -> list[str] | None:
        """The knobs ``reward.options.<name>`` may set; ``None``: any (a TRL/verl function with ``**kwargs``)."""
        if self.style == "alignkit":
            return [k for k, p in self.params.items() if p.kind is p.KEYWORD_ONLY and k not in PASSED_ARGS]
        if self.var_kw:
            return None
        return [k for k in self.params if self._named(k) and k not in PASSED_ARGS]

    def _check_options(self) -> None:
        valid = self.option_names()
        bad = [k for k in self.options if k in PASSED_ARGS or (valid is not None and k not in valid)]
        if bad:
            raise ConfigError(
                f"reward.options.{self.name}: {self.label()} takes no option {', '.join(repr(k) for k in bad)}. "
                f"Its options: {', '.join(valid) if valid else 'none'}"
                f"{' (alignkit passes ' + ', '.join(PASSED_ARGS[:4]) + ' itself)' if valid is not None else ''}.")
        check = getattr(self.fn, "check_options", None)
        if callable(check):
            check(max_new_tokens=self.max_new_tokens, **self.options)

    def label(self) -> str:
        return f"reward function {self.name!r} ({self.where}, {self.style} convention)"

    # ------------------------------------------------------------ the calls of each convention

    def _accepts(self, key: str) -> bool:
        param = self.params.get(key)
        return self.var_kw or (param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY))

    def _required_missing(self, given: set[str]) -> list[str]:
        missing = []
        for key, p in self.params.items():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
                continue
            if p.kind is p.POSITIONAL_ONLY or key not in given:
                missing.append(key)
        return missing

    def _keyword_call(self, available: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        kwargs = {k: v for k, v in available.items() if self._accepts(k)}
        missing = self._required_missing(set(kwargs))
        if missing:
            extras = [m for m in missing if m in TRL_EXTRAS]
            hint = (f" alignkit does not provide TRL's {', '.join(extras)}: give it a default or take **kwargs."
                    if extras else "")
            raise RewardFunctionError(
                f"{self.label()} needs {', '.join(repr(m) for m in missing)}, which alignkit does not pass; it can be "
                f"given {', '.join(repr(k) for k in available)}.{hint}"
            )
        return kwargs, self.fn(**kwargs)

    def call(self, prompts: list[str], completions: list[str], columns: dict[str, list],
             raw_prompts: list[Any] | None, completion_ids: list[list[int]] | None) -> tuple[dict, Any]:
        """(what it was called with, what it returned) -- one batch, or one call per completion (verl)."""
        if self.style == "alignkit":
            given = {**columns, **self.options}
            if completion_ids is not None and self._named("completion_ids"):
                given["completion_ids"] = completion_ids
            if self.max_new_tokens is not None and self._named("max_new_tokens"):
                given["max_new_tokens"] = self.max_new_tokens
            return {"prompts": prompts, "completions": completions, **given}, self.fn(prompts, completions, **given)
        if self.style == "trl":
            given_prompts = raw_prompts if raw_prompts is not None else prompts
            conversational = [isinstance(p, list) for p in given_prompts]
            shown = [[{"role": "assistant", "content": c}] if conv else c
                     for c, conv in zip(completions, conversational)]
            available = {"prompts": list(given_prompts), "completions": shown, **columns, **self.options}
            if completion_ids is not None:
                available["completion_ids"] = completion_ids
            return self._keyword_call(available)
        results, first = [], None
        for i, text in enumerate(completions):
            try:
                truth = _ground_truth(columns, i)
            except KeyError:
                raise RewardFunctionError(
                    f"{self.label()} needs a ground truth: a verl-style 'reward_model' column with 'ground_truth' "
                    f"(as in verl's parquet files), a 'ground_truth' column or an 'answer' column; the record's "
                    f"columns are {sorted(columns) or 'none'}."
                ) from None
            extra = columns.get("extra_info", [None] * len(completions))[i]
            available = {"data_source": columns.get("data_source", [None] * len(completions))[i],
                         "solution_str": text, "ground_truth": truth, "extra_info": extra if extra is not None else {},
                         **self.options}
            kwargs, value = self._keyword_call(available)
            first = kwargs if first is None else first
            if isinstance(value, dict):
                if "score" not in value:
                    raise RewardFunctionError(f"{self.label()} returned a dict without 'score' ({_short(value)}); "
                                              "verl's convention is a number or a dict with 'score'.")
                value = value["score"]
            results.append(value)
        return first or {}, results

    def __call__(self, prompts, completions, columns, raw_prompts=None, completion_ids=None) -> list[float]:
        """Rewards of one batch, NaN where the function returned ``None``; errors name the function."""
        called: dict = {}
        try:
            called, result = self.call(prompts, completions, columns, raw_prompts, completion_ids)
            if inspect.isawaitable(result):
                result = asyncio.run(result)
        except UserError:  # already says what is wrong (a built-in's DataError names the missing column)
            raise
        except Exception as exc:  # the user's code failed: say which function, on what, and where it raised
            shown = called or {"prompts": list(raw_prompts if self.style == "trl" and raw_prompts is not None
                                                  else prompts)[:1],
                               "completions": completions[:1]}  # the prompt as the function got it
            args = ", ".join(f"{k}={_short(v[:1] if isinstance(v, list) else v, 100)}" for k, v in shown.items())
            raise RewardFunctionError(
                f"{self.label()} raised {type(exc).__name__}: {exc} (at {_user_frame(exc)}), when called with "
                f"{len(completions)} completion(s), the first being: {args}"
            ) from exc
        return self._check(result, len(completions))

    def _check(self, result: Any, n: int) -> list[float]:
        if isinstance(result, (str, bytes, dict)) or not hasattr(result, "__iter__"):
            raise RewardFunctionError(f"{self.label()} must return a list of numbers (or None); it returned "
                                      f"{_short(result, 200)}")
        values = []
        for v in result:
            if v is None:
                values.append(math.nan)
                continue
            try:
                number = float(v)
            except (TypeError, ValueError):
                if self.style == "verl":  # one call per completion: the value is what compute_score returned
                    raise RewardFunctionError(f"{self.label()} must return a number or a dict with a numeric 'score' "
                                              f"(verl's convention); it returned {_short(v, 200)}") from None
                raise RewardFunctionError(f"{self.label()} must return a list of numbers (or None); it returned "
                                          f"{_short(list(result), 200)}") from None
            if not math.isfinite(number):
                raise RewardFunctionError(f"{self.label()} returned a non-finite reward ({number}); return finite "
                                          "floats, or None where the function does not apply")
            values.append(number)
        if len(values) != n:
            raise RewardFunctionError(f"{self.label()} returned {len(values)} values for {n} completions; return "
                                      "one reward per completion")
        return values


class MixedRewards(NamedTuple):
    total: list[float]  # weighted sum per completion (NaN parts skipped)
    per_function: dict[str, list[float]]  # unweighted rewards per function short name, NaN = not applicable


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def config_options(cfg: Any) -> dict[str, Any]:
    """The config's ``reward.options`` node as a plain dict (``{}`` when unset)."""
    return dict(_plain(cfg.reward.get("options")) or {})


class RewardMix:
    """A weighted sum of reward functions; ``weights`` default to 1.0 each; ``options`` per function short name."""

    def __init__(self, names: Sequence[str], weights: Sequence[float] | None = None,
                 options: Mapping[str, Mapping[str, Any]] | None = None, max_new_tokens: int | None = None):
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
        options = dict(options or {})
        stray = sorted(str(k) for k in options if k not in keys)
        if stray:
            raise ConfigError(f"reward.options has options for {', '.join(repr(k) for k in stray)}, which "
                              f"{'is' if len(stray) == 1 else 'are'} not in reward.fns {keys}: key each function's "
                              "options by its name in reward.fns (a dotted path by its function name).")
        for key, value in options.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"reward.options.{key}={_short(value)} must be a mapping of knob: value "
                                  f"(e.g. reward.options.{key}.<knob>=...).")
        self.names = keys
        self.weights = weights
        self.fns = [resolve_reward(n) for n in names]
        self.functions = [RewardFunction(k, fn, dict(options.get(k) or {}), max_new_tokens)
                          for k, fn in zip(keys, self.fns)]
        self.unscored = 0  # completions no function applied to (all returned None)
        self._quiet = False

    @classmethod
    def from_config(cls, cfg: Any, names: list[str] | None = None) -> "RewardMix":
        """The mix of a run config: ``reward.fns``, ``reward.weights``, ``reward.options`` and
        ``generation.max_new_tokens`` (what ``max_new_tokens``-taking functions such as ``overlong`` get).

        ``names``: a subset of functions instead of ``reward.fns`` (``alignkit eval`` scores the ones
        that fit its data), each weight 1 and with its own options only."""
        reward, generation = cfg.reward, cfg.get("generation")
        limit = None if generation is None else generation.get("max_new_tokens")
        options = config_options(cfg)
        if names is None:
            names, weights = [str(n) for n in reward.fns], list(_plain(reward.get("weights")) or []) or None
        else:
            keys = {short_name(n) for n in names}
            names, weights, options = list(names), None, {k: v for k, v in options.items() if k in keys}
        return cls(names, weights, options=options, max_new_tokens=None if limit is None else int(limit))

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> MixedRewards:
        """Rewards of a batch. ``columns`` may carry ``prompt`` (the records' prompts as the data has them,
        for TRL-style functions) and ``completion_ids``; every other column goes to every function."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        columns = dict(columns)
        raw_prompts = columns.pop("prompt", None)
        completion_ids = columns.pop("completion_ids", None)
        per_function = {f.name: f(prompts, completions, columns, raw_prompts, completion_ids) for f in self.functions}
        total, unscored = [], 0
        for i in range(len(completions)):
            parts = [(w, per_function[name][i]) for name, w in zip(self.names, self.weights)]
            applicable = [(w, r) for w, r in parts if not math.isnan(r)]
            unscored += not applicable
            total.append(sum(w * r for w, r in applicable))
        if unscored and not self.unscored and not self._quiet:
            print(f"alignkit: {unscored} of {len(completions)} completions got None from every reward function "
                  f"({', '.join(self.names)}); they score 0 (said once; RewardMix.unscored counts them all)",
                  file=sys.stderr)
        self.unscored += 0 if self._quiet else unscored
        return MixedRewards(total, per_function)

    def dry_run(self, prompt: str, columns: dict[str, Any], raw_prompt: Any = None,
                completion: str = DRY_RUN_COMPLETION, completion_ids: list[int] | None = None) -> MixedRewards:
        """Call every function once on one record (before any model loads); errors say it was the dry call."""
        batch = {k: [v] for k, v in columns.items()}
        if raw_prompt is not None:
            batch["prompt"] = [raw_prompt]
        if completion_ids is not None:
            batch["completion_ids"] = [list(completion_ids)]
        self._quiet = True
        try:
            return self([prompt or ""], [completion], **batch)
        except RewardFunctionError as exc:
            raise RewardFunctionError(
                f"{exc} [dry call on the first prompt record, with the completion {completion!r}, before any model "
                "loads]"
            ) from None
        finally:
            self._quiet = False

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}*{n}" for n, w in zip(self.names, self.weights))
        return f"RewardMix({terms})"
