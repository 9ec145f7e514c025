"""A process reward model's forward: the 2-class token head at each labelled step's last token.

``StepScorer`` wraps an ``AutoModelForTokenClassification`` with ``num_labels=2`` (what TRL's
PRMTrainer trains; ``models.load.load_reward_model(per_token=True, num_labels=2)``) and returns the
head's logits ``[N, 2]`` (incorrect, correct) at the batch's targets: a stepwise group's targets are
its labelled tokens (``data/stepwise.py``), and the hidden state read is the labelled token's own,
``target_index + 1`` (the collator lists the position before a target). The head is applied without
its dropout (TRL's ``PRMConfig.disable_dropout=True``). Used by the prm runner and, frozen, by the
``prm`` reward (``alignkit.rewards.process``). Left out: LoRA-specific heads (the head trains fully).
"""

from __future__ import annotations

import torch

from alignkit.models.logprobs import model_dtype, prepare_attention_mask

CLASS_NAMES = {0: "incorrect", 1: "correct"}  # written into the exported config's id2label


class StepScorer(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                target_index: torch.Tensor) -> torch.Tensor:
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        hidden = base(input_ids=input_ids, attention_mask=prepare_attention_mask(attention_mask, model_dtype(base)),
                      position_ids=position_ids, use_cache=False).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_index + 1)  # the labelled token itself
        return self.model.score(rows).float()


def step_logits(scorer: torch.nn.Module, batch) -> torch.Tensor:
    """``[N, 2]`` logits at every target of a collated ``Batch`` (in the batch's target order)."""
    return scorer(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  target_index=batch.target_index)
