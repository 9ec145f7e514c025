"""The reward-model runner: Bradley-Terry on paired data with a sequence-classification head.

Same loop shape as the preference trainer (data before model, one forward over the flattened
batch, loss, step, held-out accuracy, checkpoints, export), but the forward is ``RewardScorer``:
the decoder's hidden state at each completion's last token through the scalar ``score`` head.
The exported folder loads with ``AutoModelForSequenceClassification`` and serves as
``reward.model`` for the online runners. Left out: LoRA-specific heads (the head is trained fully).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.data.batch import Batch, TokenizedGroup
from alignkit.losses.registry import SequenceLogps
from alignkit.models.logprobs import model_dtype, prepare_attention_mask
from alignkit.trainers import common, loop
from alignkit.trainers.common import Run


class RewardScorer(torch.nn.Module):
    """Scalar score of every slot of a ``Batch``: hidden state of its last token -> ``score`` head."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                target_index: torch.Tensor, target_slot: torch.Tensor, num_slots: int) -> torch.Tensor:
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        hidden = base(input_ids=input_ids, attention_mask=prepare_attention_mask(attention_mask, model_dtype(base)),
                      position_ids=position_ids, use_cache=False).last_hidden_state
        last = torch.full((num_slots,), -1, dtype=torch.long, device=target_index.device)
        last = last.scatter_reduce(0, target_slot, target_index, reduce="amax")
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last + 1)  # the last token itself
        return self.model.score(rows).squeeze(-1).float()


def score_batch(engine: Any, batch: Batch) -> torch.Tensor:
    return engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  target_index=batch.target_index, target_slot=batch.target_slot,
                  num_slots=batch.num_slots).view(batch.num_groups, batch.group_size)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train a reward model (a scalar head) on preference pairs: ``{"exit_code": ...}``."""
    objective = objective_from_cfg(cfg.loss)
    setup = loop.setup(cfg, run_dir, "pairwise", kind="pairs")
    run, data = setup.run, setup.data
    return train_scorer(run, setup.steps, objective, data.train, data.eval)


def train_scorer(run: Run, steps: int, objective: Any, train: list[TokenizedGroup],
                 held_out: list[TokenizedGroup]) -> dict:
    """The scorer's loop (a scalar head on the last token, trained by ``objective`` on the groups'
    scores): the reward model's, and the pairwise preference model's on its both-order pairs."""
    from alignkit.models.load import load_reward_model

    model, tokenizer = load_reward_model(run.model, dtype=run.deepspeed.dtype)
    engine = common.train_engine(RewardScorer(model), run, steps)
    pad_id = tokenizer.pad_token_id
    evaluation = (lambda: evaluate(run, engine, objective, held_out, pad_id)) if held_out else None
    training = loop.begin(run, engine, steps, evaluate=evaluation)

    for step in training:
        for chunk in common.micro_chunks(run, train, step.number - 1):
            batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
            loss, metrics = objective(score_inputs(score_batch(engine, batch), batch))
            if not step.update(engine, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        if (stopped := training.end_step(step)) is not None:
            return stopped
    return training.complete(tokenizer)


def score_inputs(scores: torch.Tensor, batch: Batch) -> SequenceLogps:
    return SequenceLogps(logps=scores, lengths=batch.slot_lengths().float(), mask=batch.slot_mask, scores=batch.scores)


@torch.no_grad()
def evaluate(run: Run, engine: Any, objective: Any, groups: list[TokenizedGroup], pad_id: int) -> dict[str, float]:
    engine.eval()
    meter = common.MetricMeter()
    for chunk, counted in common.eval_chunks(run, groups):
        batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
        loss, metrics = objective(score_inputs(score_batch(engine, batch), batch))
        meter.add({"loss": loss, **metrics}, weight=batch.num_groups if counted else 0)
    engine.train()
    return meter.reduced(run)
