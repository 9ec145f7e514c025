"""The runner's per-token KL (``needs_token_kl``, TDPO) against a direct computation from full logits.

``preference.sequence_logps`` with a TDPO objective asks the reference for a ``ReferenceHead`` and
the policy's ``TargetLogProbs`` computes, chunk by chunk, KL(pi_ref || pi_theta) over the whole
vocabulary at every target and the reference's target log-probs. Here both are compared, with
their gradients, to full ``[B, L, V]`` logits of both tiny models (fp32, 1e-5 absolute; gradients
as in test_logprobs), in every layout and several chunk sizes, for a separate reference and for the
LoRA one (the policy with its adapter disabled, also inside backward's recomputation). Other losses
keep the fused LM head: the check counts its calls.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from alignkit.losses.combine import build_objective
from alignkit.models import logprobs
from alignkit.models.config import LoraConfig, ModelConfig
from alignkit.models.load import disabled_adapter, load_causal_lm
from alignkit.models.logprobs import TargetLogProbs
from alignkit.trainers.preference import sequence_logps
from alignkit.trainers.reference import ModuleReference

from hand_batches import LAYOUTS
from test_logprobs import ATOL, assert_same_grads, grads_of, tiny_model

TDPO = build_objective(["tdpo"])


def perturbed(model, seed: int = 1, std: float = 0.3):
    """The same architecture with every weight moved by noise: a reference that differs from the policy."""
    other = tiny_model()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param, source in zip(other.parameters(), model.parameters()):
            param.copy_(source + std * torch.randn(param.shape, generator=gen))
    return other


def full_target_log_probs(model, batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return torch.log_softmax(out.logits.float(), -1).flatten(0, 1)[batch.target_index]  # [N, V]


def direct(policy, reference, batch, reference_context=contextlib.nullcontext):
    """(seq_kl [G, K], ref sums [G, K], policy sums [G, K]) from full logits, summed per slot by hand."""
    policy_lp = full_target_log_probs(policy, batch)
    with torch.no_grad(), reference_context():
        ref_lp = full_target_log_probs(reference, batch)
    kl = (ref_lp.exp() * (ref_lp - policy_lp)).sum(-1)  # [N]
    picked_policy = policy_lp.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    picked_ref = ref_lp.gather(-1, batch.target_ids.unsqueeze(-1)).squeeze(-1)
    slots = range(batch.num_groups * batch.group_size)
    shape = (batch.num_groups, batch.group_size)
    return tuple(torch.stack([values[batch.target_slot == s].sum() for s in slots]).view(shape)
                 for values in (kl, picked_ref, picked_policy))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_token_kl_matches_full_logits(layout, chunk_size):
    policy = tiny_model()
    reference = perturbed(policy)
    batch = LAYOUTS[layout]()
    seq = sequence_logps(TargetLogProbs(policy, chunk_size), ModuleReference(TargetLogProbs(reference, chunk_size)),
                         batch, TDPO, need_tokens=False)
    weights = torch.tensor([[1.0, -0.7]])
    got_grads = grads_of(policy, (weights * seq.seq_kl).sum() + seq.logps.sum())

    want_kl, want_ref, want_logps = direct(policy, reference, batch)
    want_grads = grads_of(policy, (weights * want_kl).sum() + want_logps.sum())
    assert want_kl.min() > 0.1  # the reference differs: a real KL to match
    torch.testing.assert_close(seq.seq_kl.detach(), want_kl.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(seq.ref_logps, want_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(seq.logps.detach(), want_logps.detach(), rtol=0, atol=ATOL)
    assert not seq.ref_logps.requires_grad
    assert_same_grads(got_grads, want_grads)
    assert not any(p.grad is not None for p in reference.parameters())


def test_policy_as_its_own_reference_gives_zero_kl_and_ln2():
    policy = tiny_model()
    batch = LAYOUTS["prefix_shared"]()
    module = TargetLogProbs(policy, 3)
    seq = sequence_logps(module, ModuleReference(TargetLogProbs(tiny_model(), 3)), batch, TDPO, need_tokens=False)
    assert seq.seq_kl.abs().max().item() < 1e-6
    torch.testing.assert_close(seq.ref_logps, seq.logps.detach(), rtol=0, atol=ATOL)
    loss, _ = TDPO(seq)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_lora_reference_is_the_base_model_also_in_backward():
    torch.manual_seed(0)  # peft draws lora_A from the global RNG
    model, _ = load_causal_lm(ModelConfig(lora=LoraConfig(r=4, alpha=8.0)))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it change the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = LAYOUTS["packed"]()
    module = TargetLogProbs(model, 2)
    reference = ModuleReference(module, context=lambda: disabled_adapter(model))
    seq = sequence_logps(module, reference, batch, TDPO, need_tokens=True)
    got_grads = grads_of(model, seq.seq_kl.sum() - 0.5 * seq.logps.sum())

    want_kl, want_ref, want_logps = direct(model, model, batch, reference_context=lambda: disabled_adapter(model))
    want_grads = grads_of(model, want_kl.sum() - 0.5 * want_logps.sum())
    assert want_kl.min() > 1e-3
    torch.testing.assert_close(seq.seq_kl.detach(), want_kl.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(seq.ref_logps, want_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(seq.ref_token_logps.sum(-1), want_ref, rtol=0, atol=ATOL)
    assert all("lora_" in name for name in got_grads)
    assert_same_grads(got_grads, want_grads)


def test_other_losses_keep_the_fused_head_and_one_reference_forward(monkeypatch):
    calls = {"fused": 0, "head": 0}
    fused = logprobs.FusedHeadLogProbs.apply

    def counting(*args):
        calls["fused"] += 1
        return fused(*args)

    monkeypatch.setattr(logprobs.FusedHeadLogProbs, "apply", counting)
    original_head = ModuleReference.head
    monkeypatch.setattr(ModuleReference, "head", lambda self, b: calls.__setitem__("head", calls["head"] + 1)
                        or original_head(self, b))
    policy, batch = tiny_model(), LAYOUTS["padded"]()
    reference = ModuleReference(TargetLogProbs(perturbed(policy), 3))
    sequence_logps(TargetLogProbs(policy, 3), reference, batch, build_objective(["dpo"]), need_tokens=False)
    assert calls == {"fused": 2, "head": 0}  # policy and reference, both fused, no KL pass
    seq = sequence_logps(TargetLogProbs(policy, 3), reference, batch, TDPO, need_tokens=False)
    assert calls == {"fused": 2, "head": 1} and seq.seq_kl is not None


def test_equal_rows_give_exactly_zero_kl_at_large_logits():
    """Policy == reference: the KL is exactly 0 and the log-ratio too, also at logits of SmolLM2's size
    (normalising the reference with log_softmax instead shifted each row by ~1 ulp of its normaliser)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8192, 16, generator=gen) * 2
    hidden = torch.randn(64, 16, generator=gen) * 2
    ids = torch.randint(0, 8192, (64,), generator=gen)
    same_head = lambda h: torch.nn.functional.linear(h, weight).float()  # noqa: E731
    logps, kl, ref_logps = logprobs._target_stats(weight, hidden, ids, None, False, False, hidden.clone(), same_head)
    assert same_head(hidden).abs().max() > 20
    assert (kl == 0).all() and torch.equal(ref_logps, logps)
