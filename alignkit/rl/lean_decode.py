"""A bf16-matmul decoder for Llama-family causal LMs with fp32 weights (``generation.decode_dtype``).

``HFGenerationEngine`` samples token by token; each token is one forward of the whole model for a few
rows (G samples of a few prompts). At that size a CPU step is bound by reading the weights, not by
arithmetic: on SmolLM2-135M, 8 rows, one thread (an Intel Xeon with avx512_bf16, no AMX), reading
all fp32 weights once per step takes ~45 ms at the bandwidth a ``sum`` reaches, while ``F.linear``
streams them at ~40% of it (~110 ms of matmuls, ~160 ms with transformers' forward). bf16 weights
halve the bytes: the same projections run ~1.8x faster in bf16 there, although a compute-bound bf16
matmul is *slower* than fp32 on that CPU (``deepspeed.dtype=auto`` keeps training in fp32).
``LeanDecoder``, for one ``generate`` call:

* casts a copy of the weights to ``compute_dtype`` (bf16) once per call (the policy changes between
  calls; ~0.2-0.3 s for SmolLM2), fusing q|k|v and gate|up; the copy is freed when the call ends;
* computes as ``torch.autocast`` does: matmuls in bf16 on bf16-cast inputs, the residual stream,
  norms, rotary embeddings, attention and the KV cache in the weights' dtype (fp32);
* keeps a static KV cache (``[rows, kv_heads, prompt + max_new_tokens, head_dim]`` per layer,
  written in place) with a key-validity mask for the left padding; finished rows are dropped;
* runs its own prefill over the left-padded prompts (each prompt once; the caller repeats rows);
* uses the model's own ``rotary_emb`` module (every RoPE variant transformers implements — Llama 3
  scaling, YaRN, linear — is the model's), RMSNorm as Llama does (fp32 variance, then the weight),
  SiLU-gated MLP, grouped-query attention, tied or untied LM head, q/k/v biases (Qwen2).

Sampling from bf16 matmuls is sampling from a slightly different policy than the fp32 one the loss
differentiates (as a bf16 vLLM beside an fp32 trainer does); the trainers never use the sampler's
log-probs in the loss (the training forward recomputes them), so this changes which completions are
drawn, not the gradient formula. ``tests/rl/test_lean_decode.py`` checks the decoder in fp32 against
transformers' forward (greedy tokens identical, log-probs to 1e-5; every layer as in transformers)
and in bf16 against transformers under ``torch.autocast`` (log-probs within a stated tolerance).

Only models whose structure is exactly that are taken (``lean_decoder_for`` says why not; asking
bf16 decoding of another model is a ``ConfigError``): ``model_type`` llama, mistral or qwen2 without
sliding windows; plain ``nn.Linear`` projections (LoRA / peft layers and hook-wrapped modules are
refused), no MLP / o_proj bias, SiLU, no ZeRO-3 partitioned parameters, no ``pretraining_tp``
split. Left out: paged or sliding-window caches, MKL's packed GEMM (1.13x in fp32 here but a packed
copy 5x the weights' size per call), speculative decoding, CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _plain_linear(module: Any, *, bias_ok: bool) -> bool:
    return (
        type(module) is nn.Linear
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and (bias_ok or module.bias is None)
    )


def lean_decoder_for(model: Any) -> tuple[bool, str]:
    """Whether ``model`` (a transformers causal LM) can decode with ``LeanDecoder``, and why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        return False, f"model type {model_type!r} (the lean decoder knows {', '.join(LEAN_MODEL_TYPES)})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False, "a sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return False, "pretraining_tp > 1"
    if getattr(config, "hidden_act", None) != "silu":
        return False, f"activation {getattr(config, 'hidden_act', None)!r}"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return False, "ZeRO-3 partitioned parameters"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "rotary_emb", None) is None or not hasattr(model, "lm_head"):
        return False, "not the Llama module layout (model.layers, model.rotary_emb, lm_head)"
    if not _plain_linear(model.lm_head, bias_ok=False):
        return False, "the LM head is not a plain bias-free Linear"
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            if not _plain_linear(getattr(attn, name, None), bias_ok=True):
                return False, f"layer {i} {name} is not a plain Linear (LoRA / hooks)"
        for module, name in ((attn, "o_proj"), (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")):
            if not _plain_linear(getattr(module, name, None), bias_ok=False):
                return False, f"layer {i} {name} is not a plain bias-free Linear (LoRA / hooks)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
                return False, f"layer {i} norm {type(norm).__name__}"
    return True, ""


class _Proj:
    """``x @ cat(weights).T`` (several projections of the same input side by side), computed as
    autocast does: on a copy of the weights cast to ``compute_dtype`` (made once per ``generate``
    call), the input cast to it, the result cast back to the input's dtype."""

    def __init__(self, weights: list[torch.Tensor], compute_dtype: torch.dtype) -> None:
        self.dtype = compute_dtype
        self.weight = torch.cat([w.detach().to(compute_dtype) for w in weights])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight).to(x.dtype)


def _eps(norm: nn.Module) -> float:
    """An RMSNorm's epsilon: ``variance_epsilon`` (Llama, Mistral, Qwen2) or ``eps``."""
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))


@dataclass
class _Layer:
    norm_in: torch.Tensor
    qkv: _Proj  # q|k|v fused: [hidden] -> [(heads + 2 kv_heads) * head_dim]
    qkv_bias: torch.Tensor | None
    o: _Proj
    norm_post: torch.Tensor
    gate_up: _Proj  # gate|up fused: [hidden] -> [2 * intermediate]
    down: _Proj


class LeanDecoder:
    """Prefill + one-token steps over a static KV cache; see the module docstring.

    ``prefill(prompts, repeats)`` returns the last logits ``[rows, vocab]`` (fp32) for
    ``len(prompts) * repeats`` rows (prompt-major); ``step(tokens)`` feeds one token per active row
    and returns the next logits; ``select(keep)`` keeps only the rows ``keep`` (indices into the
    active rows). ``close()`` drops the weight snapshot and the cache.
    """

    def __init__(self, model: Any, *, pad_token_id: int, max_new_tokens: int,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        ok, why = lean_decoder_for(model)
        if not ok:
            raise ValueError(f"the lean decoder cannot run this model: {why}")
        config, inner = model.config, model.model
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach()
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        first = inner.layers[0].self_attn
        self.head_dim = getattr(first, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = getattr(first, "scaling", self.head_dim**-0.5)
        self.eps = [_eps(layer.input_layernorm) for layer in inner.layers]
        self.eps_post = [_eps(layer.post_attention_layernorm) for layer in inner.layers]
        self.norm_final = inner.norm.weight.detach()
        self.eps_final = _eps(inner.norm)
        self.model = model
        self.compute_dtype = compute_dtype
        self.layers: list[_Layer] = []
        self.pad_token_id = pad_token_id
        self.max_new_tokens = max_new_tokens
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def _snapshot(self) -> None:
        """The weights this call decodes with: cast to ``compute_dtype``, q|k|v and gate|up fused."""
        model, dt = self.model, self.compute_dtype
        self.lm_head = _Proj([model.lm_head.weight], dt)
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            projections = (a.q_proj, a.k_proj, a.v_proj)
            bias = None
            if any(p.bias is not None for p in projections):
                bias = torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features)
                                  for p in projections])
            self.layers.append(_Layer(
                norm_in=layer.input_layernorm.weight.detach(),
                qkv=_Proj([p.weight for p in projections], dt),
                qkv_bias=bias,
                o=_Proj([a.o_proj.weight], dt),
                norm_post=layer.post_attention_layernorm.weight.detach(),
                gate_up=_Proj([m.gate_proj.weight, m.up_proj.weight], dt),
                down=_Proj([m.down_proj.weight], dt),
            ))

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q ``[n, H, T, d]``, keys/values ``[n, KV, S, d]``, mask ``[n, T, S]`` (True = attend) -> ``[n, T, H*d]``."""
        n, heads, length, d = q.shape
        group = heads // self.kv_heads
        q = q.reshape(n, self.kv_heads, group * length, d)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scaling  # [n, KV, g*T, S]
        scores = scores.view(n, self.kv_heads, group, length, -1)
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(values.dtype).view(n, self.kv_heads, group * length, -1)
        out = torch.matmul(probs, values).view(n, heads, length, d)
        return out.transpose(1, 2).reshape(n, length, heads * d)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """Tokens ``ids [n, T]`` at ``positions [n, T]`` written to cache columns ``start..start+T``;
        ``mask [n, T, start+T]``; returns the last position's fp32 logits ``[n, vocab]``."""
        n, length = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        hq, hkv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        end = start + length
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.norm_in, self.eps[i])
            qkv = layer.qkv(h)
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q = qkv[..., :hq].view(n, length, self.heads, d).transpose(1, 2)
            k = qkv[..., hq : hq + hkv].view(n, length, self.kv_heads, d).transpose(1, 2)
            v = qkv[..., hq + hkv :].view(n, length, self.kv_heads, d).transpose(1, 2)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            attn = self._attend(q, self.keys[i][:, :, :end], self.values[i][:, :, :end], mask)
            x = x + layer.o(attn)
            h = self._rms(x, layer.norm_post, self.eps_post[i])
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        h = self._rms(x[:, -1], self.norm_final, self.eps_final)
        return self.lm_head(h).float()

    # ------------------------------------------------------------------ the engine's calls
    def prefill(self, prompts: list[list[int]], repeats: int, device: torch.device) -> torch.Tensor:
        self._snapshot()
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        valid = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            valid[row, width - len(prompt) :] = True
        ids, valid = ids.to(device), valid.to(device)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        total = width + self.max_new_tokens
        shape = (len(prompts), self.kv_heads, total, self.head_dim)
        dtype = self.embed.dtype
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = causal[None] & valid[:, None, :]
        mask |= torch.eye(width, dtype=torch.bool, device=device)[None]  # pad queries see themselves (no NaN)
        logits = self._forward(ids, positions, mask, 0)
        self.valid = torch.zeros((len(prompts), total), dtype=torch.bool, device=device)
        self.valid[:, :width] = valid
        self.column = width
        self.next_position = positions[:, -1] + 1
        if repeats > 1:
            self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
            self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]
            self.valid = self.valid.repeat_interleave(repeats, dim=0)
            self.next_position = self.next_position.repeat_interleave(repeats, dim=0)
            logits = logits.repeat_interleave(repeats, dim=0)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each live row; their next logits ``[rows, vocab]`` (fp32)."""
        column = self.column
        if column >= self.valid.shape[1]:
            raise RuntimeError("the lean decoder's cache is full (more steps than max_new_tokens)")
        self.valid[:, column] = True
        mask = self.valid[:, None, : column + 1]
        logits = self._forward(tokens[:, None], self.next_position[:, None], mask, column)
        self.column += 1
        self.next_position = self.next_position + 1
        return logits

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the live rows ``keep`` (indices into the current live rows): cache, mask, positions."""
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.valid = self.valid.index_select(0, keep)
        self.next_position = self.next_position.index_select(0, keep)

    def close(self) -> None:
        self.layers, self.keys, self.values, self.lm_head = [], [], [], None
