"""Sampling completions from the policy for online RL: a ``GenerationEngine`` protocol and its
Hugging Face implementation.

``HFGenerationEngine(model, tokenizer).generate(prompts, num_samples=G, max_new_tokens=..., ...)``
takes token-id prompts and returns one ``Rollout`` per (prompt, sample), ordered prompt-major
(``prompt_index``, then ``sample_index``). What it does:

* batches all prompts, left-padded to the longest, with explicit ``position_ids`` (so padding does
  not shift positions) and a KV cache (``DynamicCache``);
* prefills each prompt ONCE and repeats its KV cache G times (``Cache.batch_repeat_interleave``)
  before decoding the G samples (``share_prompt_prefill=False`` prefills every sample separately,
  for comparison);
* samples with temperature / top-k / top-p (in that order, as ``transformers``), or greedily when
  ``temperature == 0``; ``seed`` fixes a private ``torch.Generator`` (same seed, same prompts, same
  model -> same output); ``seed=None`` uses torch's global RNG;
* stops each sequence at its first EOS (kept as the last completion token, ``finished=True``) or
  after ``max_new_tokens`` (``finished=False``); finished rows are dropped from the batch and the
  cache (``Cache.batch_select_indices``), so long stragglers do not pay for short ones.

``Rollout.logprobs[j]`` is ``log pi(completion_ids[j] | prompt, completion_ids[:j])`` under the
*raw model distribution at temperature 1* — the policy's own log-prob — not under the tempered or
top-k/top-p-truncated distribution the token was drawn from. With temperature 1 and no truncation
the two coincide. These are computed in the generation pass (left padding, incremental KV cache),
so they match a fresh full forward pass only up to float error (5e-7 on the tiny test model in fp32
on CPU, checked to 1e-4 in the tests; more in bf16); a trainer that needs ``ratio == 1`` exactly
at μ=1 uses ``logps.detach()`` as ``old_logps``.

DeepSpeed ZeRO-3: when the parameters are partitioned (``hasattr(p, "ds_id")``), generation runs
inside ``deepspeed.zero.GatheredParameters(list(model.parameters()))``, which materialises the FULL
model on every rank for the whole call (fine for small models; a large one wants vLLM). ZeRO-3's
forward hooks still release and re-gather each submodule's parameters around its forward even
inside that context (checked on DeepSpeed 0.19.8: without the measure below, a rank that stopped
decoding early left the other in a mismatched collective), so every rank must run the same number
of forwards: when ``torch.distributed`` runs several ranks and the model is partitioned, the ranks
agree each step (an all-reduce of "still decoding") and a rank that is done runs one-token dummy
forwards until all are (what ``transformers``' ``synced_gpus`` does). Every rank must call
``generate`` the same number of times. The per-token re-gather costs time; removing the ZeRO-3
hooks during generation (as TRL does) would avoid it but relies on DeepSpeed internals, so it is
not done here. A ``DeepSpeedEngine`` may be passed; its ``.module`` is used.

The model may be any ``transformers`` causal LM (or a ``peft`` model wrapping one) that accepts
``attention_mask``, ``position_ids``, ``past_key_values``, ``use_cache`` and ``logits_to_keep``.

The seam: ``generation.engine`` (the one ``GenerationConfig``, in ``alignkit.config.schema``)
picks the class with this ``generate`` signature in ``engine_for_run``: ``hf`` (this module) or
``vllm`` (``alignkit.rl.vllm_engine.VLLMGenerationEngine``: colocated vLLM with the trained weights
pushed in; an optional extra, checked at compose time by ``check_engine``).

Deliberately left out: stop strings, repetition penalties, beam search, and chunking of very large
batches (the caller passes chunks).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from alignkit.errors import ConfigError

ENGINES = ("hf", "vllm")


@dataclass
class Rollout:
    """One sampled completion of prompt ``prompt_index`` (its ``sample_index``-th sample)."""

    prompt_index: int
    sample_index: int
    completion_ids: list[int]  # stops at and includes the first EOS
    logprobs: list[float]  # policy log-prob (temperature 1, no truncation) of each completion token
    finished: bool  # True if it ended with EOS, False if it hit max_new_tokens


class GenerationEngine(Protocol):
    """Anything that samples ``num_samples`` completions for each token-id prompt."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        num_samples: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[Rollout]: ...


def check_sampling_args(
    num_samples: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int
) -> None:
    problems = []
    if num_samples < 1:
        problems.append(f"num_samples must be >= 1 (got {num_samples})")
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        problems.append(f"temperature must be >= 0, 0 meaning greedy (got {temperature})")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1], 1 meaning off (got {top_p})")
    if top_k < 0:
        problems.append(f"top_k must be >= 0, 0 meaning off (got {top_k})")
    if problems:
        raise ConfigError("generation settings: " + "; ".join(problems) + ".")


def engine_for_run(gen: Any, policy: Any, tokenizer: Any, *, max_prompt_length: int, seed: int) -> GenerationEngine:
    """The generation engine of an online runner, as ``gen`` (the run's typed ``GenerationConfig``,
    checked at compose time) names it, over the policy: a DeepSpeed engine wrapping a
    ``TargetLogProbs``-style module (its ``.model`` is sampled from). The vLLM engine is told by the
    DeepSpeed engine when an optimizer step happened; it sizes its context as ``max_prompt_length``
    + ``gen.max_new_tokens`` and seeds its sampler with ``seed``."""
    module = getattr(policy, "module", policy)
    model = getattr(module, "model", module)
    if gen.engine != "vllm":
        # auto falls back to transformers' forward (and says so); an explicit bf16 fails
        engine = HFGenerationEngine(model, tokenizer, decode_dtype=decode_dtype_for(gen.decode_dtype, policy),
                                    strict_decode_dtype=gen.decode_dtype != "auto")
        if int(os.environ.get("RANK", "0")) == 0:
            from alignkit.trainers.common import console

            console.print(f"  generation: {engine.decoder}", highlight=False)
        return engine
    from alignkit.rl.vllm_engine import VLLMGenerationEngine

    return VLLMGenerationEngine(
        model,
        eos_token_id=HFGenerationEngine(model, tokenizer).eos_token_ids,
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        max_model_len=max_prompt_length + gen.max_new_tokens,  # prompt + completion tokens
        trainer_engine=policy,
        gpu_memory_utilization=gen.vllm_gpu_memory_utilization,
        cpu_kv_cache_gib=gen.vllm_cpu_kv_cache_gib,
        seed=seed,
    )


DECODE_DTYPES = ("auto", "fp32", "bf16")


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def decode_dtype_for(choice: str, policy: Any) -> torch.dtype | None:
    """The matmul precision ``generation.decode_dtype`` asks of the HF engine (None: the weights').

    ``auto``: bf16 when the policy's engine computes its forward under bf16 autocast
    (``deepspeed.dtype=bf16_autocast``: sampling then uses the training forward's matmul precision),
    else the weights' own; ``bf16``: bf16 matmuls on any fp32 policy (faster decoding on a CPU, where
    a few-row decode step is bound by reading the weights: ``scripts/bench_decode.py``); ``fp32``:
    the weights' own (transformers' forward)."""
    if choice not in DECODE_DTYPES:
        raise ConfigError(f"generation.decode_dtype={choice!r}: expected one of {', '.join(DECODE_DTYPES)}.")
    if choice == "bf16":
        return torch.bfloat16
    if choice == "auto":
        enabled = getattr(policy, "torch_autocast_enabled", None)
        if callable(enabled) and enabled() and policy.torch_autocast_dtype() == torch.bfloat16:
            return torch.bfloat16
    return None


def check_engine(cfg: DictConfig) -> None:
    """Compose-time checks of ``generation.engine`` (the vLLM one: installed, fits, one node)."""
    engine = cfg.generation.get("engine", "hf")  # a composed config is typed by the schema
    if engine not in ENGINES:
        raise ConfigError(f"generation.engine={engine!r} is not valid. Valid choices: {', '.join(ENGINES)}.")
    decode = cfg.generation.get("decode_dtype", "auto")
    if decode not in DECODE_DTYPES:
        raise ConfigError(f"generation.decode_dtype={decode!r} is not valid. Valid choices: {', '.join(DECODE_DTYPES)}.")
    if engine != "vllm":
        return
    if decode == "bf16":
        raise ConfigError("generation.decode_dtype=bf16 is the hf engine's (alignkit's lean decoder); vLLM decodes in "
                          "its own dtype: drop generation.decode_dtype or use generation.engine=hf.")
    if cfg.launcher.nnodes != 1:
        raise ConfigError(f"generation.engine=vllm runs on one node for now (launcher.nnodes={cfg.launcher.nnodes}): "
                          "each process starts its own colocated vLLM engine, tested with several processes on one "
                          "node only; use generation.engine=hf across nodes.")
    from alignkit.rl.vllm_engine import check_vllm_available

    check_vllm_available()


# ----------------------------------------------------------------------------- sampling


def sample_next_token(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Token ids ``[B]`` drawn from ``logits [B, V]`` after temperature, top-k, top-p; argmax if temperature 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        drop_sorted = mass_before >= top_p  # never drops the first (mass_before 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- the HF engine


def _unwrap_deepspeed(model):
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine):
        return model.module
    return model


def _is_zero3_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def _generation_mode(model) -> Iterator[None]:
    """no_grad, eval mode (restored after), and ZeRO-3 parameters gathered when partitioned."""
    was_training = model.training
    gathered = contextlib.nullcontext()
    if _is_zero3_partitioned(model):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    model.eval()
    try:
        with torch.no_grad(), gathered:
            yield
    finally:
        model.train(was_training)


def _as_id_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` ``[B, L]`` for left-padded prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class HFGenerationEngine:
    """Batched KV-cache sampling with a ``transformers`` causal LM; see the module docstring.

    Token ids: ``eos_token_id`` (an int or a list: any of them stops a sequence) and ``pad_token_id``
    are taken from the arguments, else from ``tokenizer``, else from ``model.generation_config`` /
    ``model.config``; pad falls back to the first EOS id.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        share_prompt_prefill: bool = True,
        decode_dtype: torch.dtype | None = None,
        strict_decode_dtype: bool = True,
    ) -> None:
        self.model = model
        self.share_prompt_prefill = share_prompt_prefill
        inner = _unwrap_deepspeed(model)
        weights = next(inner.parameters()).dtype
        self.decode_dtype = decode_dtype if decode_dtype not in (None, weights) else None
        self.fallback = ""
        if self.decode_dtype is not None:
            from alignkit.rl.lean_decode import lean_decoder_for

            able, why = lean_decoder_for(inner)
            if not able and not strict_decode_dtype:  # auto: transformers' forward, the reason printed with it
                self.decode_dtype, self.fallback = None, f" (decode_dtype=auto: no bf16 lean decoder for {why})"
            elif not able:
                raise ConfigError(f"generation.decode_dtype={_dtype_name(decode_dtype)} decodes with alignkit's lean "
                                  f"decoder, which cannot run this model: {why}. Use generation.decode_dtype=auto "
                                  f"(the weights' precision, {_dtype_name(weights)}).")
        #: which forward decodes, in which precision (printed by the online runners)
        self.decoder = (f"lean static-cache decoder, {_dtype_name(self.decode_dtype)} matmuls on "
                        f"{_dtype_name(weights)} weights" if self.decode_dtype is not None
                        else f"transformers forward, {_dtype_name(weights)}{self.fallback}")
        sources = [tokenizer, getattr(inner, "generation_config", None), getattr(inner, "config", None)]
        if eos_token_id is None:
            eos_token_id = next(
                (s.eos_token_id for s in sources if getattr(s, "eos_token_id", None) is not None),
                None,
            )
        if pad_token_id is None:
            pad_token_id = next(
                (s.pad_token_id for s in sources if getattr(s, "pad_token_id", None) is not None),
                None,
            )
        self.eos_token_ids = _as_id_list(eos_token_id)
        if not self.eos_token_ids:
            raise ValueError("HFGenerationEngine needs an eos_token_id (argument, tokenizer or model config)")
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else self.eos_token_ids[0]

    def _prefill(self, model, prompts, num_samples: int, device):
        """Run the prompts once; return the KV cache, last logits ``[N, V]``, attention mask ``[N, L]``
        and next position ids ``[N, 1]`` for the N = len(prompts) * num_samples rows (prompt-major)."""
        repeats = num_samples if self.share_prompt_prefill else 1
        prefill_prompts = (
            prompts if self.share_prompt_prefill else [p for p in prompts for _ in range(num_samples)]
        )
        ids, attention, positions = left_pad(prefill_prompts, self.pad_token_id, device)
        out = model(
            input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
        next_position = positions[:, -1:] + 1
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits, attention, next_position = (
                x.repeat_interleave(repeats, dim=0) for x in (logits, attention, next_position)
            )
        return cache, logits, attention, next_position

    @torch.no_grad()
    def next_token_logits(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[len(prompts), V]`` float32: the model's next-token logits after each prompt (one prefill, no
        sampling; the LLM judge of ``alignkit/rl/judges.py`` reads its answer tokens from them)."""
        model = _unwrap_deepspeed(self.model)
        device = next(model.parameters()).device
        with _generation_mode(model):
            _, logits, _, _ = self._prefill(model, prompts, 1, device)
        return logits

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        num_samples: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> list[Rollout]:
        check_sampling_args(num_samples, max_new_tokens, temperature, top_p, top_k)
        model = _unwrap_deepspeed(self.model)
        device = next(model.parameters()).device
        synced = _synced_ranks(model)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        n_rows = len(prompts) * num_samples
        tokens: list[list[int]] = [[] for _ in range(n_rows)]
        logprobs: list[list[float]] = [[] for _ in range(n_rows)]
        finished = [False] * n_rows
        eos = torch.tensor(self.eos_token_ids, device=device)

        with _generation_mode(model):
            lean = None
            if self.decode_dtype is not None:
                from alignkit.rl.lean_decode import LeanDecoder

                lean = LeanDecoder(model, pad_token_id=self.pad_token_id, max_new_tokens=max_new_tokens,
                                   compute_dtype=self.decode_dtype)
                rows = prompts if self.share_prompt_prefill else [p for p in prompts for _ in range(num_samples)]
                logits = lean.prefill(rows, num_samples if self.share_prompt_prefill else 1, device)
            else:
                cache, logits, attention, next_position = self._prefill(model, prompts, num_samples, device)
            active = torch.arange(n_rows, device=device)  # rows of the output still decoding

            # the loop runs until every rank is done (only this rank's condition without synced ranks)
            step = 0
            while True:
                if active.numel() and step < max_new_tokens:
                    token = sample_next_token(
                        logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                    )
                    token_logprob = logits.log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1)
                    done = torch.isin(token, eos)
                    for row, tok, lp, stop in zip(
                        active.tolist(), token.tolist(), token_logprob.tolist(), done.tolist()
                    ):
                        tokens[row].append(tok)
                        logprobs[row].append(lp)
                        finished[row] = stop
                    if bool(done.any()):
                        keep = (~done).nonzero().flatten()
                        active, token = active[keep], token[keep]
                        if lean is not None:
                            lean.select(keep)
                        else:
                            cache.batch_select_indices(keep)
                            attention, next_position = attention[keep], next_position[keep]
                step += 1
                local_more = active.numel() > 0 and step < max_new_tokens
                if not _any_rank(local_more, synced, device):
                    break
                if not local_more:  # this rank is done; keep ZeRO-3's collectives in step with the others
                    model(input_ids=torch.full((1, 1), self.pad_token_id, device=device), use_cache=False)
                    continue
                if lean is not None:
                    logits = lean.step(token)
                    continue
                attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=-1)
                out = model(
                    input_ids=token[:, None],
                    attention_mask=attention,
                    position_ids=next_position,
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, logits = out.past_key_values, out.logits[:, -1, :].float()
                next_position = next_position + 1
            if lean is not None:
                lean.close()

        return [
            Rollout(
                prompt_index=row // num_samples,
                sample_index=row % num_samples,
                completion_ids=tokens[row],
                logprobs=logprobs[row],
                finished=finished[row],
            )
            for row in range(n_rows)
        ]


def _synced_ranks(model) -> bool:
    """Whether ranks must agree on the number of forwards (ZeRO-3 with several processes)."""
    dist = torch.distributed
    return (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
        and _is_zero3_partitioned(model)
    )


def _any_rank(flag: bool, synced: bool, device) -> bool:
    if not synced:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)
