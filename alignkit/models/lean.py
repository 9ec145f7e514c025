"""Lean layers: the model's own numbers, fewer activations kept for backward.

Plain autograd keeps, per decoder layer, tensors that backward can recompute with one cheap
element-wise pass. Two are replaced here (``make_lean(model)``): for one 434-token SmolLM2 row the
saved activations go from 556 to 346 MiB (at the start of backward, one of the step's two peaks)
for no measurable time:

* **SwiGLU MLP** ``down(silu(gate(x)) * up(x))``: autograd keeps ``gate(x)``, ``silu(gate(x))``,
  ``up(x)`` and the product; ``SiluMul`` keeps ``gate(x)`` and ``up(x)`` and recomputes the silu.
  It runs the same aten ops as autograd (``silu``, ``mul``, ``silu_backward``): bit-identical.
  When ``down`` is a plain bias-free ``nn.Linear`` (no LoRA, no hooks, not ZeRO-3 partitioned;
  ``plain_linear_weight``), ``SwiGLUDown`` applies it too and recomputes the product for the
  weight gradient instead of keeping it: one ``[tokens, intermediate]`` tensor less per layer for a
  multiply in backward that the silu's gradient needs anyway (forward bit-identical, gradients to
  rounding).
* **RMSNorm** ``w * (x * rsqrt(mean(x^2) + eps))``: autograd keeps ``x``, the normalised ``x``
  and ``rsqrt``; ``RMSNormFunction`` keeps ``x`` and ``rsqrt`` (the normalised ``x`` is recomputed).
  The forward is the same sequence of ops (bit-identical); the input gradient is computed as one
  sum where autograd adds three contributions in its own order, so gradients agree to rounding.

Under ``torch.autocast`` (``deepspeed.dtype=bf16_autocast``: fp32 weights) ``SwiGLUDown`` casts the
down projection's weight to the autocast dtype itself and saves that copy, so its backward runs the
same bf16 matmuls autograd would (a custom function's backward runs outside autocast); the weight
gradient is returned in bf16 and autograd casts it to the fp32 parameter's dtype, as it does for
autocast's own casts. ``RMSNormFunction`` has no matmul: it computes in the input's dtype (fp32 in
the residual stream under autocast), like Llama's norm.

The projections stay module calls, so LoRA layers and ZeRO-3's parameter-gathering hooks work
unchanged. Only classes known to have exactly these forwards are changed (``LEAN_MLP_CLASSES``,
``LEAN_NORM_CLASSES``); others (GELU MLPs, Gemma's ``1 + w`` norm, fused projections) are left alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.models.config import compute_dtype

LEAN_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP")
LEAN_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm")


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _silu_mul_input_grads(ctx.needs_input_grad, grad, gate, up)


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on ``tensor``'s device, or None when it is off there."""
    device = tensor.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _silu_mul_input_grads(needs_input_grad, grad_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                          silu_gate: torch.Tensor | None = None):
    """Gradients of ``silu(gate) * up`` w.r.t. ``gate`` and ``up`` (None where not needed), with the
    aten ops autograd uses; ``silu_gate`` when the caller has it already."""
    grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate) if needs_input_grad[0] else None
    grad_up = None
    if needs_input_grad[1]:
        grad_up = grad_product * (F.silu(gate) if silu_gate is None else silu_gate)
    return grad_gate, grad_up


class SwiGLUDown(torch.autograd.Function):
    """``F.linear(silu(gate) * up, down_weight)``, saving ``gate`` and ``up`` only (the product is
    recomputed in backward for the weight gradient)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
        cast = autocast_dtype(gate)
        if cast is not None:  # the bf16 copy autocast would make; backward reuses it (it runs outside autocast)
            down_weight = down_weight.to(cast)
        ctx.save_for_backward(gate, up, down_weight)
        return F.linear(F.silu(gate) * up, down_weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, down_weight = ctx.saved_tensors
        grad = grad.to(down_weight.dtype)  # no-op unless autocast ran the forward
        silu_gate = F.silu(gate)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            product = (silu_gate * up).flatten(0, -2).to(down_weight.dtype)
            grad_weight = grad.flatten(0, -2).t().mm(product)
        grad_gate, grad_up = _silu_mul_input_grads(ctx.needs_input_grad, grad.matmul(down_weight), gate, up, silu_gate)
        return grad_gate, grad_up, grad_weight


class RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm (fp32 statistics, output in the input dtype), saving ``x`` and ``rsqrt`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(compute_dtype(x.dtype))  # fp32 statistics, as Llama's norm
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(rstd.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * (xf * rstd).to(x.dtype)).sum_to_size(weight.shape)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(rstd.dtype)
            grad_rstd = (grad_normed * xf).sum(-1, keepdim=True)
            grad_mean = (-0.5 * grad_rstd) * rstd.pow(3)  # d rsqrt(a) / da = -a^(-3/2) / 2
            grad_x = grad_normed * rstd + (grad_mean.expand_as(xf) / xf.shape[-1]) * (2.0 * xf)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether something (ZeRO-3's parameter gathering, a user) hooks the module's forward call."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def plain_linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a plain bias-free ``nn.Linear`` that may be used without calling the module, else
    None: subclasses and wrappers (LoRA, quantised layers), biases, forward hooks and ZeRO-3
    partitioned weights (``ds_id``; ZeRO-3 gathers them through module hooks) all need the module call."""
    if type(module) is not nn.Linear or module.bias is not None or has_forward_hooks(module):
        return None
    return None if hasattr(module.weight, "ds_id") else module.weight


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down_weight = plain_linear_weight(self.down_proj)  # checked per call: ZeRO-3 and LoRA come later
    if down_weight is not None:
        return SwiGLUDown.apply(gate, up, down_weight)
    return self.down_proj(SiluMul.apply(gate, up))


def _lean_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def is_silu(module: nn.Module | None) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def make_lean(model: nn.Module) -> int:
    """Give every known SwiGLU MLP and RMSNorm its lean forward; returns how many modules changed."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in LEAN_MLP_CLASSES and is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            changed += 1
        elif name in LEAN_NORM_CLASSES and isinstance(getattr(module, "weight", None), torch.Tensor):
            module.forward = types.MethodType(_lean_norm_forward, module)
            changed += 1
    return changed
