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
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from alignkit.config.validate import objective_from_cfg
from alignkit.trainers import common, rollout
from alignkit.trainers.preference import _token_shares, sequence_logps
from alignkit.trainers.reference import NoReference


@dataclass
class Round:
    """One round's samples (this rank): per step its ``SampledBatch`` and best index per prompt."""

    first: int  # the first step these samples serve
    last: int
    sampled: dict[int, rollout.SampledBatch]
    best: dict[int, list[int | None]]  # per step, per prompt: the winner's sample index, None = dropped
    winners: list  # K=1 groups to train on, in step order
    fallback: list  # every prompt's best reply regardless of the threshold (trained with loss x 0)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    run = common.start(cfg, run_dir)
    objective = objective_from_cfg(cfg.loss)  # sft (checked at compose time)
    from alignkit.data.pipeline import prepare_data
    from alignkit.models.load import load_causal_lm, load_tokenizer_for
    from alignkit.models.logprobs import TargetLogProbs
    from alignkit.rl.generation import engine_for_run

    tokenizer = load_tokenizer_for(cfg.model)  # gguf_file, trust_remote_code, revision
    data = prepare_data(OmegaConf.to_object(cfg.data), "prompt", tokenizer)
    run.print(f"[bold]data[/]: {data.stats}")  # sources, the eval set and its size, what was cut
    reward_mix = rollout.build_reward_mix(cfg, data, tokenizer)  # dry-calls the reward functions
    steps = common.total_steps(cfg, len(data.train))
    starts = round_starts(steps, int(cfg.rl.rounds))
    threshold = cfg.rl.raft_min_reward
    common.describe_batches(run, groups=len(data.train), steps=steps, kind="prompts")
    run.print(f"  x {cfg.rl.num_generations} samples, the best kept per prompt"
              f"{'' if threshold is None else f' if its reward >= {threshold}'}; {len(starts)} round(s) "
              f"starting at steps {starts}")
    model, tokenizer = load_causal_lm(OmegaConf.to_object(cfg.model))
    policy = common.train_engine(TargetLogProbs(model, chunk_size=int(cfg.model.logprob_chunk_size)), cfg, run, steps)
    generator = engine_for_run(cfg, policy, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    done = common.begin(run, policy, steps, evaluate=evaluation)
    per_rank, micro, pad_id = int(cfg.trainer.batch_size) // run.world, int(cfg.trainer.micro_batch_size), \
        tokenizer.pad_token_id  # per_rank: this rank's prompts (winners) per step
    current: Round | None = None

    for step in range(done + 1, steps + 1):
        tick, lr = time.time(), policy.get_lr()[0]  # the rate this step uses
        if current is None or step > current.last:  # a round starts (or a resumed run re-enters one)
            policy.eval()
            last = round_end(starts, step, steps)
            current = sample_round(run, generator, tokenizer, data.train, reward_mix, step, last)
            policy.train()
        learn = bool(current.winners)
        pool = current.winners or current.fallback
        offset = (step - current.first) * per_rank
        groups = [pool[(offset + i) % len(pool)] for i in range(per_rank)]
        batches = [common.collate_groups(groups[i : i + micro], cfg, pad_id).to(run.device)
                   for i in range(0, per_rank, micro)]
        shares = _token_shares(batches, run)  # the step optimises the token mean over the global batch
        meter = common.MetricMeter()
        for batch, share in zip(batches, shares):
            loss, metrics = objective(sequence_logps(policy, NoReference(), batch, objective,
                                                     objective.needs_token_logps))
            common.backward_step(policy, loss * (share if learn else 0.0))  # no winner: same collectives, no update
            if learn:
                meter.add({"loss": loss, **metrics})
        sampled, best = current.sampled[step], current.best[step]
        metrics = common.all_reduce_mean({**meter.means(), **rollout.reward_metrics(sampled), "lr": lr,
                                          "step_seconds": time.time() - tick}, run)
        metrics.update(winner_metrics(sampled, best, run), round=float(sum(s <= step for s in starts)))
        if common.after_step(run, policy, step, steps, metrics, evaluation):
            return {"exit_code": 0, "stopped": step}
    return common.complete(run, policy, tokenizer)


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


def winner_groups(sampled: rollout.SampledBatch, best: list[int | None]) -> list:
    """The K=1 groups (prompt + its winning reply) of the prompts that kept one."""
    return [replace(group, completion_ids=[group.completion_ids[b]],
                    completion_train_mask=[group.completion_train_mask[b]], scores=None,
                    example_id=f"{group.example_id}/raft")
            for group, b in zip(sampled.groups, best) if b is not None]


@torch.no_grad()
def sample_round(run, generator, tokenizer, prompts, reward_mix, first: int, last: int) -> Round:
    """Sample, score and select for steps ``first..last`` (this rank's prompts); print kept/dropped."""
    cfg = run.cfg
    threshold = None if cfg.rl.raft_min_reward is None else float(cfg.rl.raft_min_reward)
    sampled, best, winners, fallback = {}, {}, [], []
    for step in range(first, last + 1):
        batch = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, prompts, step - 1),
                                      reward_mix, cfg, num_samples=int(cfg.rl.num_generations),
                                      seed=rollout.seed_for(cfg, run, step))
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


def winner_metrics(sampled: rollout.SampledBatch, best: list[int | None], run) -> dict[str, float]:
    """``kept_fraction`` and ``reward/winners`` (mean reward of the kept winners) of one step, over every rank."""
    rewards = [group[b] for group, b in zip(group_rewards(sampled), best) if b is not None]
    kept, prompts, total = common.all_reduce_values([float(len(rewards)), float(len(best)), float(sum(rewards))], run)
    out = {"kept_fraction": kept / max(prompts, 1.0)}
    if kept:
        out["reward/winners"] = total / kept
    return out
