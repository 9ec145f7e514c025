"""The lean SwiGLU MLP computes bit-identical outputs and gradients and keeps fewer activations."""

from __future__ import annotations

import torch

from alignkit.models.config import ModelConfig
from alignkit.models.lean_mlp import SiluMul
from alignkit.models.load import load_causal_lm
from alignkit.models.logprobs import TargetLogProbs

from hand_batches import LAYOUTS


def _loss_grads_and_saved_bytes(lean: bool):
    torch.manual_seed(0)
    model, _ = load_causal_lm(ModelConfig(lean_mlp=lean))
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


def test_lean_mlp_is_bit_identical_and_saves_one_activation_per_layer():
    plain_logps, plain_grads, plain_bytes, _ = _loss_grads_and_saved_bytes(False)
    lean_logps, lean_grads, lean_bytes, model = _loss_grads_and_saved_bytes(True)
    assert torch.equal(lean_logps, plain_logps)
    assert lean_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert torch.equal(lean_grads[name], plain_grads[name]), name
    batch = LAYOUTS["prefix_shared"]()
    config = model.config
    one_activation = batch.input_ids.numel() * config.intermediate_size * 4  # fp32 [B, L, intermediate]
    assert plain_bytes - lean_bytes == config.num_hidden_layers * one_activation


def test_silu_mul_gradients_against_the_formula():
    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    grad = torch.randn(3, 5, dtype=torch.float64)
    SiluMul.apply(gate, up).backward(grad)
    sig = torch.sigmoid(gate.detach())
    torch.testing.assert_close(up.grad, grad * gate.detach() * sig)
    torch.testing.assert_close(gate.grad, grad * up.detach() * sig * (1 + gate.detach() * (1 - sig)))
