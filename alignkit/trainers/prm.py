"""The process reward model runner (``runner=prm``, ``loss=prm``): a correct/incorrect head at each step's end.

Trains on step-labelled data (view ``stepwise``: a prompt, its solution as a list of steps, a label per
step; TRL's stepwise-supervision columns, or Math-Shepherd's ``ки`` tags with ``data.columns=
math_shepherd``) the way TRL's ``PRMTrainer`` does: token classification with 2 labels, each step's
label on its last token (step + ``data.step_separator``), cross-entropy over the labelled tokens
(``alignkit/data/stepwise.py`` for the tokens and where they differ from TRL's, ``losses/process.py``
for the loss and metrics). The forward is ``models.step_head.StepScorer`` (the decoder's hidden state at
each labelled token through the ``score`` head of an ``AutoModelForTokenClassification``).
``data.train_on_last_step_only=true`` trains on each solution's last step only (TRL's option); the
held-out pass always reads every step, as TRL tokenizes its eval set with every label.

The exported folder loads with ``AutoModelForTokenClassification`` (``id2label`` 0 incorrect, 1 correct)
and holds ``alignkit_prm.json`` (the step separator it was trained with); it serves as ``reward.prm`` for
GRPO/PPO (``alignkit.rewards.process``). Same loop shape as the reward runner: data before model,
micro-batches through ``Step.update``, held-out metrics, checkpoints, export. Left out: LoRA-specific
heads (the head is trained fully), soft labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.data.batch import Batch, TokenizedGroup
from alignkit.data.stepwise import STEP_LABELS
from alignkit.losses.process import StepLogits, last_steps
from alignkit.models.step_head import CLASS_NAMES, StepScorer, step_logits
from alignkit.trainers import common, loop
from alignkit.trainers.common import Run

SIDECAR = "alignkit_prm.json"  # in the exported folder: what the prm reward needs to split steps as in training


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train a process reward model on step-labelled data: ``{"exit_code": ...}``."""
    from alignkit.models.load import load_reward_model

    objective = objective_from_cfg(cfg.loss)
    setup = loop.setup(cfg, run_dir, "stepwise", kind="solutions")
    run, data = setup.run, setup.data
    model, tokenizer = load_reward_model(run.model, per_token=True, num_labels=2, dtype=run.deepspeed.dtype)
    model.config.id2label, model.config.label2id = dict(CLASS_NAMES), {v: k for k, v in CLASS_NAMES.items()}
    engine = common.train_engine(StepScorer(model), run, setup.steps)
    pad_id = tokenizer.pad_token_id
    evaluation = (lambda: evaluate(run, engine, objective, data.eval, pad_id)) if data.eval else None
    training = loop.begin(run, engine, setup.steps, evaluate=evaluation)

    for step in training:
        for chunk in common.micro_chunks(run, data.train, step.number - 1):
            batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
            inputs = step_inputs(step_logits(engine, batch), batch, chunk)
            if run.data.train_on_last_step_only:
                inputs = last_steps(inputs)
            loss, metrics = objective(inputs)
            if not step.update(engine, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        if (stopped := training.end_step(step)) is not None:
            return stopped
    result = training.complete(tokenizer)
    final = run.run_dir / "final"
    if run.rank == 0 and final.is_dir():
        (final / SIDECAR).write_text(json.dumps({"step_separator": run.data.step_separator}) + "\n")
    return result


def step_inputs(logits: torch.Tensor, batch: Batch, groups: list[TokenizedGroup]) -> StepLogits:
    """The loss inputs: one row per labelled step, its label from the group's ``step_labels`` (in target order)."""
    labels = [int(v) for group in groups for v in group.extra[STEP_LABELS]]
    if len(labels) != logits.shape[0]:
        raise RuntimeError(f"prm: {logits.shape[0]} labelled tokens in the batch but {len(labels)} step labels")
    solution = batch.target_slot // batch.group_size
    return StepLogits(logits=logits, labels=torch.tensor(labels, dtype=torch.long, device=logits.device),
                      solution=solution)


@torch.no_grad()
def evaluate(run: Run, engine: Any, objective: Any, groups: list[TokenizedGroup], pad_id: int) -> dict[str, float]:
    """Held-out loss and metrics over every labelled step (step metrics weighted by steps, first-error by solutions)."""
    engine.eval()
    meter = common.MetricMeter()
    for chunk, counted in common.eval_chunks(run, groups):
        batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
        inputs = step_inputs(step_logits(engine, batch), batch, chunk)
        loss, metrics = objective(inputs)
        first = {"prm/first_error_accuracy": metrics.pop("prm/first_error_accuracy")}
        meter.add({"loss": loss, **metrics}, weight=int(inputs.labels.numel()) if counted else 0)
        meter.add(first, weight=batch.num_groups if counted else 0)
    engine.train()
    return meter.reduced(run)
