"""Every fast path of TargetLogProbs in bf16 against the fp32 padded plain path (tiny model).

Two bf16 modes, as the trainers run them: ``autocast`` (fp32 weights under ``torch.autocast(bf16)``,
``deepspeed.dtype=bf16_autocast``) and ``bf16 weights`` (the module cast to bf16, DeepSpeed's
``bf16``). Fast paths: the packed and prefix-shared layouts, the fused LM head (untied and tied to
the input embedding), the lean SwiGLU/RMSNorm layers and the generic checkpointed head.

Stated tolerances (bf16 keeps 8 mantissa bits, ~4e-3 relative per rounding): per-target log-probs
within 0.02 absolute of the fp32 padded plain path (observed <= 0.003), each parameter's gradient
within 5% relative Frobenius error (observed <= 1.2%), the same parameters receiving gradients. The
comparison alone cannot tell bf16 from fp32 (fp32 passes it), so a dispatch check makes sure the
matmuls of forward *and* backward ran in bf16 (a fast path whose backward silently fell back to
fp32 would be slow, and would mix precisions).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from alignkit.models.config import ModelConfig, TinyModelConfig
from alignkit.models.load import load_causal_lm
from alignkit.models.logprobs import TargetLogProbs, naive_target_logps

from hand_batches import LAYOUTS

LOGP_ATOL = 0.02
GRAD_REL = 0.05
MODES = ("autocast", "bf16_weights")


def tiny(*, tied: bool, lean: bool = True, dtype: str = "fp32"):
    cfg = ModelConfig(lean_activations=lean, tiny=TinyModelConfig(tie_word_embeddings=tied))
    return load_causal_lm(cfg, dtype=dtype)[0]


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def fp32_reference(tied: bool):
    """The fp32 plain path on the padded layout: full logits, log_softmax."""
    model, batch = tiny(tied=tied, lean=False), LAYOUTS["padded"]()
    weights = torch.linspace(-1.0, 2.0, batch.target_ids.numel())
    logps = naive_target_logps(model, batch)
    return logps.detach(), grads_of(model, (weights * logps).sum()), weights


def run_bf16(mode: str, layout: str, *, tied: bool, lean: bool = True, fused: bool = True, chunk_size: int = 3):
    model = tiny(tied=tied, lean=lean, dtype="bf16" if mode == "bf16_weights" else "fp32")
    batch = LAYOUTS[layout]()
    module = TargetLogProbs(model, chunk_size=chunk_size, fused_head=fused)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out = module(batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index,
                     batch.target_ids)["logps"]
    return model, out


def assert_close_to_fp32(logps, grads, want_logps, want_grads):
    assert logps.dtype == torch.float32  # log-sum-exps in fp32 whatever the matmuls ran in
    assert torch.isfinite(logps).all()
    torch.testing.assert_close(logps.detach(), want_logps, rtol=0, atol=LOGP_ATOL)
    assert grads.keys() == want_grads.keys() and grads
    for name, want in want_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        rel = float((grads[name] - want).norm() / want.norm().clamp_min(1e-12))
        assert rel < GRAD_REL, f"{name}: relative gradient error {rel:.4f} >= {GRAD_REL}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tied", [False, True])
def test_fast_paths_in_bf16_match_the_fp32_padded_path(mode, layout, tied):
    want_logps, want_grads, weights = fp32_reference(tied)
    model, logps = run_bf16(mode, layout, tied=tied)
    grads = grads_of(model, (weights * logps).sum())
    if mode == "autocast":  # fp32 weights: their gradients come back in fp32
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert_close_to_fp32(logps, grads, want_logps, want_grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 1000])
def test_generic_head_and_plain_layers_in_bf16(mode, chunk_size):
    """Without the lean layers and with the checkpointed (not fused) head, on the prefix-shared layout."""
    want_logps, want_grads, weights = fp32_reference(False)
    model, logps = run_bf16(mode, "prefix_shared", tied=False, lean=False, fused=False, chunk_size=chunk_size)
    assert_close_to_fp32(logps, grads_of(model, (weights * logps).sum()), want_logps, want_grads)


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul-like aten op."""

    OPS = ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "_scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name == op or name.startswith(op) for op in self.OPS):
            first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            if first is not None:
                self.seen.append((name, first.dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tied", [False, True])
def test_autocast_runs_forward_and_backward_matmuls_in_bf16(tied):
    """Under autocast the fused head's and the lean MLP's own backward matmuls are bf16 too."""
    model = tiny(tied=tied)
    batch = LAYOUTS["prefix_shared"]()
    module = TargetLogProbs(model, chunk_size=3)
    forward, backward = MatmulDtypes(), MatmulDtypes()
    with forward, torch.autocast("cpu", dtype=torch.bfloat16):
        logps = module(batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index,
                       batch.target_ids)["logps"]
    with backward:
        logps.sum().backward()
    for phase in (forward, backward):
        assert phase.seen, "no matmul recorded"
        fp32 = [name for name, dtype in phase.seen if dtype != torch.bfloat16]
        assert not fp32, f"matmuls outside bf16: {fp32}"
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
