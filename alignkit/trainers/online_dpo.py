"""Online / iterative DPO: sample from the current policy, rank with the judge (or any reward mix),
train any registered paired loss on the best-vs-worst pair of each prompt. With ``judge.kind`` set
(``alignkit/rl/judges.py``; OAIF) the samples are ranked by their win rates under that pairwise judge
instead of the rewards (which are still computed and logged).

One step: this rank's prompts -> ``rl.num_generations`` (>= 2) samples each -> rewards -> pair
the best and the worst sample of each prompt (groups whose samples all tie give no pair) ->
micro-batches of pairs -> the paired objective with the reference -> one optimizer step.
Iterative rounds: ``rl.rounds`` equal stretches of the run; with
``rl.update_reference_each_round`` the reference becomes the current policy at each round start.

The number of micro-batches per step is fixed (DeepSpeed counts them): missing pairs are filled by
repeating this rank's valid pairs. A rank with no valid pair still runs the same micro-batches on
its tied pairs with the loss scaled by 0: under ZeRO-3 every forward and backward gathers
parameters collectively, so all ranks must run them (a loss built without a forward cannot serve).
With LoRA the reference is the adapter-disabled base until the first round ends, then the policy
with a saved copy of its adapter (``AdapterSnapshotReference``). Left out: reference updates
under ZeRO-3 (the frozen copy would need a gathered copy; refused).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.errors import ConfigError
from alignkit.data.batch import TokenizedGroup
from alignkit.rl import judges
from alignkit.trainers import common, loop, rollout
from alignkit.trainers.preference import sequence_logps
from alignkit.trainers.reference import ModuleReference


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Online DPO: best-vs-worst pairs of the policy's own samples, any paired loss: ``{"exit_code": ...}``."""
    objective = objective_from_cfg(cfg.loss)

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data, rl = setup.run, setup.data, setup.run.rl
    if objective.view != "pairwise" or rl.num_generations < 2:  # before any model loads
        raise ConfigError("online DPO needs a pairwise loss (e.g. loss=dpo) and rl.num_generations >= 2.")
    if rl.update_reference_each_round and rl.rounds > 1 and run.deepspeed.zero_stage == 3:
        raise ConfigError("rl.update_reference_each_round is not supported under ZeRO-3 yet; use zero2 or rounds=1.")
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    judge = judges.build_judge(run, tokenizer)  # judge.kind: a pairwise judge ranks the samples (OAIF); null: rewards
    generator = rollout.generation_engine(run, policy, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    if objective.needs_reference and run.model.lora.r > 0 and rl.update_reference_each_round:
        reference = AdapterSnapshotReference(policy)  # LoRA: the reference moves to a saved copy of the adapter
    else:
        reference = rollout.online_reference(run, policy, beta=1.0 if objective.needs_reference else 0.0)
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)
    round_length = max(1, setup.steps // max(1, rl.rounds))
    micro, pad_id = run.trainer.micro_batch_size, tokenizer.pad_token_id

    for step in training:
        if rl.update_reference_each_round and step.number > 1 and (step.number - 1) % round_length == 0:
            sync_reference(reference, policy)
            run.print(f"round {(step.number - 1) // round_length + 1}: reference <- current policy")
        policy.eval()
        sampled = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, data.train, step.number - 1),
                                        reward_mix, run.generation, num_samples=rl.num_generations,
                                        seed=rollout.seed_for(run, step.number))
        pairs = best_vs_worst(sampled, None if judge is None else judges.win_rates(judge, sampled, tokenizer))
        if not pairs:  # said, not silent: no update this step (metric pairs=0, no loss logged)
            run.print(f"step {step.number}: no pair: every prompt's samples tied on reward (this rank), "
                      "no update from them")
        policy.train()
        for chunk in fill_chunks(pairs or best_vs_worst(sampled, keep_ties=True), len(sampled.groups), micro):
            batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
            loss, metrics = objective(sequence_logps(policy, reference, batch, objective, objective.needs_token_logps))
            # tied pairs: the same forward and collectives, scaled to no update and not reported
            update = (loss, {"loss": loss, **metrics}) if pairs else (loss * 0.0, None)
            if not step.update(policy, *update, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        metrics = {**rollout.reward_metrics(sampled), "pairs": float(len(pairs))}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


def best_vs_worst(sampled: rollout.SampledBatch, ranking: torch.Tensor | None = None,
                  keep_ties: bool = False) -> list[TokenizedGroup]:
    """One (chosen, rejected) group per prompt whose samples do not all tie (every prompt: ``keep_ties``),
    by ``ranking`` (a judge's win rates, ``[S]``) or else the rewards."""
    pairs = []
    offset = 0
    for group in sampled.groups:
        rewards = (sampled.rewards if ranking is None else ranking)[offset : offset + group.group_size]
        offset += group.group_size
        best, worst = int(rewards.argmax()), int(rewards.argmin())
        if rewards[best] <= rewards[worst] and not keep_ties:
            continue
        pairs.append(replace(
            group,
            completion_ids=[group.completion_ids[best], group.completion_ids[worst]],
            completion_train_mask=[group.completion_train_mask[best], group.completion_train_mask[worst]],
            scores=[float(rewards[best]), float(rewards[worst])],
            example_id=f"{group.example_id}/online",
        ))
    return pairs


def fill_chunks(pairs: list[TokenizedGroup], num_groups: int, micro: int) -> list[list[TokenizedGroup]]:
    """Exactly ceil(num_groups / micro) micro-batches of ``micro`` pairs (non-empty), repeating pairs to fill."""
    count = -(-num_groups // micro)
    filled = [pairs[i % len(pairs)] for i in range(count * micro)]
    return [filled[i * micro : (i + 1) * micro] for i in range(count)]


class AdapterSnapshotReference(ModuleReference):
    """The reference of a LoRA policy whose reference moves: the policy with its trainable (adapter)
    weights swapped, for the reference forward only, for a copy saved at the last ``sync()``.

    Before the first sync it is the adapter-disabled base (LoRA starts as the identity, so that is
    the starting policy). The copy holds only the trainable tensors (the adapter), and the swap is
    an exact in-place copy out and back, so the policy's weights, optimizer and gradients are
    untouched. ZeRO 0-2 (the caller refuses reference updates under ZeRO-3).
    """

    def __init__(self, policy: Any):
        from alignkit.models.load import disabled_adapter

        self.params = [p for p in policy.module.parameters() if p.requires_grad]
        self.snapshot: list[torch.Tensor] | None = None
        inner = common.hf_model(policy)
        super().__init__(policy, context=lambda: disabled_adapter(inner) if self.snapshot is None else self._swapped())

    @torch.no_grad()
    def sync(self) -> None:
        self.snapshot = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for p, saved in zip(self.params, self.snapshot):
                p.copy_(saved)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, current):
                    p.copy_(value)


@torch.no_grad()
def sync_reference(reference: ModuleReference, policy: Any) -> None:
    """The reference becomes the current policy: a saved adapter copy (LoRA) or the policy's weights
    copied into the frozen reference model (ZeRO 0-2)."""
    if isinstance(reference, AdapterSnapshotReference):
        reference.sync()
        return
    target = common.hf_model(reference.module)
    if target is common.hf_model(policy):
        raise RuntimeError("the reference is the policy itself; it cannot be moved to the current policy")
    target.load_state_dict(common.hf_model(policy).state_dict())
