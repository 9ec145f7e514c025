"""The DRO runner (``loss=dro``, DRO-V of Richemond et al. 2024): a policy and a value network trained
offline on single-trajectory scalar-reward data ``(x, y, r)``.

  data in the ``scalar`` view (fails before any model loads) -> policy engine -> value engine (a copy
  of the policy's decoder plus a scalar head: PPO's ``ValueModel``, its own optimizer at
  ``rl.critic_lr``) -> reference strategy (the preference runner's: precomputed, separate, lora) ->
  steps: micro-batches -> policy log-probs and reference log-probs -> ``V(x)`` = the value model at
  the last prompt token -> ``dro`` twice on the same residual ``r - V(x) - tau*h``: with ``V``
  detached (backward through the policy) and with the log-probs detached (backward through the value)
  -> metrics, held-out eval, checkpoints (policy and value) -> export.

The two calls are the two partial gradients of the one objective ``1/2 (r - V - tau*h)^2`` (the
paper's Algorithm 1 with its stop-gradients; see ``alignkit/losses/dro.py``): the logged ``loss`` is
that objective, which both updates share. Causal attention makes the value at the last prompt token
a function of the prompt alone, so the value model reads the same collated rows as the policy.

Export: the policy to ``RUN_DIR/final`` like every runner, the value network to ``RUN_DIR/final_value``
(a one-label ``*ForTokenClassification`` folder, as PPO's ``final_critic``; read the value at the last
prompt token). Checkpoints hold both engines, so ``resume=auto`` continues both.

Left out: a value network sharing the policy's parameters (the paper found sharing worse [K?]), a
value read from another model than the policy's starting point (``model`` is used for both).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import loss_terms, objective_from_cfg
from alignkit.data.batch import Batch, TokenizedGroup
from alignkit.trainers import common, loop
from alignkit.trainers.common import Run
from alignkit.trainers.preference import build_reference, sequence_logps

VIEW = "scalar"


def train(cfg: DictConfig, run_dir: Path) -> dict:
    from alignkit.models.value import ValueModel, load_value_model

    objective = objective_from_cfg(cfg.loss)
    value_objective = value_side_objective(cfg.loss)
    setup = loop.setup(cfg, run_dir, VIEW)
    run, data = setup.run, setup.data
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    value_model, _ = load_value_model(run.model, dtype=run.deepspeed.dtype)
    value = common.train_engine(value_model, run, setup.steps, lr=run.rl.critic_lr)
    pad_id = tokenizer.pad_token_id
    reference = build_reference(run, policy, objective, data, pad_id, setup.steps)
    evaluation = (lambda: evaluate(run, policy, value, reference, objective, data.eval, pad_id)) if data.eval else None
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation, extra_engines={"value": value})

    for step in training:
        for chunk in common.micro_chunks(run, data.train, step.number - 1):
            batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
            seq = sequence_logps(policy, reference, batch, objective, objective.needs_token_logps)
            values = prompt_values(value, batch)
            loss, metrics = objective(replace(seq, values=values.detach()))  # d/d(policy)
            if not step.update(policy, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
            value_loss = value_objective(_value_side(seq, values))  # d/dV: the same residual, policy fixed
            if not step.update(value, value_loss, name="value_loss"):
                return training.stop_nonfinite(step)
        if (stopped := training.end_step(step)) is not None:
            return stopped
    common.export_final(run, value, tokenizer, "final_value", prepare=ValueModel.as_token_classifier)
    return training.complete(tokenizer)


def value_side_objective(loss: Any) -> Any:
    """The objective's loss alone (``sum_i w_i * loss_i`` over the loss terms, as ``WeightedLoss``
    sums them), for the value update; the policy update calls the objective itself, which also
    gives the metrics."""
    terms = loss_terms(loss)
    return lambda seq: sum(weight * spec.fn(seq, **hparams)[0] for spec, weight, hparams in terms)


def prompt_values(value: Any, batch: Batch) -> torch.Tensor:
    """``V(x)`` of every slot, ``[G, K]``: the value model at the position that predicts the slot's first
    target token, i.e. the last prompt token (targets are emitted left to right within a slot)."""
    first = torch.full((batch.num_slots,), torch.iinfo(torch.long).max, dtype=torch.long, device=batch.target_index.device)
    first = first.scatter_reduce(0, batch.target_slot, batch.target_index, reduce="amin")
    if bool((first == torch.iinfo(torch.long).max).any()):  # a slot without targets (the collator never emits one)
        raise ValueError("dro: a completion without a target token has no last prompt position to read V(x) at")
    out = value(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                target_index=first)
    return out.float().view(batch.num_groups, batch.group_size)


def _value_side(seq: Any, values: torch.Tensor) -> Any:
    detached = {name: getattr(seq, name).detach() for name in ("logps", "token_logps") if getattr(seq, name) is not None}
    return replace(seq, values=values, **detached)


@torch.no_grad()
def evaluate(run: Run, policy: Any, value: Any, reference: Any, objective: Any, groups: list[TokenizedGroup],
             pad_id: int) -> dict[str, float]:
    """Held-out DRO loss and metrics (the residual, the value, the rewards)."""
    policy.eval()
    value.eval()
    meter = common.MetricMeter()
    for chunk, counted in common.eval_chunks(run, groups):
        batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
        seq = sequence_logps(policy, reference, batch, objective, objective.needs_token_logps)
        loss, metrics = objective(replace(seq, values=prompt_values(value, batch)))
        meter.add({"loss": loss, **metrics}, weight=batch.num_groups if counted else 0)
    policy.train()
    value.train()
    return meter.reduced(run)
