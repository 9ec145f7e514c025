"""The loss registry: every objective is a pure function registered by name.

A loss is ``fn(inputs, **hyper_parameters) -> (loss, metrics)`` where ``inputs`` is a
``SequenceLogps`` (offline views: sft, pairwise, unpaired, listwise) or a ``RolloutLogps``
(online RL), the hyper-parameters are keyword-only with defaults, ``loss`` is a scalar tensor and
``metrics`` maps metric names (see docs/DESIGN.md "Names") to detached scalar tensors.

``register_loss`` records, next to the function, what the trainer must provide:

* ``view``: which data the loss consumes: ``"sft"``, ``"pairwise"`` (K=2, slot 0 chosen, slot 1
  rejected), ``"unpaired"`` (K=1 with a label), ``"listwise"`` (K>=2 with scores), ``"scalar"`` (K=1
  with a scalar reward in ``scores`` and the value of its prompt in ``values``: DRO), ``"rollout"`` or
  ``"distill"`` (student and teacher logits at completion tokens, ``losses.distill.DistillLogits``: GKD) or
  ``"stepwise"`` (a process reward model's 2-class logits at each labelled step, ``losses.process.StepLogits``);
* ``runner``: the training loop that trains it (a name of ``alignkit.losses.runners.RUNNERS``);
  default: the view's (``VIEW_RUNNERS``: sft -> sft, pairwise/unpaired/listwise -> preference,
  scalar -> dro, stepwise -> prm);
  a rollout loss must name it (``grpo``, ``ppo``);
* ``needs_reference``: whether ``ref_logps`` must be filled (a reference model or a cache);
* ``needs_token_logps``: whether the per-token tensors must be filled (WPO, LD-DPO, ...);
* ``needs_kl_pairs``: whether ``kl_logps``/``ref_kl_logps`` (mismatched prompt/completion pairs,
  KTO's batch KL estimate) must be filled;
* ``needs_token_kl``: whether ``seq_kl`` must be filled: per completion, the sum over its target
  positions of the full-vocabulary KL(pi_ref(.|prefix) || pi_theta(.|prefix)), with gradient
  through the policy (TDPO). Only a live reference (``separate``, ``lora``) can give it: the
  preference runner computes it chunk by chunk inside the policy's LM-head pass
  (``models.logprobs.ReferenceHead``); a cache of sequence totals (``precomputed``) cannot, which
  ``config.validate`` refuses at compose time.

``needs_reference`` and ``needs_token_logps`` are a bool or, where the answer depends on the
hyper-parameters, a function of them (``{name: value}``, the defaults filled in): GRPO needs a
reference only with a KL term (``beta != 0``), the DPO family per-token tensors only for WPO
(``use_weighting``) or LD-DPO (``ld_alpha``). Ask ``spec.reference_needed(hparams)`` /
``spec.token_logps_needed(hparams)``; ``combine.WeightedLoss`` asks every part.

Hyper-parameter names are read from the signature, so unknown keys in a config are rejected at
compose time (``check_hparams``). Users may register their own loss from a dotted path
(``resolve_loss("mypkg.losses:my_loss")``): the function may carry a ``loss_spec`` attribute set by
``register_loss``; otherwise it is treated as a pairwise loss that needs a reference.

This module holds the contract only; the loss families live in sibling modules, which are imported
by ``alignkit.losses`` so that importing the package registers them all.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from alignkit.errors import ConfigError
from alignkit.losses.runners import RUNNERS, VIEW_RUNNERS

VIEWS = ("sft", "pairwise", "unpaired", "listwise", "scalar", "rollout", "distill", "stepwise")


@dataclass
class SequenceLogps:
    """Per-sequence log-probs of a batch of groups, shaped [G, K] (K completions per prompt)."""

    logps: torch.Tensor  # [G, K] summed policy log-probs of each completion's target tokens
    lengths: torch.Tensor  # [G, K] number of target tokens (float)
    mask: torch.Tensor  # [G, K] bool, True where the completion exists
    ref_logps: torch.Tensor | None = None  # [G, K] reference log-probs (no grad)
    scores: torch.Tensor | None = None  # [G, K] per-completion scores (listwise) / margins
    labels: torch.Tensor | None = None  # [G, K] 1.0 desirable, 0.0 undesirable (unpaired)
    token_logps: torch.Tensor | None = None  # [G, K, T] per-token policy log-probs, 0 where masked
    ref_token_logps: torch.Tensor | None = None  # [G, K, T]
    token_mask: torch.Tensor | None = None  # [G, K, T] bool
    token_log_sq_mass: torch.Tensor | None = None  # [G, K, T] log sum_v p(v)^2 per position (WPO weights)
    kl_logps: torch.Tensor | None = None  # [G] policy log-probs of mismatched (prompt, completion) pairs
    ref_kl_logps: torch.Tensor | None = None  # [G]
    from_reference: torch.Tensor | None = None  # [G, K] bool: sampled from the reference model (XPO's exploration term)
    seq_kl: torch.Tensor | None = None  # [G, K] sum_t KL(pi_ref || pi_theta) over each completion's targets (grad)
    values: torch.Tensor | None = None  # [G, K] a value model's V(x) of each group's prompt (view "scalar", DRO)


@dataclass
class RolloutLogps:
    """Token-level tensors of a batch of sampled completions, shaped [S, T] (S = sequences)."""

    logps: torch.Tensor  # [S, T] current policy log-probs of the sampled tokens
    old_logps: torch.Tensor  # [S, T] log-probs under the sampling policy (no grad)
    advantages: torch.Tensor  # [S, T] (sequence-level advantages broadcast over tokens)
    mask: torch.Tensor  # [S, T] bool, True on completion tokens
    ref_logps: torch.Tensor | None = None  # [S, T] reference log-probs, when a KL term is used
    values: torch.Tensor | None = None  # [S, T] critic values (PPO value loss)
    old_values: torch.Tensor | None = None  # [S, T]
    returns: torch.Tensor | None = None  # [S, T]
    group_index: torch.Tensor | None = None  # [S] prompt group of each sequence


# a need that is fixed (bool) or depends on the hyper-parameter values (a function of them)
Need = Union[bool, Callable[[dict[str, Any]], bool]]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    view: str
    needs_reference: Need
    needs_token_logps: Need = False
    needs_kl_pairs: bool = False
    needs_token_kl: bool = False
    description: str = ""
    runner: str = ""  # "" = the view's default runner (VIEW_RUNNERS)

    def __post_init__(self) -> None:
        if not self.runner:
            object.__setattr__(self, "runner", VIEW_RUNNERS.get(self.view, ""))
        if self.runner not in RUNNERS:
            raise ValueError(f"loss {self.name!r}: runner must be one of {tuple(RUNNERS)}, got {self.runner!r}"
                             + (" (a rollout loss names its runner)" if self.view == "rollout" else ""))

    def reference_needed(self, hparams: dict[str, Any] | None = None) -> bool:
        """Whether the loss reads ``ref_logps`` with these hyper-parameter values (defaults filled in)."""
        return self._need(self.needs_reference, hparams)

    def token_logps_needed(self, hparams: dict[str, Any] | None = None) -> bool:
        """Whether the loss reads the per-token tensors with these hyper-parameter values."""
        return self._need(self.needs_token_logps, hparams)

    def _need(self, need: Need, hparams: dict[str, Any] | None) -> bool:
        if not callable(need):
            return bool(need)
        defaults = {k: v for k, v in self.hparams().items() if v is not inspect.Parameter.empty}
        return bool(need({**defaults, **(hparams or {})}))

    def hparams(self) -> dict[str, Any]:
        """Keyword-only hyper-parameters with their defaults."""
        sig = inspect.signature(self.fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str | None = None,
    *,
    view: str,
    needs_reference: Need,
    needs_token_logps: Need = False,
    needs_kl_pairs: bool = False,
    needs_token_kl: bool = False,
    runner: str | None = None,
):
    """Decorator: register ``fn`` under ``name`` (default: the function's name); ``runner``
    defaults to the view's (a rollout loss must name it)."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")

    def wrap(fn):
        key = name or fn.__name__
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        spec = LossSpec(
            name=key,
            fn=fn,
            view=view,
            needs_reference=needs_reference,
            needs_token_logps=needs_token_logps,
            needs_kl_pairs=needs_kl_pairs,
            needs_token_kl=needs_token_kl,
            description=doc[0] if doc else "",
            runner=runner or "",
        )
        if key in _REGISTRY and _REGISTRY[key].fn is not fn:
            raise ValueError(f"loss {key!r} is registered twice")
        _REGISTRY[key] = spec
        fn.loss_spec = spec
        return fn

    return wrap


def available_losses() -> dict[str, LossSpec]:
    import alignkit.losses  # noqa: F401  (registers the built-in families)

    return dict(sorted(_REGISTRY.items()))


def resolve_loss(name: str) -> LossSpec:
    """A registered name, or a dotted path ``pkg.module:function`` / ``pkg.module.function``."""
    losses = available_losses()
    if name in losses:
        return losses[name]
    if "." in name or ":" in name:
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"loss {name!r}: cannot import {attr!r} from module {module_name!r} ({exc}). "
                "Give a registered loss name or an importable 'package.module:function'."
            ) from None
        spec = getattr(fn, "loss_spec", None)
        return spec or LossSpec(name=name, fn=fn, view="pairwise", needs_reference=True)
    raise ConfigError(
        f"unknown loss {name!r}. Valid choices: {', '.join(losses)} "
        "(or a dotted path 'package.module:function')."
    )


def check_hparams(spec: LossSpec, given: dict[str, Any]) -> None:
    """Reject hyper-parameters the loss does not take, listing the valid ones."""
    valid = spec.hparams()
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(
            f"loss {spec.name!r} takes no hyper-parameter {', '.join(map(repr, unknown))}. "
            f"Valid: {', '.join(valid) or '(none)'}."
        )
