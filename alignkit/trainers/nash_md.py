"""Nash-MD (Nash Learning from Human Feedback, mirror descent): REINFORCE on the probability that the
policy's sample beats a sample of the geometric mixture of policy and reference, plus a KL term
(``loss=nash_md``, ``alignkit/losses/online.py``).

One step: this rank's prompts -> ``rl.num_generations / 2`` samples each from the policy (the
generation engine) and as many from the mixture ``pi^(1-m) * ref^m`` with ``m = rl.mixture_coef``
(``alignkit.rl.mixture.GeometricMixture``, the HF engine, another seed) -> rewards -> for the j-th
pair of each prompt the preference ``P`` that the policy's sample wins (``rl.preference``:
``sigmoid`` = ``sigmoid(r_policy - r_mixture)``, TRL's, which reads the rewards as Bradley-Terry
logits; ``hard`` = 1 for a higher reward, 0.5 for a tie, 0 for a lower one, the judge's verdict,
free of the reward's scale; with ``judge.kind`` set, the judge's P (``alignkit/rl/judges.py``), as TRL's
``judge(..., return_scores=True)``, and ``rl.preference`` is refused) -> micro-batches of the policy samples of ``trainer.micro_batch_size``
prompts with advantage ``P - 0.5`` -> the loss -> one optimizer step. Only the policy's samples are
trained on; the mixture's are scored only.

The reference is fixed (the LoRA-disabled base, or a frozen copy; none at ``rl.mixture_coef=0``
with ``loss.beta=0``), no rounds. ``generation.engine=vllm`` is refused at compose time (the
mixture runs through the HF engine). Metrics: the policy samples' ``reward/*``, ``reward/mixture``
(the mixture samples' mean), ``preference`` (mean P), ``entropy`` (per-token, as GRPO),
``gen_seconds`` of both samplings. Left out: TRL's per-epoch mixture schedules, its EOS penalty.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from alignkit.config.validate import loss_terms
from alignkit.data.batch import per_token_view
from alignkit.errors import ConfigError
from alignkit.models.logprobs import forward_logps
from alignkit.rl import judges
from alignkit.trainers import common, loop, rollout

PREFERENCES = ("sigmoid", "hard")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Nash-MD: REINFORCE on P(policy sample beats a mixture sample), plus the KL term: ``{"exit_code": ...}``."""
    spec, _, hparams = loss_terms(cfg.loss)[0]
    from alignkit.rl.mixture import OTHER_SAMPLER_SEED, mixture_engine

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data, rl = setup.run, setup.data, setup.run.rl
    half = rl.num_generations // 2
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    judge = judges.build_judge(run, tokenizer)  # judge.kind: the judge's P(policy beats mixture); null: rewards
    generator = rollout.generation_engine(run, policy, tokenizer)
    needs_reference = spec.reference_needed(hparams) or rl.mixture_coef > 0
    reference = rollout.online_reference(run, policy, beta=1.0 if needs_reference else 0.0)
    mixture = mixture_engine(policy, reference, tokenizer, rl.mixture_coef) if needs_reference else generator
    kl_reference = reference if spec.reference_needed(hparams) else rollout.NoReference()
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)
    micro, pad_id = run.trainer.micro_batch_size, tokenizer.pad_token_id

    for step in training:
        policy.eval()
        prompts, seed = rollout.prompt_schedule(run, data.train, step.number - 1), rollout.seed_for(run, step.number)
        own = rollout.sample_groups(generator, tokenizer, prompts, reward_mix, run.generation, num_samples=half,
                                    seed=seed)
        mixed = rollout.sample_groups(mixture, tokenizer, prompts, reward_mix, run.generation, num_samples=half,
                                      seed=seed + OTHER_SAMPLER_SEED)
        if judge is not None:
            probability = judges.pair_preference(judge, own, mixed, tokenizer)  # [S], S = prompts * half
        else:
            probability = preference(own.rewards, mixed.rewards, rl.preference)
        policy.train()
        for i in range(0, len(own.groups), micro):
            batch = common.collate_groups(own.groups[i : i + micro], run.data, pad_id).to(run.device)
            out = forward_logps(policy, batch, with_entropy=True)
            advantage = (probability[i * half : (i + micro) * half] - 0.5).to(run.device)
            loss, metrics = spec.fn(rollout.rollout_inputs(out["logps"], batch, advantage, None, kl_reference),
                                    **hparams)
            entropy, mask = per_token_view(out["entropy"].detach().float(), batch)
            metrics = {"loss": loss, **metrics, "entropy": entropy[mask].mean()}
            if not step.update(policy, loss, metrics, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        metrics = {**rollout.reward_metrics(own), "reward/mixture": float(mixed.rewards.mean()),
                   "preference": float(probability.mean()), "gen_seconds": own.gen_seconds + mixed.gen_seconds}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


def preference(policy_rewards: torch.Tensor, mixture_rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """P(the policy's sample beats the mixture's), per pair: ``sigmoid`` of the reward difference
    (TRL's) or ``hard`` (1 win, 0.5 tie, 0 loss)."""
    diff = policy_rewards.float() - mixture_rewards.float()
    if kind == "sigmoid":
        return torch.sigmoid(diff)
    if kind == "hard":
        return (diff > 0).float() + 0.5 * (diff == 0).float()
    raise ConfigError(f"rl.preference={kind!r} is not valid. Valid choices: {', '.join(PREFERENCES)}.")
