"""The geometric mixture sampler (alignkit/rl/mixture.py) through the HF engine: its distribution is
softmax((1 - m) * policy_logits + m * reference_logits) at every position (checked against full
forwards of the two models, written here), m = 0 samples what the policy samples, m = 1 what the
reference samples, and the reference context wraps only the reference's forwards."""

from __future__ import annotations

import contextlib

import pytest
import torch

from alignkit.models.load import load_causal_lm
from alignkit.rl.generation import HFGenerationEngine
from alignkit.rl.mixture import GeometricMixture

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models():
    policy, tokenizer = load_causal_lm({"name_or_path": "tiny"})
    torch.manual_seed(1)
    reference, _ = load_causal_lm({"name_or_path": "tiny"})
    with torch.no_grad():  # a reference that differs from the policy
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval(), reference.eval(), tokenizer


PROMPTS = [[5, 17, 42, 9], [7, 3]]  # ragged: left padding and position ids are exercised


def _sample(model, tokenizer, seed=3, num_samples=2):
    return HFGenerationEngine(model, tokenizer).generate(PROMPTS, num_samples=num_samples, max_new_tokens=6,
                                                          temperature=1.0, seed=seed)


@torch.no_grad()
def test_mixture_logprobs_equal_the_mixed_full_forward(models):
    policy, reference, tokenizer = models
    coef = 0.3
    rollouts = _sample(GeometricMixture(policy, reference, coef), tokenizer)
    assert len(rollouts) == 4
    for r in rollouts:
        ids = torch.tensor([PROMPTS[r.prompt_index] + r.completion_ids])
        mixed = (1 - coef) * policy(ids).logits[0].float() + coef * reference(ids).logits[0].float()
        start = len(PROMPTS[r.prompt_index]) - 1
        expected = mixed.log_softmax(-1)[start:-1].gather(-1, ids[0, start + 1 :, None]).squeeze(-1)
        assert r.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
        # and it is neither model alone
        alone = policy(ids).logits[0].float().log_softmax(-1)[start:-1].gather(-1, ids[0, start + 1 :, None])
        assert not torch.allclose(alone.squeeze(-1), expected, atol=1e-3)


def test_coefficient_zero_samples_the_policy_and_one_the_reference(models):
    policy, reference, tokenizer = models
    own = [r.completion_ids for r in _sample(policy, tokenizer)]
    ref = [r.completion_ids for r in _sample(reference, tokenizer)]
    assert own != ref
    assert [r.completion_ids for r in _sample(GeometricMixture(policy, reference, 0.0), tokenizer)] == own
    assert [r.completion_ids for r in _sample(GeometricMixture(policy, reference, 1.0), tokenizer)] == ref


def test_reference_context_wraps_only_the_reference_forwards(models):
    policy, reference, tokenizer = models
    calls = {"inside": 0, "policy_inside": 0}
    inside = [False]

    @contextlib.contextmanager
    def context():
        inside[0] = True
        calls["inside"] += 1
        try:
            yield
        finally:
            inside[0] = False

    def spy(module, args, kwargs):
        calls["policy_inside"] += inside[0]

    handle = policy.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        _sample(GeometricMixture(policy, reference, 0.5, context), tokenizer)
    finally:
        handle.remove()
    assert calls["inside"] >= 2 and calls["policy_inside"] == 0


def test_mode_and_coefficient_range(models):
    policy, reference, _ = models
    mixture = GeometricMixture(policy, reference, 0.5)
    mixture.train(True)
    assert policy.training and not reference.training  # the reference stays in eval mode
    mixture.eval()
    assert not policy.training
    assert len(list(mixture.parameters())) == len(list(policy.parameters())) * 2
    assert len(list(GeometricMixture(policy, policy, 0.5).parameters())) == len(list(policy.parameters()))
    with pytest.raises(ValueError, match="mixture coefficient"):
        GeometricMixture(policy, reference, 1.5)
