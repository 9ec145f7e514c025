"""XPO (Exploratory Preference Optimization): online DPO whose pairs are policy vs reference samples,
trained with a pairwise loss plus the exploration term (``loss=xpo``, ``alignkit/losses/online.py``).

One step: this rank's prompts -> ``rl.num_generations / 2`` samples each from the policy (the
generation engine) and as many from the reference (``alignkit.rl.mixture.GeometricMixture`` at
coefficient 1, the HF engine, another seed) -> rewards -> pair the j-th policy sample with the
j-th reference sample; the higher reward is chosen, a tie makes the policy's sample chosen
(TRL's ``model_scores >= ref_scores``; counted as ``ties``) -> micro-batches of the pairs of
``trainer.micro_batch_size`` prompts -> the objective, told which slot holds the reference's
sample (``SequenceLogps.from_reference``) -> one optimizer step.

Every prompt gives its pairs (ties included), so every rank runs the same micro-batches. The
reference is fixed (the LoRA-disabled base, or a frozen copy): no rounds (refused at compose time
with ``rl.rounds > 1``). The reference's samples go through the HF engine, so
``generation.engine=vllm`` is refused at compose time. Metrics: the policy samples' ``reward/*``,
``reward/reference`` (the reference samples' mean), ``chosen_from_policy`` and ``ties`` (shares of
pairs), ``gen_seconds`` of both samplings. Left out: TRL's EOS penalty.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.data.batch import TokenizedGroup
from alignkit.rl import judges
from alignkit.trainers import common, loop, rollout
from alignkit.trainers.preference import sequence_logps


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """XPO: policy-vs-reference sample pairs, a pairwise loss plus the exploration term: ``{"exit_code": ...}``."""
    objective = objective_from_cfg(cfg.loss)
    from alignkit.rl.mixture import OTHER_SAMPLER_SEED, mixture_engine

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data, half = setup.run, setup.data, setup.run.rl.num_generations // 2
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    judge = judges.build_judge(run, tokenizer)  # judge.kind: the judge picks chosen in each pair; null: rewards
    generator = rollout.generation_engine(run, policy, tokenizer)
    reference = rollout.online_reference(run, policy, beta=1.0)  # the LoRA-disabled base or a frozen copy
    reference_sampler = mixture_engine(policy, reference, tokenizer, coef=1.0)
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)
    micro, pad_id = run.trainer.micro_batch_size, tokenizer.pad_token_id

    for step in training:
        policy.eval()
        prompts, seed = rollout.prompt_schedule(run, data.train, step.number - 1), rollout.seed_for(run, step.number)
        own = rollout.sample_groups(generator, tokenizer, prompts, reward_mix, run.generation, num_samples=half,
                                    seed=seed)
        ref = rollout.sample_groups(reference_sampler, tokenizer, prompts, reward_mix, run.generation, num_samples=half,
                                    seed=seed + OTHER_SAMPLER_SEED)
        wins = judges.pair_preference(judge, own, ref, tokenizer) if judge is not None else None
        pairs = policy_vs_reference(own, ref, wins)  # per prompt, its `half` (pair, chosen is the policy's) in order
        policy.train()
        for i in range(0, len(pairs), micro * half):
            chunk = pairs[i : i + micro * half]
            batch = common.collate_groups([group for group, _ in chunk], run.data, pad_id).to(run.device)
            inputs = sequence_logps(policy, reference, batch, objective, objective.needs_token_logps)
            inputs.from_reference = reference_slots(chunk).to(inputs.logps.device)
            loss, metrics = objective(inputs)
            if not step.update(policy, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        metrics = {**rollout.reward_metrics(own), **pair_metrics(own, ref, pairs, wins),
                   "gen_seconds": own.gen_seconds + ref.gen_seconds}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


def policy_vs_reference(own: rollout.SampledBatch, ref: rollout.SampledBatch,
                        wins: torch.Tensor | None = None) -> list[tuple[TokenizedGroup, bool]]:
    """``(chosen, rejected)`` groups pairing the j-th policy sample of each prompt with its j-th reference
    sample, and whether the policy's is the chosen one: a higher reward or a tie, or with ``wins`` (a judge's
    ``[S]`` P(policy's beats reference's)) P >= 0.5."""
    pairs, offset = [], 0
    for mine, theirs in zip(own.groups, ref.groups):
        for j in range(mine.group_size):
            r_own, r_ref = float(own.rewards[offset + j]), float(ref.rewards[offset + j])
            own_chosen = r_own >= r_ref if wins is None else float(wins[offset + j]) >= 0.5
            slots = [(mine, r_own), (theirs, r_ref)] if own_chosen else [(theirs, r_ref), (mine, r_own)]
            pairs.append((replace(
                mine,
                completion_ids=[g.completion_ids[j] for g, _ in slots],
                completion_train_mask=[g.completion_train_mask[j] for g, _ in slots],
                scores=[r for _, r in slots],
                example_id=f"{mine.example_id}/xpo{j}",
            ), own_chosen))
        offset += mine.group_size
    return pairs


def reference_slots(pairs: list[tuple[TokenizedGroup, bool]]) -> torch.Tensor:
    """``[G, 2]`` bool, True on the slot that holds the reference's sample: rejected when the policy's won."""
    return torch.tensor([[not own_chosen, own_chosen] for _, own_chosen in pairs])


def pair_metrics(own: rollout.SampledBatch, ref: rollout.SampledBatch,
                 pairs: list[tuple[TokenizedGroup, bool]], wins: torch.Tensor | None = None) -> dict[str, float]:
    """The reference samples' mean reward, and the shares of pairs the policy won and that tied (equal rewards,
    or with a judge P = 0.5); with a judge also its mean P (``judge/policy_wins``)."""
    ties = (own.rewards == ref.rewards) if wins is None else (wins == 0.5)
    metrics = {
        "reward/reference": float(ref.rewards.mean()),
        "chosen_from_policy": sum(own_chosen for _, own_chosen in pairs) / max(len(pairs), 1),
        "ties": float(ties.float().mean()),
    }
    if wins is not None:
        metrics["judge/policy_wins"] = float(wins.mean())
    return metrics
