"""Per-target log-probs of a causal LM without full-vocabulary logits for every position.

``TargetLogProbs`` is the hot path of every trainer. It runs the model's decoder once over the
batch rows (any layout of ``alignkit.data.batch``: padded 2D mask, packed or prefix-shared 4D
additive mask with explicit positions), gathers the hidden states of the *target* positions only
(flat ``b * L + t``), and applies the LM head to them in chunks of ``chunk_size`` targets. Each
chunk runs under ``torch.utils.checkpoint``: its ``[chunk, vocab]`` logits are freed after the
forward pass and recomputed in backward, so memory is O(chunk x vocab) instead of
O(tokens x vocab), and no logits at all are computed for prompt or pad positions. The
log-sum-exp runs in fp32 whatever the model dtype.

When only log-probs are asked for and the head is a plain bias-free ``nn.Linear`` (or the tied
embedding matrix) that ZeRO-3 does not partition, the chunks run in one autograd function,
``FusedHeadLogProbs``, whose backward recomputes each chunk's logits into a single ``[chunk, vocab]``
fp32 buffer, turns it into the gradient in place (``g * (onehot - softmax)``) and accumulates the
head's weight gradient into one ``[vocab, H]`` tensor. The generic checkpointed path holds ~5
``[chunk, vocab]`` temporaries plus one weight gradient per chunk at the start of backward, when
all decoder activations are still alive: the peak of a training step (~250 MB for a SmolLM2 DPO
batch). Both paths compute the same numbers up to float rounding (tests compare them).

Under ``torch.autocast`` (``deepspeed.dtype=bf16_autocast``: fp32 weights, bf16 matmuls) the fused
head casts the hidden states and the weight to the autocast dtype once and saves those copies, so
its backward recomputes the same bf16 logits the forward normalised (a custom function's backward
runs outside autocast); the weight gradient accumulates over chunks in the weight's own dtype
(fp32), the hidden-state gradient comes back in bf16 and autograd casts it to fp32.

Optional per-target statistics from the same chunk: ``entropy`` of the next-token distribution and
``log_sq_mass`` = log sum_v p_v^2 (WPO's weight).

Per-token KL to a reference (TDPO, a loss with ``needs_token_kl``): ``forward(reference=ReferenceHead)``
takes a frozen reference's final hidden states at the same target positions (``hidden_only=True``
on the reference's own ``TargetLogProbs`` gives them, through its engine) and its LM head; each
chunk then also computes the reference's ``[chunk, vocab]`` logits (no grad) and returns ``kl`` =
KL(pi_ref || pi_theta) over the full vocabulary (with grad through the policy's logits) and
``ref_logps`` (the reference's target log-probs, no grad) per target; a ``ReferenceHead.divergence``
(GKD's generalized JSD, a frozen teacher as the "reference") replaces that KL under the same name. This runs on the generic
checkpointed path (the fused head serves only plain log-probs), so no ``[tokens, vocab]`` tensor
of either model outlives its chunk; backward recomputes both chunks' logits. Each chunk holds about
twice the ``[chunk, vocab]`` temporaries of a plain one. Not under ZeRO-3 (the reference's head is
called inside the policy's forward, outside the hooks that gather its shards): refused.

When that fused head shares its weight with a plain ``nn.Embedding`` input embedding (tied
weights, as SmolLM2), the lookup runs as ``TiedEmbeddingLookup`` and the decoder gets
``inputs_embeds``: its backward adds the looked-up rows into the head's weight gradient in place,
so the weight has one ``[vocab, H]`` gradient tensor instead of autograd's three at the end of
backward (the head's, the embedding's dense one and their sum).

Otherwise the LM head is called as a module (``get_output_embeddings()(h)``) so DeepSpeed ZeRO-3
hooks gather its weight; tied embeddings need nothing special there (the head shares the
embedding's weight), and a model without an output module falls back to its input embedding matrix.
Under ZeRO-3 every rank makes the same number of head calls (the largest chunk count over ranks, the
surplus chunks empty): ZeRO-3's per-rank module trace must stay alike on all ranks or the next
forward hangs (``agreed_chunk_count``). ``final_logit_softcapping`` (Gemma-2 style) is honoured.
Wrap the ``TargetLogProbs`` module itself in the DeepSpeed engine, so that its ``forward`` is the
root forward ZeRO-3 traces.

``forward_logps(module, batch)`` is that one forward over a collated ``Batch`` (a ``TargetLogProbs`` or
a DeepSpeed engine wrapping one): the trainers, their references and ``alignkit eval`` call it.
``naive_target_logps`` is the plain reference path (full logits, ``log_softmax``), for tests and
benchmarks.

Deliberately left out: models whose forward rescales logits in other ways (Cohere's
``logit_scale``, Granite's ``logits_scaling``; rejected with an error rather than computed wrong)
and fused Triton kernels (CPU-first; the chunking gives the memory bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignkit.models.config import compute_dtype
from alignkit.models.lean import autocast_dtype, has_forward_hooks, plain_linear_weight

UNSUPPORTED_LOGIT_SCALES = ("logit_scale", "logits_scaling")


def prepare_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2D 1/0 masks pass through; 4D additive float masks are cast to ``dtype``, -inf clamped to its min.

    Clamping keeps fully masked rows (padding in packed rows) finite, so attention over them is
    uniform instead of NaN and no NaN leaks into gradients.
    """
    if attention_mask.dim() == 2 or not attention_mask.is_floating_point():
        return attention_mask
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be [B, L] or [B, 1, L, L], got shape {tuple(attention_mask.shape)}")
    return attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min)


def model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@dataclass
class ReferenceHead:
    """A frozen reference at the policy's target positions, for the per-token KL (see the module docstring)."""

    hidden: torch.Tensor  # [N, H_ref] final hidden states at the batch's targets, in target order, no grad
    logits: Callable[[torch.Tensor], torch.Tensor]  # [n, H_ref] -> [n, vocab] fp32 logits, no grad
    # (policy logits [n, vocab] with grad, reference logits [n, vocab]) -> [n]; None: KL(pi_ref || pi_theta).
    # GKD passes its generalized JSD (losses/distill.generalized_jsd), returned under "kl" all the same
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def head_logits(head: nn.Module | torch.Tensor, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of ``hidden`` under the LM head (module or weight matrix), soft-capped if the model does."""
    logits = head(hidden) if isinstance(head, nn.Module) else F.linear(hidden, head)
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _target_stats(
    head: nn.Module | torch.Tensor,
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    softcap: float | None,
    with_entropy: bool,
    with_log_sq_mass: bool,
    ref_hidden: torch.Tensor | None = None,
    ref_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ref_divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """(logps, [entropy], [log_sq_mass], [kl, ref_logps]) for one chunk of target hidden states ``[n, H]``."""
    logits = head_logits(head, hidden, softcap)
    log_normalizer = torch.logsumexp(logits, dim=-1)
    stats = [logits.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1) - log_normalizer]
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        stats.append(log_normalizer - (probs * logits).sum(-1))
    if with_log_sq_mass:
        stats.append(torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * log_normalizer)
    if ref_hidden is not None:
        # both rows normalised by the same ops: log_softmax rounds differently, a per-row shift of ~4e-6 at
        # SmolLM2's logits, which summed to ~1e-4 nats of KL (and -1e-4 of log-ratio) per completion at step 0
        with torch.no_grad():
            ref = ref_logits(ref_hidden)
            ref_log_probs = ref - torch.logsumexp(ref, dim=-1, keepdim=True)
        if ref_divergence is not None:  # GKD's JSD, on the raw logits of both (it applies its temperature)
            stats.append(ref_divergence(logits, ref))
        else:
            log_probs = logits - log_normalizer.unsqueeze(-1)
            # sum_v p_ref(v) * (log p_ref(v) - log p_theta(v)); exactly 0 where the two rows are equal
            stats.append(F.kl_div(log_probs, ref_log_probs, reduction="none", log_target=True).sum(-1))
        stats.append(ref_log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1))
    return tuple(stats)


class FusedHeadLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[i, target_ids[i]]`` for ``[N, H]`` hidden, chunk by chunk.

    Saves only ``hidden``, ``weight`` and the per-target log-sum-exp; see the module docstring. With a
    ``TiedGradSlot``, the weight gradient is handed to the tied input embedding's backward (which
    adds its own part and returns the sum) instead of being returned here."""

    @staticmethod
    def forward(ctx, hidden, weight, target_ids, chunk_size, tied_slot=None):
        ctx.weight_dtype = weight.dtype
        cast = autocast_dtype(hidden)
        if cast is not None:  # the copies autocast's matmul would make, kept for backward
            hidden, weight = hidden.to(cast), weight.to(cast)
        n, dtype = hidden.shape[0], compute_dtype(weight.dtype)
        logps = torch.empty(n, dtype=dtype, device=hidden.device)
        log_normalizer = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            span = slice(start, start + chunk_size)
            logits = F.linear(hidden[span], weight).to(dtype)
            log_normalizer[span] = torch.logsumexp(logits, dim=-1)
            logps[span] = logits.gather(-1, target_ids[span].unsqueeze(-1)).squeeze(-1) - log_normalizer[span]
        ctx.save_for_backward(hidden, weight, target_ids, log_normalizer)
        ctx.chunk_size, ctx.tied_slot = chunk_size, tied_slot
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, target_ids, log_normalizer = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=ctx.weight_dtype, device=weight.device) if want_weight else None
        grad_logps = grad_logps.to(log_normalizer.dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            span = slice(start, start + ctx.chunk_size)
            g = grad_logps[span].unsqueeze(-1)
            # d logp / d logits = onehot(target) - softmax, scaled by the incoming gradient; in place
            grad_logits = F.linear(hidden[span], weight).to(log_normalizer.dtype)
            grad_logits.sub_(log_normalizer[span].unsqueeze(-1)).exp_().mul_(-g)
            grad_logits.scatter_add_(-1, target_ids[span].unsqueeze(-1), g)
            grad_logits = grad_logits.to(weight.dtype)
            if want_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[span])
            if want_weight and grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.t(), hidden[span])
            elif want_weight:  # autocast: a bf16 chunk product, summed in the fp32 parameter's dtype
                grad_weight.add_(grad_logits.t().mm(hidden[span]))
        if ctx.tied_slot is not None and grad_weight is not None:
            ctx.tied_slot.grad, grad_weight = grad_weight, None
        return grad_hidden, grad_weight, None, None, None


class TiedGradSlot:
    """Carries the fused head's weight gradient to the tied input embedding's backward (one per forward)."""

    grad: torch.Tensor | None = None


class TiedEmbeddingLookup(torch.autograd.Function):
    """``F.embedding(input_ids, weight)`` for an embedding tied to the fused LM head.

    Autograd would give this lookup its own dense ``[vocab, H]`` gradient and add it to the head's
    into a third (113 MB each for SmolLM2, at the end of backward, when all parameter gradients
    exist: the step's peak after the LM head's); this backward adds the looked-up rows into the head's
    gradient (left in ``slot`` by ``FusedHeadLogProbs``) in place and returns it as the weight's
    only gradient. Rows of ``padding_idx`` get no gradient, as in ``nn.Embedding``."""

    @staticmethod
    def forward(ctx, weight, input_ids, padding_idx, slot):
        ctx.save_for_backward(weight, input_ids)
        ctx.padding_idx, ctx.slot = padding_idx, slot
        return F.embedding(input_ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        weight, input_ids = ctx.saved_tensors
        grad_weight, ctx.slot.grad = ctx.slot.grad, None
        if grad_weight is None:  # the head's backward did not run (it needed no weight gradient)
            grad_weight = torch.zeros_like(weight)
        ids, rows = input_ids.reshape(-1), grad_output.reshape(-1, weight.shape[-1]).to(weight.dtype)
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        return grad_weight.index_add_(0, ids, rows), None, None, None


def fused_head_weight(head: nn.Module | torch.Tensor, softcap: float | None, with_entropy: bool,
                      with_log_sq_mass: bool) -> torch.Tensor | None:
    """The head's weight when ``FusedHeadLogProbs`` applies, else None (see the module docstring)."""
    if softcap or with_entropy or with_log_sq_mass:
        return None
    if isinstance(head, torch.Tensor):
        return None if hasattr(head, "ds_id") else head  # ds_id: a ZeRO-3 partitioned parameter
    return plain_linear_weight(head)  # None for LoRA/quantised heads, biases, hooks, ZeRO-3


def tied_input_embedding(model: nn.Module, head_weight: torch.Tensor) -> nn.Embedding | None:
    """The input embedding when it is a plain ``nn.Embedding`` sharing ``head_weight`` and training it,
    so that ``TiedEmbeddingLookup`` can add its gradient into the fused head's in place; else None."""
    embedding = model.get_input_embeddings()
    plain = (
        type(embedding) is nn.Embedding
        and embedding.weight is head_weight
        and not has_forward_hooks(embedding)
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
    )
    return embedding if plain and head_weight.requires_grad and torch.is_grad_enabled() else None


def output_head(model: nn.Module) -> nn.Module | torch.Tensor:
    """The LM head module, or the input embedding matrix when the model exposes no output module."""
    head = model.get_output_embeddings()
    if head is not None:
        return head
    return model.get_input_embeddings().weight


class TargetLogProbs(nn.Module):
    """Log-probs (and optional entropy, log sum p^2) of target tokens; see the module docstring.

    ``model`` is a transformers causal LM, plain or peft-wrapped (LoRA layers live inside the
    decoder, so ``disabled_adapter`` applies here too).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, fused_head: bool = True):
        super().__init__()
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        config = model.config
        for name in UNSUPPORTED_LOGIT_SCALES:
            if getattr(config, name, None) not in (None, 1, 1.0):
                raise NotImplementedError(f"TargetLogProbs does not apply config.{name}; use naive_target_logps")
        self.model = model
        self.chunk_size = chunk_size
        self.fused_head = fused_head
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-layer (post-norm) hidden states ``[B, L, H]`` (from ``inputs_embeds`` when given)."""
        decoder = self.model.get_decoder()
        output = decoder(
            input_ids=None if inputs_embeds is not None else input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=prepare_attention_mask(attention_mask, model_dtype(decoder)),
            position_ids=position_ids,
            use_cache=False,
        )
        return output.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        target_index: torch.Tensor,
        target_ids: torch.Tensor,
        *,
        with_entropy: bool = False,
        with_log_sq_mass: bool = False,
        reference: ReferenceHead | None = None,
        hidden_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``{"logps": [N]}`` (+ ``entropy``, ``log_sq_mass``; + ``kl``, ``ref_logps`` with ``reference``);
        ``hidden_only``: ``{"hidden": [N, H]}``, the final hidden states at the targets, no head applied."""
        head = output_head(self.model)
        plain = self.fused_head and reference is None and not hidden_only
        weight = fused_head_weight(head, self.softcap, with_entropy, with_log_sq_mass) if plain else None
        embedding = tied_input_embedding(self.model, weight) if weight is not None else None
        slot = TiedGradSlot() if embedding is not None else None
        inputs_embeds = None
        if embedding is not None:
            inputs_embeds = TiedEmbeddingLookup.apply(weight, input_ids, embedding.padding_idx, slot)
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)
        targets = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index)  # [N, H]
        if hidden_only:
            return {"hidden": targets}
        if weight is not None:
            return {"logps": FusedHeadLogProbs.apply(targets, weight, target_ids, self.chunk_size, slot)}
        if reference is not None and is_partitioned(head):
            raise NotImplementedError("the per-token KL to a reference (needs_token_kl) does not run under ZeRO-3; "
                                      "use deepspeed.zero_stage 0-2")
        recompute = torch.is_grad_enabled() and targets.requires_grad
        chunks = []
        count = max(1, -(-targets.shape[0] // self.chunk_size))
        if is_partitioned(head):  # ZeRO-3: every rank calls the head module equally often (see below)
            count = agreed_chunk_count(count)
        for start in range(0, count * self.chunk_size, self.chunk_size):
            span = slice(start, start + self.chunk_size)
            args = (head, targets[span], target_ids[span], self.softcap, with_entropy, with_log_sq_mass)
            if reference is not None:
                args += (reference.hidden[span], reference.logits, reference.divergence)
            chunks.append(checkpoint(_target_stats, *args, use_reentrant=False) if recompute else _target_stats(*args))
        names = ["logps"] + ["entropy"] * with_entropy + ["log_sq_mass"] * with_log_sq_mass
        names += ["kl", "ref_logps"] if reference is not None else []
        return {name: torch.cat([chunk[i] for chunk in chunks]) for i, name in enumerate(names)}

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[n, vocab]`` of final hidden states ``[n, H]`` (the head of ``ReferenceHead.logits``)."""
        return head_logits(output_head(self.model), hidden, self.softcap)


def is_partitioned(head: nn.Module | torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions the head's weight (it then gathers it in the module's hooks)."""
    params = [head] if isinstance(head, torch.Tensor) else head.parameters()
    return any(hasattr(p, "ds_id") for p in params)


def agreed_chunk_count(count: int) -> int:
    """The largest head-chunk count over ranks (a collective: every rank forwards together).

    ZeRO-3 records the order of submodule calls in the first forward and checks it, on each rank on
    its own, in the next; a rank whose sequence differs invalidates its trace, and the start of its
    next forward then runs a collective the other ranks do not (``assert_ints_same_as_other_ranks``):
    the run hangs. The head is called once per chunk of targets, and the target count differs
    between ranks' batches, so every rank runs the largest count, the surplus chunks empty."""
    from alignkit.engine.collectives import all_reduce

    return int(all_reduce([float(count)], "max")[0])


def forward_logps(engine_or_module: Any, batch: Any, **flags: Any) -> dict[str, torch.Tensor]:
    """One forward of a ``TargetLogProbs`` module (or the engine wrapping one) over ``batch``
    (an ``alignkit.data.batch.Batch``); ``flags``: ``with_entropy``, ``with_log_sq_mass``,
    ``hidden_only`` (the final hidden states at the targets) and ``reference`` (a ``ReferenceHead``:
    the per-token KL), as ``TargetLogProbs.forward`` takes them."""
    return engine_or_module(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        target_index=batch.target_index,
        target_ids=batch.target_ids,
        **flags,
    )


def naive_target_logps(model: nn.Module, batch) -> torch.Tensor:
    """Reference path: full ``[B, L, V]`` logits, ``log_softmax``, then index the targets. ``[N]``."""
    output = model(
        input_ids=batch.input_ids,
        attention_mask=prepare_attention_mask(batch.attention_mask, model_dtype(model)),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    log_probs = torch.log_softmax(output.logits.float(), dim=-1).flatten(0, 1)  # [B * L, V]
    return log_probs[batch.target_index, batch.target_ids]
