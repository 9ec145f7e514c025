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

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignkit.config.validate import loss_terms
from alignkit.data.batch import per_token_view
from alignkit.trainers import common, rollout
from alignkit.trainers.reference import forward_logps


def train(cfg: DictConfig, run_dir: Path) -> dict:
    run = common.start(cfg, run_dir)
    spec, _, hparams = loss_terms(cfg.loss)[0]
    from alignkit.data.pipeline import prepare_data
    from alignkit.models.load import load_causal_lm, load_tokenizer_for
    from alignkit.models.logprobs import TargetLogProbs
    from alignkit.rl.advantages import compute_advantages, frac_zero_std_groups
    from alignkit.rl.generation import engine_for_run

    tokenizer = load_tokenizer_for(cfg.model)  # gguf_file, trust_remote_code, revision
    data = prepare_data(OmegaConf.to_object(cfg.data), "prompt", tokenizer)
    run.print(f"[bold]data[/]: {data.stats}")  # sources, the eval set and its size, what was cut
    reward_mix = rollout.build_reward_mix(cfg, data, tokenizer)  # dry-calls the reward functions
    steps = common.total_steps(cfg, len(data.train))
    num_samples, mu = int(cfg.rl.num_generations), int(cfg.rl.ppo_epochs)
    common.describe_batches(run, groups=len(data.train), steps=steps, kind="prompts")
    run.print(f"  x {num_samples} samples = {cfg.trainer.batch_size * num_samples} completions/step, "
              f"{mu} optimizer step(s) per generation batch")

    model, tokenizer = load_causal_lm(OmegaConf.to_object(cfg.model), dtype=cfg.deepspeed.dtype)
    policy = common.train_engine(TargetLogProbs(model, chunk_size=int(cfg.model.logprob_chunk_size)), cfg, run,
                                 steps * mu)
    generator = engine_for_run(cfg, policy, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    reference = rollout.online_reference(cfg, run, policy, float(hparams.get("beta", 0.0)))
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    done = common.begin(run, policy, steps, evaluate=evaluation)

    for step in range(done + 1, steps + 1):
        tick, lr = time.time(), policy.get_lr()[0]  # the rate this step uses
        policy.eval()
        sampled = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, data.train, step - 1),
                                        reward_mix, cfg, num_samples=num_samples, seed=rollout.seed_for(cfg, run, step))
        groups_idx = rollout.group_index(sampled.groups)
        zero_std = float(frac_zero_std_groups(sampled.rewards, groups_idx))
        if cfg.rl.dynamic_sampling:
            sampled = refill(run, generator, tokenizer, data.train, reward_mix, sampled, step, num_samples)
            groups_idx = rollout.group_index(sampled.groups)
        advantages = compute_advantages(cfg.rl.advantage, sampled.rewards, groups_idx,
                                        **_advantage_hparams(cfg))
        policy.train()
        chunks = _chunks(sampled.groups, advantages, int(cfg.trainer.micro_batch_size), num_samples)
        old = _old_logps(policy, chunks, cfg, tokenizer.pad_token_id, run) if mu > 1 else None
        meter = common.MetricMeter()
        train_tokens = 0
        for epoch in range(mu):
            for i, (groups, adv) in enumerate(chunks):
                batch = common.collate_groups(groups, cfg, tokenizer.pad_token_id).to(run.device)
                out = forward_logps(policy, batch, with_entropy=True)
                inputs = rollout.rollout_inputs(out["logps"], batch, adv.to(run.device),
                                        None if old is None else old[i], reference)
                loss, metrics = spec.fn(inputs, **hparams)
                common.backward_step(policy, loss)
                entropy, mask = per_token_view(out["entropy"].detach().float(), batch)
                meter.add({"loss": loss, **metrics, "entropy": entropy[mask].mean()})
                train_tokens += batch.num_real_tokens()
        train_seconds = time.time() - tick - sampled.gen_seconds
        metrics = {**meter.means(), **rollout.reward_metrics(sampled), "frac_zero_std_groups": zero_std,
                   "train_tokens_per_s": train_tokens / max(train_seconds, 1e-9), "lr": lr}
        if common.after_step(run, policy, step, steps, common.all_reduce_mean(metrics, run),
                             evaluation):
            return {"exit_code": 0, "stopped": step}
    return common.complete(run, policy, tokenizer)


@torch.no_grad()
def _old_logps(policy, chunks, cfg, pad_id, run) -> list[torch.Tensor]:
    out = []
    for groups, _ in chunks:
        batch = common.collate_groups(groups, cfg, pad_id).to(run.device)
        out.append(rollout.slot_tokens(forward_logps(policy, batch)["logps"], batch))
    return out


def _chunks(groups, advantages: torch.Tensor, micro: int, num_samples: int):
    seq_adv = advantages if advantages.dim() == 1 else advantages.sum(-1)
    out = []
    for i in range(0, len(groups), micro):
        out.append((groups[i : i + micro], seq_adv[i * num_samples : (i + micro) * num_samples]))
    return out


def _advantage_hparams(cfg: DictConfig) -> dict:
    from alignkit.rl.advantages import advantage_hparams

    valid = advantage_hparams(cfg.rl.advantage)
    given = {"scale": cfg.rl.scale_rewards, "gamma": cfg.rl.gamma, "lam": cfg.rl.lam}
    return {k: v for k, v in given.items() if k in valid}


def refill(run, generator, tokenizer, prompts, reward_mix, sampled, step: int, num_samples: int):
    """DAPO dynamic sampling: replace zero-variance groups by groups of further prompts.

    The batch keeps its size (DeepSpeed's accumulation needs a fixed number of micro-batches): after
    ``rl.max_refill_rounds`` rounds any remaining slots keep zero-variance groups, whose advantage
    is zero and which contribute only to the KL term.
    """
    from alignkit.rl.advantages import zero_std_groups_mask

    cfg = run.cfg
    want = len(sampled.groups)
    groups, rewards, parts = _split_groups(sampled, num_samples)
    zero = zero_std_groups_mask(sampled.rewards, rollout.group_index(sampled.groups)).tolist()
    kept = [i for i in range(want) if not zero[i]]
    spare = [i for i in range(want) if zero[i]]
    pool = [(groups[i], rewards[i], {k: v[i] for k, v in parts.items()}) for i in kept]
    for round_ in range(1, int(cfg.rl.max_refill_rounds) + 1):
        if len(pool) >= want:
            break
        extra_prompts = rollout.prompt_schedule(run, prompts, step - 1 + round_ * 7919)
        more = rollout.sample_groups(generator, tokenizer, extra_prompts, reward_mix, cfg, num_samples=num_samples,
                                     seed=rollout.seed_for(cfg, run, step) + round_ * 104729)
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


def _split_groups(sampled, num_samples: int):
    n = len(sampled.groups)
    rewards = list(sampled.rewards.view(n, num_samples))
    parts = {k: list(v.view(n, num_samples)) for k, v in sampled.reward_parts.items()}
    return sampled.groups, rewards, parts
