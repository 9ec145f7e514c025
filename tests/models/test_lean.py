"""Lean MLP and RMSNorm: the same outputs (bit-identical) and gradients (to rounding), fewer saved activations."""

from __future__ import annotations

import torch

from alignkit.models.config import ModelConfig
from alignkit.models.lean import RMSNormFunction, SiluMul, make_lean
from alignkit.models.load import load_causal_lm
from alignkit.models.logprobs import TargetLogProbs

from hand_batches import LAYOUTS


def _loss_grads_and_saved_bytes(lean: bool):
    torch.manual_seed(0)
    model, _ = load_causal_lm(ModelConfig(lean_activations=lean))
    batch = LAYOUTS["prefix_shared"]()
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = TargetLogProbs(model)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                      batch.target_index, batch.target_ids)["logps"]
    (logps * torch.linspace(-1.0, 2.0, logps.numel())).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logps.detach(), grads, sum(saved.values()), model


def test_lean_layers_give_the_same_numbers_and_save_activations():
    plain_logps, plain_grads, plain_bytes, _ = _loss_grads_and_saved_bytes(False)
    lean_logps, lean_grads, lean_bytes, model = _loss_grads_and_saved_bytes(True)
    assert torch.equal(lean_logps, plain_logps)  # forward: the same ops in the same order
    assert lean_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        scale = float(plain_grads[name].abs().max())  # measured: at most 3e-7 of it
        torch.testing.assert_close(lean_grads[name], plain_grads[name], rtol=1e-5, atol=2e-6 * scale, msg=name)
    tokens, config = LAYOUTS["prefix_shared"]().input_ids.numel(), model.config
    mlp = 2 * tokens * config.intermediate_size * 4  # silu(gate) and silu(gate) * up: fp32 [B, L, intermediate]
    norm = tokens * config.hidden_size * 4  # the normalised x: one fp32 [B, L, hidden] per norm
    norms = 2 * config.num_hidden_layers + 1  # two per layer and the final one
    assert plain_bytes - lean_bytes == config.num_hidden_layers * mlp + norms * norm


def test_make_lean_changes_every_mlp_and_norm_of_a_llama():
    model, _ = load_causal_lm(ModelConfig(lean_activations=False))
    assert make_lean(model) == 3 * model.config.num_hidden_layers + 1


def test_silu_mul_gradients_against_the_formula():
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    grad = torch.randn(3, 5, dtype=torch.float64)
    SiluMul.apply(gate, up).backward(grad)
    sig = torch.sigmoid(gate.detach())
    torch.testing.assert_close(up.grad, grad * gate.detach() * sig)
    torch.testing.assert_close(gate.grad, grad * up.detach() * sig * (1 + gate.detach() * (1 - sig)))


def test_rms_norm_gradients_against_autograd_on_fixed_tensors():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-6), (x, weight))
    grad = torch.randn(2, 3, 8, dtype=torch.float64)
    RMSNormFunction.apply(x, weight, 1e-6).backward(grad)
    lean = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    (weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))).backward(grad)  # the plain formula
    torch.testing.assert_close(lean, (x.grad, weight.grad))


def test_rms_norm_keeps_bf16_outputs_and_fp32_statistics():
    x = torch.randn(4, 16).to(torch.bfloat16).requires_grad_()
    weight = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    out = RMSNormFunction.apply(x, weight, 1e-6)
    xf = x.detach().float()
    want = weight.detach() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), want)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_swiglu_down_against_the_formula_and_autograd():
    """Fixed tensors: output, and the gradients of gate, up and the down weight from the written-out chain rule."""
    from alignkit.models.lean import SwiGLUDown

    torch.manual_seed(0)
    gate = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    down = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUDown.apply, (gate, up, down))
    grad = torch.randn(2, 3, 4, dtype=torch.float64)
    out = SwiGLUDown.apply(gate, up, down)
    g, u, w = gate.detach(), up.detach(), down.detach()
    sig = torch.sigmoid(g)
    product = g * sig * u
    torch.testing.assert_close(out, product @ w.T)
    out.backward(grad)
    grad_product = grad @ w
    torch.testing.assert_close(down.grad, grad.reshape(-1, 4).T @ product.reshape(-1, 5))
    torch.testing.assert_close(up.grad, grad_product * g * sig)
    torch.testing.assert_close(gate.grad, grad_product * u * sig * (1 + g * (1 - sig)))


def test_lean_mlp_keeps_the_module_call_where_the_down_projection_is_not_plain():
    """LoRA-wrapped, hooked (ZeRO-3 gathers through hooks) or biased down projections are called as modules."""
    from alignkit.models.lean import plain_linear_weight

    model, _ = load_causal_lm(ModelConfig(lean_activations=True))
    mlp = model.model.layers[0].mlp
    assert plain_linear_weight(mlp.down_proj) is mlp.down_proj.weight
    calls = []
    mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    assert plain_linear_weight(mlp.down_proj) is None
    x = torch.randn(1, 2, model.config.hidden_size)
    mlp(x)
    assert calls == [1]  # the hook ran: the module was called
    assert plain_linear_weight(torch.nn.Linear(3, 4)) is None  # bias
    partitioned = torch.nn.Linear(3, 4, bias=False)
    partitioned.weight.ds_id = 1
    assert plain_linear_weight(partitioned) is None
