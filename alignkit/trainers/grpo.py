"""GRPO and its variants (DAPO clipping, Dr. GRPO aggregation, GSPO ratios, RLOO / REINFORCE++ advantages).

One step: this rank's prompts -> G samples each (prompt prefilled once per group) -> rewards ->
group-relative advantages (``rl.advantage``) -> optional dynamic sampling (drop zero-variance
groups, refill) -> ``rl.ppo_epochs`` (mu) optimizer steps over micro-batches of groups, each a
single forward in the prefix-shared batch format -> metrics, held-out reward, checkpoints.

With mu = 1 the sampling policy is the current policy, so ``old_logps`` is the detached forward
itself (no recomputation); with mu > 1 it is computed once before the first update. The KL term
(``loss.beta`` > 0) needs a reference: the LoRA-disabled base when training LoRA, else a frozen copy;
beta = 0 loads none. ``token_mean`` aggregation averages within each micro-batch (DeepSpeed then
averages micro-batches), not over the whole step's tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.schema import RLConfig
from alignkit.config.validate import loss_terms
from alignkit.data.batch import TokenizedGroup, per_token_view
from alignkit.models.logprobs import forward_logps
from alignkit.trainers import common, loop, rollout
from alignkit.trainers.common import Run


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train ``cfg``'s rollout loss (``grpo`` and variants) with group-relative advantages: ``{"exit_code": ...}``."""
    spec, _, hparams = loss_terms(cfg.loss)[0]
    from alignkit.rl.advantages import compute_advantages, frac_zero_std_groups

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data, rl = setup.run, setup.data, setup.run.rl
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    num_samples, mu, micro = rl.num_generations, rl.ppo_epochs, run.trainer.micro_batch_size
    run.print(f"  x {num_samples} samples = {run.trainer.batch_size * num_samples} completions/step, "
              f"{mu} optimizer step(s) per generation batch")
    policy, tokenizer = loop.policy_engine(run, setup.steps * mu)
    generator = rollout.generation_engine(run, policy, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    # the KL term's reference, as the registry says for these hyper-parameters (grpo: beta != 0)
    reference = rollout.online_reference(run, policy, beta=1.0 if spec.reference_needed(hparams) else 0.0)
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)
    pad_id = tokenizer.pad_token_id

    for step in training:
        policy.eval()
        sampled = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, data.train, step.number - 1),
                                        reward_mix, run.generation, num_samples=num_samples,
                                        seed=rollout.seed_for(run, step.number))
        zero_std = float(frac_zero_std_groups(sampled.rewards, rollout.group_index(sampled.groups)))
        if rl.dynamic_sampling:
            sampled = refill(run, generator, tokenizer, data.train, reward_mix, sampled, step.number, num_samples)
        advantages = compute_advantages(rl.advantage, sampled.rewards, rollout.group_index(sampled.groups),
                                        **_advantage_hparams(rl))
        policy.train()
        chunks = _chunks(sampled.groups, advantages, micro, num_samples)
        old = _old_logps(policy, chunks, pad_id, run) if mu > 1 else None
        for _ in range(mu):
            for i, (groups, adv) in enumerate(chunks):
                batch = common.collate_groups(groups, run.data, pad_id).to(run.device)
                out = forward_logps(policy, batch, with_entropy=True)
                inputs = rollout.rollout_inputs(out["logps"], batch, adv.to(run.device),
                                                None if old is None else old[i], reference)
                loss, metrics = spec.fn(inputs, **hparams)
                entropy, mask = per_token_view(out["entropy"].detach().float(), batch)
                metrics = {"loss": loss, **metrics, "entropy": entropy[mask].mean()}
                if not step.update(policy, loss, metrics, tokens=batch.num_real_tokens()):
                    return training.stop_nonfinite(step)
        metrics = {**rollout.reward_metrics(sampled), "frac_zero_std_groups": zero_std}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


@torch.no_grad()
def _old_logps(policy: Any, chunks: list[tuple[list[TokenizedGroup], torch.Tensor]], pad_id: int,
               run: Run) -> list[torch.Tensor]:
    out = []
    for groups, _ in chunks:
        batch = common.collate_groups(groups, run.data, pad_id).to(run.device)
        out.append(rollout.slot_tokens(forward_logps(policy, batch)["logps"], batch))
    return out


def _chunks(groups: list[TokenizedGroup], advantages: torch.Tensor, micro: int,
            num_samples: int) -> list[tuple[list[TokenizedGroup], torch.Tensor]]:
    seq_adv = advantages if advantages.dim() == 1 else advantages.sum(-1)
    out = []
    for i in range(0, len(groups), micro):
        out.append((groups[i : i + micro], seq_adv[i * num_samples : (i + micro) * num_samples]))
    return out


def _advantage_hparams(rl: RLConfig) -> dict[str, Any]:
    from alignkit.rl.advantages import advantage_hparams

    valid = advantage_hparams(rl.advantage)
    given = {"scale": rl.scale_rewards, "gamma": rl.gamma, "lam": rl.lam}
    return {k: v for k, v in given.items() if k in valid}


def refill(run: Run, generator: Any, tokenizer: Any, prompts: list[TokenizedGroup], reward_mix: rollout.CombinedReward,
           sampled: rollout.SampledBatch, step: int, num_samples: int) -> rollout.SampledBatch:
    """DAPO dynamic sampling: replace zero-variance groups by groups of further prompts.

    The batch keeps its size (DeepSpeed's accumulation needs a fixed number of micro-batches): after
    ``rl.max_refill_rounds`` rounds any remaining slots keep zero-variance groups, whose advantage
    is zero and which contribute only to the KL term.
    """
    from alignkit.rl.advantages import zero_std_groups_mask

    want = len(sampled.groups)
    groups, rewards, parts = _split_groups(sampled, num_samples)
    zero = zero_std_groups_mask(sampled.rewards, rollout.group_index(sampled.groups)).tolist()
    kept = [i for i in range(want) if not zero[i]]
    spare = [i for i in range(want) if zero[i]]
    pool = [(groups[i], rewards[i], {k: v[i] for k, v in parts.items()}) for i in kept]
    for round_ in range(1, run.rl.max_refill_rounds + 1):
        if len(pool) >= want:
            break
        extra_prompts = rollout.prompt_schedule(run, prompts, step - 1 + round_ * 7919)
        more = rollout.sample_groups(generator, tokenizer, extra_prompts, reward_mix, run.generation,
                                     num_samples=num_samples,
                                     seed=rollout.seed_for(run, step) + round_ * 104729)
        zero = zero_std_groups_mask(more.rewards, rollout.group_index(more.groups)).tolist()
        g2, r2, p2 = _split_groups(more, num_samples)
        pool += [(g2[i], r2[i], {k: v[i] for k, v in p2.items()}) for i in range(len(g2)) if not zero[i]]
        sampled.gen_seconds += more.gen_seconds
        sampled.gen_tokens += more.gen_tokens
    pool = pool[:want] + [(groups[i], rewards[i], {k: v[i] for k, v in parts.items()}) for i in spare][: max(0, want - len(pool))]
    sampled.groups = [p[0] for p in pool]
    sampled.rewards = torch.cat([p[1] for p in pool])
    sampled.reward_parts = {k: torch.cat([p[2][k] for p in pool]) for k in sampled.reward_parts}
    return sampled


def _split_groups(sampled: rollout.SampledBatch, num_samples: int) -> tuple[list[TokenizedGroup], list, dict]:
    n = len(sampled.groups)
    rewards = list(sampled.rewards.view(n, num_samples))
    parts = {k: list(v.view(n, num_samples)) for k, v in sampled.reward_parts.items()}
    return sampled.groups, rewards, parts
