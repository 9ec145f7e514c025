"""Online / iterative DPO: sample from the current policy, rank with the judge (or any reward mix),
train any registered paired loss on the best-vs-worst pair of each prompt.

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
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignkit.config.validate import objective_from_cfg
from alignkit.errors import ConfigError
from alignkit.trainers import common, rollout
from alignkit.trainers.preference import sequence_logps
from alignkit.trainers.reference import ModuleReference


def train(cfg: DictConfig, run_dir: Path) -> dict:
    run = common.start(cfg, run_dir)
    objective = objective_from_cfg(cfg.loss)
    if objective.view != "pairwise" or int(cfg.rl.num_generations) < 2:
        raise ConfigError("online DPO needs a pairwise loss (e.g. loss=dpo) and rl.num_generations >= 2.")
    if cfg.rl.update_reference_each_round and int(cfg.rl.rounds) > 1 and int(cfg.deepspeed.zero_stage) == 3:
        raise ConfigError("rl.update_reference_each_round is not supported under ZeRO-3 yet; use zero2 or rounds=1.")
    from alignkit.data.pipeline import prepare_data
    from alignkit.models.load import load_causal_lm, load_tokenizer_for
    from alignkit.models.logprobs import TargetLogProbs
    from alignkit.rl.generation import engine_for_run

    tokenizer = load_tokenizer_for(cfg.model)  # gguf_file, trust_remote_code, revision
    data = prepare_data(OmegaConf.to_object(cfg.data), "prompt", tokenizer)
    run.print(f"[bold]data[/]: {data.stats}")  # sources, the eval set and its size, what was cut
    reward_mix = rollout.build_reward_mix(cfg, data, tokenizer)  # dry-calls the reward functions
    steps = common.total_steps(cfg, len(data.train))
    common.describe_batches(run, groups=len(data.train), steps=steps, kind="prompts")
    model, tokenizer = load_causal_lm(OmegaConf.to_object(cfg.model), dtype=cfg.deepspeed.dtype)
    policy = common.train_engine(TargetLogProbs(model, chunk_size=int(cfg.model.logprob_chunk_size)), cfg, run, steps)
    generator = engine_for_run(cfg, policy, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    if objective.needs_reference and int(cfg.model.lora.r) > 0 and cfg.rl.update_reference_each_round:
        reference = AdapterSnapshotReference(policy)  # LoRA: the reference moves to a saved copy of the adapter
    else:
        reference = rollout.online_reference(cfg, run, policy, beta=1.0 if objective.needs_reference else 0.0)
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    done = common.begin(run, policy, steps, evaluate=evaluation)
    round_length = max(1, steps // max(1, int(cfg.rl.rounds)))
    micro, pad_id = int(cfg.trainer.micro_batch_size), tokenizer.pad_token_id

    for step in range(done + 1, steps + 1):
        if cfg.rl.update_reference_each_round and step > 1 and (step - 1) % round_length == 0:
            sync_reference(reference, policy)
            run.print(f"round {(step - 1) // round_length + 1}: reference <- current policy")
        tick, lr = time.time(), policy.get_lr()[0]  # the rate this step uses
        policy.eval()
        sampled = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, data.train, step - 1),
                                        reward_mix, cfg, num_samples=int(cfg.rl.num_generations),
                                        seed=rollout.seed_for(cfg, run, step))
        pairs = best_vs_worst(sampled)
        if not pairs:  # said, not silent: no update this step (metric pairs=0, no loss logged)
            run.print(f"step {step}: no pair: every prompt's samples tied on reward (this rank), no update from them")
        policy.train()
        meter = common.MetricMeter()
        for chunk in fill_chunks(pairs or best_vs_worst(sampled, keep_ties=True), len(sampled.groups), micro):
            batch = common.collate_groups(chunk, cfg, pad_id).to(run.device)
            loss, metrics = objective(sequence_logps(policy, reference, batch, objective, objective.needs_token_logps))
            common.backward_step(policy, loss if pairs else loss * 0.0)  # tied pairs: same collectives, no update
            if pairs:
                meter.add({"loss": loss, **metrics})
        metrics = {**meter.means(), **rollout.reward_metrics(sampled), "pairs": float(len(pairs)),
                   "lr": lr, "step_seconds": time.time() - tick}
        if common.after_step(run, policy, step, steps, common.all_reduce_mean(metrics, run),
                             evaluation):
            return {"exit_code": 0, "stopped": step}
    return common.complete(run, policy, tokenizer)


def best_vs_worst(sampled: rollout.SampledBatch, keep_ties: bool = False) -> list:
    """One (chosen, rejected) group per prompt whose samples do not all tie (every prompt: ``keep_ties``)."""
    pairs = []
    offset = 0
    for group in sampled.groups:
        rewards = sampled.rewards[offset : offset + group.group_size]
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


def fill_chunks(pairs: list, num_groups: int, micro: int) -> list[list]:
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

    def __init__(self, policy):
        from alignkit.models.load import disabled_adapter

        self.params = [p for p in policy.module.parameters() if p.requires_grad]
        self.snapshot: list[torch.Tensor] | None = None
        inner = common.hf_model(policy)
        super().__init__(policy, context=lambda: disabled_adapter(inner) if self.snapshot is None else self._swapped())

    @torch.no_grad()
    def sync(self) -> None:
        self.snapshot = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def _swapped(self):
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
def sync_reference(reference, policy) -> None:
    """The reference becomes the current policy: a saved adapter copy (LoRA) or the policy's weights
    copied into the frozen reference model (ZeRO 0-2)."""
    if isinstance(reference, AdapterSnapshotReference):
        reference.sync()
        return
    target = common.hf_model(reference.module)
    if target is common.hf_model(policy):
        raise RuntimeError("the reference is the policy itself; it cannot be moved to the current policy")
    target.load_state_dict(common.hf_model(policy).state_dict())
