"""TargetLogProbs (chunked, checkpointed LM head on target rows) against the plain full-logits path.

Tolerances (fp32, tiny model): log-probs, entropy and log sum p^2 agree to 1e-5 absolute; parameter
gradients elementwise to 1e-4 relative + (1e-6 + 1e-5 x the tensor's largest entry) absolute (the
summation order differs, so tiny entries of a large gradient only agree to roundoff of its scale). Layout equivalence (the same tokens give the same
log-probs padded, packed and prefix-shared) to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.models.config import LoraConfig, ModelConfig, TinyModelConfig
from alignkit.models.load import disabled_adapter, load_causal_lm
from alignkit.models.logprobs import TargetLogProbs, naive_target_logps

from hand_batches import LAYOUTS

ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL, GRAD_SCALE_ATOL = 1e-4, 1e-6, 1e-5


def tiny_model(**tiny_overrides):
    model, _ = load_causal_lm(ModelConfig(tiny=TinyModelConfig(**tiny_overrides)))
    return model


def run_fast(model, batch, chunk_size, **flags):
    return TargetLogProbs(model, chunk_size)(
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index, batch.target_ids, **flags
    )


def full_log_probs(model, batch) -> torch.Tensor:
    """[N, V] log-probs at the target positions from full logits (independent of TargetLogProbs)."""
    mask = batch.attention_mask
    out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids)
    return torch.log_softmax(out.logits, dim=-1).reshape(-1, out.logits.shape[-1])[batch.target_index]


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        atol = GRAD_ATOL + GRAD_SCALE_ATOL * float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=GRAD_RTOL, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_logps_and_grads_match_naive(layout, chunk_size):
    model = tiny_model()
    batch = LAYOUTS[layout]()
    weights = torch.linspace(-1.0, 2.0, batch.target_ids.numel())

    fast = run_fast(model, batch, chunk_size)["logps"]
    fast_grads = grads_of(model, (weights * fast).sum())
    naive = naive_target_logps(model, batch)
    naive_grads = grads_of(model, (weights * naive).sum())

    assert fast.shape == batch.target_ids.shape
    torch.testing.assert_close(fast, naive, rtol=0, atol=ATOL)
    assert_same_grads(fast_grads, naive_grads)


def test_layouts_give_the_same_logps():
    model = tiny_model()
    with torch.no_grad():
        per_layout = {name: run_fast(model, make(), 4)["logps"] for name, make in LAYOUTS.items()}
    # every layout lists slot 0's targets then slot 1's, in token order
    torch.testing.assert_close(per_layout["packed"], per_layout["padded"], rtol=0, atol=ATOL)
    torch.testing.assert_close(per_layout["prefix_shared"], per_layout["padded"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_entropy_and_log_sq_mass_match_direct_formula(layout):
    model = tiny_model()
    batch = LAYOUTS[layout]()
    fast = run_fast(model, batch, 2, with_entropy=True, with_log_sq_mass=True)
    fast_grads = grads_of(model, fast["entropy"].sum() + 0.5 * fast["log_sq_mass"].sum())

    log_p = full_log_probs(model, batch)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    log_sq_mass = torch.log((p * p).sum(-1))
    direct_grads = grads_of(model, entropy.sum() + 0.5 * log_sq_mass.sum())

    torch.testing.assert_close(fast["entropy"], entropy.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(fast["log_sq_mass"], log_sq_mass.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(fast["logps"], log_p.gather(-1, batch.target_ids[:, None]).squeeze(-1).detach(), rtol=0, atol=ATOL)
    assert_same_grads(fast_grads, direct_grads)


def test_tied_embeddings_share_the_gradient():
    model = tiny_model(tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = LAYOUTS["packed"]()
    fast_grads = grads_of(model, run_fast(model, batch, 3)["logps"].sum())
    naive_grads = grads_of(model, naive_target_logps(model, batch).sum())
    assert_same_grads(fast_grads, naive_grads)


def _vocab_sized_tensors_made_in_backward(model, loss) -> int:
    """Distinct storages of ``[vocab, H]`` tensors that aten ops produce while ``loss`` backpropagates."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shape, storages = model.get_input_embeddings().weight.shape, set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.shape == shape:
                    storages.add(tensor.untyped_storage().data_ptr())
            return out

    model.zero_grad(set_to_none=True)
    with Watch():
        loss.backward()
    return len(storages)


def test_tied_embedding_adds_into_the_head_gradient_in_place(monkeypatch):
    """With a tied, fused head the whole weight gradient is one [vocab, H] tensor (autograd's own
    embedding backward makes more), and the gradients are the same."""
    import alignkit.models.logprobs as logprobs

    model = tiny_model(tie_word_embeddings=True)
    batch = LAYOUTS["prefix_shared"]()
    weights = torch.linspace(-1.0, 2.0, batch.target_ids.numel())
    assert logprobs.tied_input_embedding(model, model.get_input_embeddings().weight) is not None
    tied_loss = (weights * run_fast(model, batch, 3)["logps"]).sum()
    assert _vocab_sized_tensors_made_in_backward(model, tied_loss) == 1
    tied_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(logprobs, "tied_input_embedding", lambda *a: None)
    plain_loss = (weights * run_fast(model, batch, 3)["logps"]).sum()
    # autograd's path: the head's, the embedding's dense gradient and (torch 2.13) their sum
    assert _vocab_sized_tensors_made_in_backward(model, plain_loss) >= 2
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert_same_grads(tied_grads, plain_grads)


def test_tied_embedding_lookup_against_nn_embedding():
    """Fixed tensors: the lookup's gradient (no rows for padding_idx) added to what the slot holds."""
    from alignkit.models.logprobs import TiedEmbeddingLookup, TiedGradSlot

    torch.manual_seed(0)
    weight = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 3, 3, 0], [5, 1, 2, 3]])
    grad = torch.randn(2, 4, 3, dtype=torch.float64)
    head_grad = torch.randn(6, 3, dtype=torch.float64)
    want = torch.nn.functional.embedding(ids, weight, padding_idx=3)
    (want_grad,) = torch.autograd.grad(want, weight, grad)
    slot = TiedGradSlot()
    slot.grad = head_grad.clone()
    held = slot.grad
    got = TiedEmbeddingLookup.apply(weight, ids, 3, slot)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    (got_grad,) = torch.autograd.grad(got, weight, grad)
    assert got_grad.data_ptr() == held.data_ptr() and slot.grad is None  # added in place, slot emptied
    torch.testing.assert_close(got_grad, head_grad + want_grad)
    assert torch.equal(got_grad[3], head_grad[3])  # padding_idx: nothing added
    (alone,) = torch.autograd.grad(TiedEmbeddingLookup.apply(weight, ids, None, TiedGradSlot()), weight, grad)
    (want_alone,) = torch.autograd.grad(torch.nn.functional.embedding(ids, weight), weight, grad)
    torch.testing.assert_close(alone, want_alone)  # empty slot, no padding_idx


def test_lora_model_matches_naive_and_adapter_can_be_disabled():
    torch.manual_seed(0)  # peft draws lora_A from the global RNG
    model, _ = load_causal_lm(ModelConfig(lora=LoraConfig(r=4, alpha=8.0)))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it change the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = LAYOUTS["prefix_shared"]()

    fast = run_fast(model, batch, 3)["logps"]
    fast_grads = grads_of(model, fast.sum())
    naive_grads = grads_of(model, naive_target_logps(model, batch).sum())
    assert all("lora_" in name for name in fast_grads)  # only adapters train
    assert_same_grads(fast_grads, naive_grads)

    base = tiny_model()  # same seed: the weights under the adapters
    with torch.no_grad():
        base_logps = run_fast(base, batch, 3)["logps"]
        with disabled_adapter(model):
            disabled = run_fast(model, batch, 3)["logps"]
        enabled_again = run_fast(model, batch, 3)["logps"]
    torch.testing.assert_close(disabled, base_logps, rtol=0, atol=ATOL)
    assert (fast.detach() - base_logps).abs().max() > 1e-3
    torch.testing.assert_close(enabled_again, fast.detach(), rtol=0, atol=ATOL)


def test_final_logit_softcapping_is_applied():
    model = tiny_model()
    model.config.final_logit_softcapping = 0.5  # Llama's forward ignores it; TargetLogProbs must not
    batch = LAYOUTS["padded"]()
    with torch.no_grad():
        got = run_fast(model, batch, 3)["logps"]
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        capped = 0.5 * torch.tanh(out.logits / 0.5)
        want = torch.log_softmax(capped, -1).reshape(-1, capped.shape[-1])[batch.target_index, batch.target_ids]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_no_grad_path_and_empty_targets():
    model = tiny_model()
    batch = LAYOUTS["padded"]()
    with torch.no_grad():
        out = TargetLogProbs(model, 4)(
            batch.input_ids, batch.attention_mask, batch.position_ids,
            batch.target_index[:0], batch.target_ids[:0], with_entropy=True,
        )
    assert out["logps"].shape == (0,) and out["entropy"].shape == (0,)


def test_chunk_logits_are_not_kept_for_backward():
    """Saved activations must not grow with N x vocab: compare saved bytes for 1 and many chunks."""
    model = tiny_model()
    batch = LAYOUTS["padded"]()
    vocab = model.config.vocab_size

    def saved_bytes(module):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index, batch.target_ids)
        return total

    n = batch.target_ids.numel()
    fast = saved_bytes(TargetLogProbs(model, 2))
    naive = saved_bytes(lambda *a: naive_target_logps(model, batch))
    assert naive - fast > n * vocab * 4  # the naive path keeps at least one [N, V] fp32 tensor more


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minus_inf_masks_are_clamped_so_pad_rows_stay_finite(attn):
    """A mask written with -inf (fully masked pad rows) must not turn gradients into NaN."""
    model, _ = load_causal_lm(ModelConfig(attn_implementation=attn))
    batch = LAYOUTS["packed"]()
    inf_batch = LAYOUTS["packed"]()
    inf_batch.attention_mask = torch.where(batch.attention_mask < 0, float("-inf"), 0.0)
    fast_grads = grads_of(model, run_fast(model, inf_batch, 3)["logps"].sum())
    naive_grads = grads_of(model, naive_target_logps(model, batch).sum())
    assert_same_grads(fast_grads, naive_grads)


def test_gradient_checkpointed_decoder_gives_the_same_grads():
    model, _ = load_causal_lm(ModelConfig(gradient_checkpointing=True))
    model.train()  # transformers checkpoints layers only in training mode
    batch = LAYOUTS["prefix_shared"]()
    fast_grads = grads_of(model, run_fast(model, batch, 3)["logps"].sum())
    model.eval()
    naive_grads = grads_of(model, naive_target_logps(model, batch).sum())
    assert_same_grads(fast_grads, naive_grads)


def test_bf16_model_with_additive_mask():
    """The float mask is cast to the model dtype (bf16 here); log-sum-exp still runs in fp32."""
    model, _ = load_causal_lm(ModelConfig(), dtype="bf16")
    batch = LAYOUTS["packed"]()
    with torch.no_grad():
        fast = run_fast(model, batch, 3)["logps"]
        naive = naive_target_logps(model, batch)
    assert fast.dtype == torch.float32 and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-3)  # bf16 matmuls may block differently


@pytest.mark.parametrize("chunk_size", [2, 1000])
def test_fused_head_matches_the_checkpointed_head(chunk_size):
    """FusedHeadLogProbs (the default for plain heads) and the generic checkpointed chunks agree."""
    from alignkit.models.logprobs import FusedHeadLogProbs, fused_head_weight, output_head

    model = tiny_model()
    batch = LAYOUTS["prefix_shared"]()
    assert fused_head_weight(output_head(model), None, False, False) is not None  # the tiny head takes it
    weights = torch.linspace(-1.0, 2.0, batch.target_ids.numel())
    calls = []
    original = FusedHeadLogProbs.apply
    FusedHeadLogProbs.apply = lambda *a: calls.append(1) or original(*a)
    try:
        fused = TargetLogProbs(model, chunk_size)(batch.input_ids, batch.attention_mask, batch.position_ids,
                                                  batch.target_index, batch.target_ids)["logps"]
    finally:
        FusedHeadLogProbs.apply = original
    assert calls, "the fused head was not used"
    fused_grads = grads_of(model, (weights * fused).sum())
    generic = TargetLogProbs(model, chunk_size, fused_head=False)(
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index, batch.target_ids)["logps"]
    generic_grads = grads_of(model, (weights * generic).sum())
    torch.testing.assert_close(fused, generic, rtol=0, atol=ATOL)
    assert_same_grads(fused_grads, generic_grads)


def test_fused_head_falls_back_where_it_does_not_apply():
    from alignkit.models.logprobs import fused_head_weight

    head = torch.nn.Linear(4, 8, bias=False)
    assert fused_head_weight(head, None, False, False) is head.weight
    assert fused_head_weight(head.weight, None, False, False) is head.weight  # tied embedding matrix
    assert fused_head_weight(head, 30.0, False, False) is None  # softcapping
    assert fused_head_weight(head, None, True, False) is None  # entropy asked for
    assert fused_head_weight(head, None, False, True) is None
    assert fused_head_weight(torch.nn.Linear(4, 8), None, False, False) is None  # bias
    hooked = torch.nn.Linear(4, 8, bias=False)
    hooked.register_forward_pre_hook(lambda *a: None)  # e.g. ZeRO-3 gathering the weight
    assert fused_head_weight(hooked, None, False, False) is None
    partitioned = torch.nn.Linear(4, 8, bias=False)
    partitioned.weight.ds_id = 7
    assert fused_head_weight(partitioned, None, False, False) is None


def test_fused_head_grads_against_the_direct_formula():
    """Independent check on fixed tensors: d/dh and d/dW of sum_i g_i log_softmax(h W^T)[i, t_i]."""
    from alignkit.models.logprobs import FusedHeadLogProbs

    torch.manual_seed(0)
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    g = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: FusedHeadLogProbs.apply(h, w, targets, 2).double(), (hidden, weight))
    (g * FusedHeadLogProbs.apply(hidden, weight, targets, 2)).sum().backward()
    probs = torch.softmax(hidden.detach() @ weight.detach().T, dim=-1)
    grad_logits = g[:, None] * (torch.nn.functional.one_hot(targets, 7) - probs)
    torch.testing.assert_close(hidden.grad, grad_logits @ weight.detach())
    torch.testing.assert_close(weight.grad, grad_logits.T @ hidden.detach())


@pytest.mark.parametrize("other_rank_chunks", [1, 7])
def test_partitioned_head_is_called_as_often_as_on_every_other_rank(monkeypatch, other_rank_chunks):
    """ZeRO-3 (a head weight with ``ds_id``): the head module runs the largest chunk count over ranks,
    the surplus chunks empty, so each rank's module trace is alike (a differing count hung 2-process
    zero3_offload runs); the log-probs and gradients are unchanged."""
    import alignkit.engine.collectives as collectives

    model = tiny_model()
    batch = LAYOUTS["padded"]()
    want = run_fast(model, batch, 2, with_entropy=True)["logps"]  # entropy: the generic (module) path
    want_grads = grads_of(model, want.sum())
    head = model.get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    for param in head.parameters():
        param.ds_id = 0  # looks partitioned; the weight itself stays whole (one process)
    asked = []
    monkeypatch.setattr(collectives, "all_reduce",
                        lambda values, op="sum": asked.append((values, op)) or [max(values[0], other_rank_chunks)])
    torch.manual_seed(0)
    got = run_fast(model, batch, 2, with_entropy=True)["logps"]
    mine = -(-batch.target_ids.shape[0] // 2)
    assert asked == [([float(mine)], "max")]
    assert len(calls) == max(mine, other_rank_chunks)
    assert sum(calls) == batch.target_ids.shape[0] and calls.count(0) == max(0, other_rank_chunks - mine)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert_same_grads(grads_of(model, got.sum()), want_grads)
    calls.clear()
    del head.weight.ds_id
    run_fast(model, batch, 2, with_entropy=True)
    assert len(calls) == mine and len(asked) == 1  # not partitioned: no collective, its own count
