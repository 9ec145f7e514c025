"""Sampling from the reference, or from a geometric mixture of policy and reference, with the HF engine.

``GeometricMixture(policy, reference, coef)`` looks to ``HFGenerationEngine`` like one causal LM:
each forward runs both models (each with its own KV cache, held together in a ``PairCache``) and
returns the next-token logits ``(1 - coef) * policy_logits + coef * reference_logits``, so the
sampled distribution is ``softmax`` of that, i.e. ``pi^(1-coef) * ref^coef`` renormalised per token
(the log-softmax constants cancel): TRL's ``GeometricMixtureWrapper``, which returns the
log-softmax of the same sum (an equal distribution). Temperature, top-k and top-p then apply to the
mixed logits, as TRL's ``generate`` applies them. ``coef=0`` runs the policy alone and ``coef=1``
the reference alone (the other forward is skipped, so ``coef=1`` is XPO's reference sampler and
``coef=0`` samples exactly what the policy's own engine samples with the same seed).

The reference may be the policy itself with its LoRA adapter disabled: ``reference_context`` is
entered around every reference forward (``ModuleReference.context``). The reference stays in eval
mode; ``train(mode)`` sets only the policy's mode. ``Rollout.logprobs`` of these samples are the
mixture's log-probs (not the policy's). Left out: vLLM (one model per engine there; the runners
that use this refuse ``generation.engine=vllm`` at compose time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

# seed offset of a runner's second sampler, so its samples differ from the policy's: 2**31, since the CPU
# generator (mt19937) keeps only the low 32 bits of a seed (2**40 would be the same seed)
OTHER_SAMPLER_SEED = 1 << 31


@dataclass
class MixtureOutput:
    logits: torch.Tensor
    past_key_values: Any = None


class PairCache:
    """The two models' KV caches; the engine's batch operations apply to both."""

    def __init__(self, policy: Any, reference: Any):
        self.caches = (policy, reference)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.caches:
            if cache is not None:
                cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for cache in self.caches:
            if cache is not None:
                cache.batch_select_indices(indices)


class GeometricMixture:
    """A causal LM whose logits are ``(1 - coef) * policy + coef * reference``; see the module docstring."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module, coef: float,
                 reference_context: Callable[[], Any] = contextlib.nullcontext):
        if not 0.0 <= coef <= 1.0:
            raise ValueError(f"mixture coefficient must lie in [0, 1], got {coef}")
        self.policy, self.reference, self.coef = policy, reference, float(coef)
        self.reference_context = reference_context
        self.config = getattr(policy, "config", None)
        self.generation_config = getattr(policy, "generation_config", None)

    @property
    def training(self) -> bool:
        return self.policy.training

    def eval(self) -> "GeometricMixture":
        self.policy.eval()
        self.reference.eval()
        return self

    def train(self, mode: bool = True) -> "GeometricMixture":
        self.policy.train(mode)  # the reference stays in eval mode
        return self

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        seen = set()
        for model in (self.policy, self.reference):
            for p in model.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def __call__(self, *, past_key_values: PairCache | None = None, **kwargs: Any) -> MixtureOutput:
        policy_cache, reference_cache = past_key_values.caches if past_key_values is not None else (None, None)
        logits = None
        if self.coef < 1.0:
            out = self.policy(**kwargs, **_cache(policy_cache))
            policy_cache, logits = out.past_key_values, out.logits.float()
            if self.coef > 0.0:
                logits = (1.0 - self.coef) * logits
        if self.coef > 0.0:
            with self.reference_context():
                out = self.reference(**kwargs, **_cache(reference_cache))
            reference_cache, ref_logits = out.past_key_values, out.logits.float()
            logits = ref_logits if logits is None else logits + self.coef * ref_logits
        cache = PairCache(policy_cache, reference_cache) if kwargs.get("use_cache") else None
        return MixtureOutput(logits=logits, past_key_values=cache)


def _cache(cache: Any) -> dict[str, Any]:
    """The cache argument as the engine passes it: only when there is one (the prefill passes none)."""
    return {} if cache is None else {"past_key_values": cache}


def mixture_engine(policy: Any, reference: Any, tokenizer: Any, coef: float) -> Any:
    """An ``HFGenerationEngine`` sampling from ``GeometricMixture`` of the policy engine's transformers
    model and a ``ModuleReference``'s (a frozen copy, or the policy with its adapter disabled)."""
    from alignkit.rl.generation import HFGenerationEngine
    from alignkit.trainers.common import hf_model

    mixed = GeometricMixture(hf_model(policy), hf_model(reference.module), coef, reference.context)
    return HFGenerationEngine(mixed, tokenizer)
