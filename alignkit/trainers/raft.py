"""RAFT, reward-ranked fine-tuning (Dong et al. 2023), in ReST-style rounds (Gulcehre et al. 2023):
best-of-K rejection sampling by a reward, then SFT on the winners, iterated.

The run's steps are cut into ``rl.rounds`` rounds of nearly equal length. A round starts by sampling
(no grad) ``rl.num_generations`` (K) replies with the current policy for every prompt its steps will
train on: this rank's share of each step's prompts (``rollout.prompt_schedule``), step by step with
that step's seed. The reward mix scores them and each prompt keeps its best reply (``select_best``:
the highest reward, the lowest sample index among ties; with ``rl.raft_min_reward`` only if that
reward is >= it, else the prompt is dropped). The round then trains the registered ``sft`` loss
(token-mean NLL of the reply tokens, the prompt masked) on the winners: step j of the round takes
the next ``batch_size / world`` winners of this rank's pool, cycling, so without drops every step
trains on its own prompts' winners and dropped prompts are replaced by repeats of kept winners.
The next round samples from the policy this one ends with.

Each row logs the step's samples (``reward/mean`` and each reward part over all K replies,
``reward/winners`` over the kept winners, ``kept_fraction``) beside the SFT ``loss`` and
``logps/chosen``; each round prints how many prompts it kept and dropped. A rank left without a
winner in a round trains on its best replies with the loss scaled by 0 (every rank must run the same
forwards and backwards for DeepSpeed's collectives) and says so. Left out: RAFT's reward-model
training, extra epochs over a round's winners, a threshold that rises per round (ReST's Improve
steps), a KL term, and an exact resume mid-round (the rest of the round is resampled with the
resumed policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.data.batch import TokenizedGroup
from alignkit.trainers import common, loop, rollout
from alignkit.trainers.preference import _token_shares, sequence_logps
from alignkit.trainers.reference import NoReference


@dataclass
class Round:
    """One round's samples (this rank): per step its ``SampledBatch`` and best index per prompt."""

    first: int  # the first step these samples serve
    last: int
    sampled: dict[int, rollout.SampledBatch]
    best: dict[int, list[int | None]]  # per step, per prompt: the winner's sample index, None = dropped
    winners: list[TokenizedGroup]  # K=1 groups to train on, in step order
    fallback: list[TokenizedGroup]  # every prompt's best reply regardless of the threshold (trained with loss x 0)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Rounds of best-of-K sampling by reward, then SFT on the winners: ``{"exit_code": ...}``."""
    objective = objective_from_cfg(cfg.loss)  # sft (checked at compose time)

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data = setup.run, setup.data
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    starts = round_starts(setup.steps, run.rl.rounds)
    threshold = run.rl.raft_min_reward
    run.print(f"  x {run.rl.num_generations} samples, the best kept per prompt"
              f"{'' if threshold is None else f' if its reward >= {threshold}'}; {len(starts)} round(s) "
              f"starting at steps {starts}")
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    generator = rollout.generation_engine(run, policy, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)
    per_rank, micro = run.trainer.batch_size // run.world, run.trainer.micro_batch_size  # this rank's winners/step
    pad_id = tokenizer.pad_token_id
    current: Round | None = None

    for step in training:
        if current is None or step.number > current.last:  # a round starts (or a resumed run re-enters one)
            policy.eval()
            current = sample_round(run, generator, tokenizer, data.train, reward_mix, step.number,
                                   round_end(starts, step.number, setup.steps))
            policy.train()
        learn = bool(current.winners)
        pool = current.winners or current.fallback
        offset = (step.number - current.first) * per_rank
        groups = [pool[(offset + i) % len(pool)] for i in range(per_rank)]
        batches = [common.collate_groups(groups[i : i + micro], run.data, pad_id).to(run.device)
                   for i in range(0, per_rank, micro)]
        shares = _token_shares(batches, run)  # the step optimises the token mean over the global batch
        for batch, share in zip(batches, shares):
            loss, metrics = objective(sequence_logps(policy, NoReference(), batch, objective,
                                                     objective.needs_token_logps))
            # no winner on this rank: the same collectives, no update from it
            if not step.update(policy, loss * (share if learn else 0.0), {"loss": loss, **metrics} if learn else None,
                               tokens=batch.num_real_tokens() if learn else 0):
                return training.stop_nonfinite(step)
        sampled, best = current.sampled[step.number], current.best[step.number]
        metrics = {**rollout.reward_metrics(sampled), **winner_metrics(sampled, best, run),
                   "round": float(sum(s <= step.number for s in starts))}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


def round_starts(steps: int, rounds: int) -> list[int]:
    """The first step of each round: ``rounds`` stretches of nearly equal length (at most one per step)."""
    rounds = max(1, min(rounds, steps))
    return [1 + r * steps // rounds for r in range(rounds)]


def round_end(starts: list[int], step: int, steps: int) -> int:
    """The last step of the round ``step`` belongs to."""
    later = [s for s in starts if s > step]
    return later[0] - 1 if later else steps


def select_best(rewards: list[list[float]], min_reward: float | None = None) -> list[int | None]:
    """Per prompt, the index of its best reply: the highest reward, the lowest index among ties;
    ``None`` (dropped) when that reward is below ``min_reward`` or every reward is NaN."""
    best: list[int | None] = []
    for group in rewards:
        scored = [(r, -i) for i, r in enumerate(group) if not math.isnan(r)]
        top = max(scored, default=None)
        keep = top is not None and (min_reward is None or top[0] >= min_reward)
        best.append(-top[1] if keep else None)
    return best


def group_rewards(sampled: rollout.SampledBatch) -> list[list[float]]:
    """The flat group-major rewards of a sampled batch as one list per prompt."""
    out, offset = [], 0
    for group in sampled.groups:
        out.append(sampled.rewards[offset : offset + group.group_size].tolist())
        offset += group.group_size
    return out


def winner_groups(sampled: rollout.SampledBatch, best: list[int | None]) -> list[TokenizedGroup]:
    """The K=1 groups (prompt + its winning reply) of the prompts that kept one."""
    return [replace(group, completion_ids=[group.completion_ids[b]],
                    completion_train_mask=[group.completion_train_mask[b]], scores=None,
                    example_id=f"{group.example_id}/raft")
            for group, b in zip(sampled.groups, best) if b is not None]


@torch.no_grad()
def sample_round(run: common.Run, generator: Any, tokenizer: Any, prompts: list[TokenizedGroup],
                 reward_mix: rollout.CombinedReward, first: int, last: int) -> Round:
    """Sample, score and select for steps ``first..last`` (this rank's prompts); print kept/dropped."""
    threshold = run.rl.raft_min_reward
    sampled, best, winners, fallback = {}, {}, [], []
    for step in range(first, last + 1):
        batch = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, prompts, step - 1),
                                      reward_mix, run.generation, num_samples=run.rl.num_generations,
                                      seed=rollout.seed_for(run, step))
        sampled[step], best[step] = batch, select_best(group_rewards(batch), threshold)
        winners += winner_groups(batch, best[step])
        fallback += winner_groups(batch, select_best(group_rewards(batch)))
    kept, total, empty = common.all_reduce_values(
        [float(len(winners)), float(len(fallback)), float(not winners)], run)
    why = "" if threshold is None else f" (best reward below rl.raft_min_reward={threshold})"
    run.print(f"round at steps {first}-{last}: {int(kept)} of {int(total)} prompts kept, "
              f"{int(total - kept)} dropped{why}")
    if empty:
        run.print(f"[yellow]{int(empty)} process(es) kept no prompt this round: they train with the loss x 0 "
                  "(no update from them)[/]")
    return Round(first, last, sampled, best, winners, fallback)


def winner_metrics(sampled: rollout.SampledBatch, best: list[int | None], run: common.Run) -> dict[str, float]:
    """``kept_fraction`` and ``reward/winners`` (mean reward of the kept winners) of one step, over every rank."""
    rewards = [group[b] for group, b in zip(group_rewards(sampled), best) if b is not None]
    kept, prompts, total = common.all_reduce_values([float(len(rewards)), float(len(best)), float(sum(rewards))], run)
    out = {"kept_fraction": kept / max(prompts, 1.0)}
    if kept:
        out["reward/winners"] = total / kept
    return out
