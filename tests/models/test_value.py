"""ValueModel: per-position values, target gathering, layouts, LoRA, and seeding from a reward model."""

from __future__ import annotations

import torch

from alignkit.models.config import LoraConfig, ModelConfig
from alignkit.models.load import export_pretrained, load_causal_lm, load_reward_model
from alignkit.models.value import ValueModel, load_value_model
from hand_batches import LAYOUTS


def values_of(critic, batch, with_targets=True):
    return critic(
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_index if with_targets else None
    )


def test_values_per_position_and_at_targets():
    critic, _ = load_value_model(ModelConfig())
    batch = LAYOUTS["padded"]()
    full = values_of(critic, batch, with_targets=False)
    assert full.shape == batch.input_ids.shape and full.dtype == torch.float32
    at_targets = values_of(critic, batch)
    torch.testing.assert_close(at_targets, full.flatten()[batch.target_index])
    # the head is a linear map of the causal LM's final hidden states
    causal, _ = load_causal_lm(ModelConfig())
    hidden = causal.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    expected = hidden @ critic.value_head.weight[0] + critic.value_head.bias[0]
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)


def test_values_agree_across_layouts():
    critic, _ = load_value_model(ModelConfig())
    with torch.no_grad():
        padded, packed, shared = (values_of(critic, LAYOUTS[name]()) for name in ("padded", "packed", "prefix_shared"))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared, padded, rtol=0, atol=1e-5)


def test_value_head_trains_with_lora_backbone():
    critic, _ = load_value_model(ModelConfig(lora=LoraConfig(r=2)))
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert {"value_head.weight", "value_head.bias"} <= trainable
    assert all(n.startswith("value_head") or "lora_" in n for n in trainable)
    values_of(critic, LAYOUTS["prefix_shared"]()).sum().backward()
    assert critic.value_head.weight.grad.abs().sum() > 0


def test_critic_from_reward_folder_starts_from_the_reward_head(tmp_path):
    reward, tokenizer = load_reward_model(ModelConfig())
    with torch.no_grad():
        reward.score.weight.normal_(generator=torch.Generator().manual_seed(1))
    folder = export_pretrained(reward, tokenizer, tmp_path / "rm")
    critic, _ = load_value_model(ModelConfig(name_or_path=str(folder)))
    torch.testing.assert_close(critic.value_head.weight, reward.score.weight)
    # the critic's value at a sequence's last token is the reward model's score
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.")])
    with torch.no_grad():
        values = critic(ids, torch.ones_like(ids))
        score = reward(input_ids=ids).logits
    torch.testing.assert_close(values[0, -1], score[0, 0], rtol=1e-5, atol=1e-6)


def test_from_pretrained_model_without_score_gets_a_seeded_head():
    causal, _ = load_causal_lm(ModelConfig())
    a = ValueModel.from_pretrained_model(causal, seed=4)
    b = ValueModel.from_pretrained_model(causal, seed=4)
    assert torch.equal(a.value_head.weight, b.value_head.weight) and a.value_head.weight.abs().sum() > 0
