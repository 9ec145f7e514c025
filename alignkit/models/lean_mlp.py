"""Lean SwiGLU MLPs: the same numbers as the model's own MLP, one activation fewer kept for backward.

A Llama-style MLP computes ``down(silu(gate(x)) * up(x))``. Plain autograd keeps four
``[tokens, intermediate]`` tensors per layer for backward: ``gate(x)`` (for silu), ``silu(gate(x))``
and ``up(x)`` (for the product) and the product (for ``down``). ``SiluMul`` keeps only
``gate(x)`` and ``up(x)`` and recomputes ``silu(gate(x))`` in backward (an element-wise op, well
under 1% of a step), so a SmolLM2 DPO step holds ~1/4 less MLP activation (~80 MB for 4 pairs).
Forward and backward run the same aten ops as autograd does (``silu``, ``mul``,
``silu_backward``), so values and gradients are bit-identical; the projections stay module calls,
so LoRA layers and ZeRO-3's parameter-gathering hooks work unchanged.

``make_mlps_lean(model)`` swaps the ``forward`` of every MLP of a known class with SiLU gating
(``LEAN_MLP_CLASSES``); other MLPs (GELU, biases, fused gate_up projections) are left as they are.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

LEAN_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "OlmoMLP", "Olmo2MLP")


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def is_silu(module: nn.Module) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def make_mlps_lean(model: nn.Module) -> int:
    """Give every SwiGLU MLP of a known class the lean forward; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module).__name__ in LEAN_MLP_CLASSES and is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_lean_forward, module)
            changed += 1
    return changed
