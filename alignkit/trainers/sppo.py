"""SPPO, Self-Play Preference Optimization (Wu et al. 2024, arXiv 2405.00675), in rounds: each round
is one SPPO iteration t, whose samples come from pi_t and whose reference is pi_t.

The run's steps are cut into ``rl.rounds`` rounds of nearly equal length (``raft.round_starts``). A
round starts by moving the reference to the current policy (pi_t; at step 1 they already agree) and
sampling (no grad) ``rl.num_generations`` (K) replies per prompt with it for every step of the round
(this rank's share of each step's prompts, that step's seed, as RAFT). Each reply's win rate against
pi_t is estimated from its prompt's K samples: ``P(y_i > pi_t) = mean over j != i of P(y_i > y_j)``,
all K(K-1)/2 pairs compared by

* the judge when ``judge.kind`` is set (``alignkit/rl/judges.py``, ``judges.win_rates``): a
  ``pairwise`` preference model (PairRM-like, ``recipe=pm_*``), a ``reward_model``, an ``llm``, or a
  ``rule`` judge, whose P(a > b) is 1, 0 or 1/2 (a tie) from the reward functions;
* else the run's rewards: ``P(y_i > y_j) = sigmoid(r_i - r_j)``, as the reference code turns PairRM's
  scores into probabilities (``scripts/compute_prob.py``: ``1 / (1 + exp(s_j - s_i))``).

The loss (``loss=sppo``, ``alignkit/losses/sppo.py``) then regresses each trained reply's log-ratio
to pi_t on ``(P - 1/2) / beta``. Which replies (``rl.sppo_samples``): ``best_worst`` (default) the
highest and the lowest win rate of each prompt (the lowest index among ties; the worst is another
sample than the best), as the reference code (``scripts/compute_prob.py`` picks the argmax / argmin
of the PairRM scores, which order the samples as their win rates do, and trains ``loss_type=sppo``
on that pair with their win rates) and the paper's experiments; ``all`` every sample, the Monte-Carlo
form of Algorithm 1's expectation over y ~ pi_t (K forwards per prompt instead of 2).

Deliberate difference from the reference code: its win rate is the mean over all K samples *including
the reply itself* (its probability matrix's diagonal, sigmoid(0) = 1/2: ``sum(axis=1) / K``); here it
is the mean over the K - 1 others, an unbiased estimate of P(y > pi_t) (the K - 1 others are draws from
pi_t). The two differ only in scale: ``P_code - 1/2 = (K - 1) / K * (P - 1/2)``, so the code's run at
``beta`` is this one at ``beta * K / (K - 1)`` (K = 5, beta = 0.001: ``loss.beta=0.00125``).

Every prompt gives its trained group (ties included: a prompt whose samples all tie has targets 0,
which holds the policy at pi_t), so every rank runs the same micro-batches (``trainer.micro_batch_size``
prompts each). Rows log the step's samples (``reward/*`` over all K replies), ``win_rate/best`` and
``win_rate/worst`` (per-prompt extremes, averaged), ``ties`` (share of prompts whose samples all tie),
``round``, and the loss's ``kl``, ``win_rate``, ``sppo/residual``. With LoRA the reference is the
adapter-disabled base until the first round ends, then the policy with a saved copy of its adapter
(``online_dpo.AdapterSnapshotReference``). A resumed run re-enters its round by moving the reference to
the resumed policy and resampling the round's remaining steps with it (a fresh, shorter iteration).
Left out: ZeRO-3 (the reference moves: refused at compose time), a fixed reference
(``rl.update_reference_each_round=false`` is refused: SPPO's reference is the last iterate), extra
epochs over a round's samples, and the paper's prompt schedule (a new prompt set per iteration: here
the rounds draw from the one prompt set by the step schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import loss_terms
from alignkit.data.batch import TokenizedGroup
from alignkit.models.logprobs import forward_logps
from alignkit.rl import judges
from alignkit.trainers import common, loop, rollout
from alignkit.trainers.online_dpo import AdapterSnapshotReference, sync_reference
from alignkit.trainers.raft import round_end, round_starts

SAMPLE_CHOICES = ("best_worst", "all")


@dataclass
class StepSamples:
    """One step's samples (this rank), their win rates and what the loss trains on."""

    sampled: rollout.SampledBatch
    win_rates: torch.Tensor  # [S] group-major, as sampled.rewards
    groups: list[TokenizedGroup]  # per prompt: its (best, worst) pair or all its samples
    targets: torch.Tensor  # the win rate of each trained sequence, group-major over ``groups``


@dataclass
class Round:
    first: int  # the first step these samples serve
    last: int
    steps: dict[int, StepSamples]


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """SPPO rounds: K self-play samples, win rates against pi_t, the squared loss: ``{"exit_code": ...}``."""
    spec, _, hparams = loss_terms(cfg.loss)[0]  # sppo alone (checked at compose time)

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data, rl = setup.run, setup.data, setup.run.rl
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    starts = round_starts(setup.steps, rl.rounds)
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    judge = judges.build_judge(run, tokenizer)  # judge.kind: P(a > b) of a judge; null: sigmoid(r_a - r_b)
    run.print(f"  x {rl.num_generations} samples per prompt, win rates from "
              f"{f'judge.kind={run.judge.kind}' if judge is not None else 'the rewards, sigmoid(r_a - r_b)'}, "
              f"trained on {'each prompt best and worst' if rl.sppo_samples == 'best_worst' else 'every sample'}; "
              f"{len(starts)} round(s) starting at steps {starts}")
    generator = rollout.generation_engine(run, policy, tokenizer)  # generation.engine: hf | vllm
    if run.model.lora.r > 0:
        reference = AdapterSnapshotReference(policy)  # the adapter-disabled base, then saved adapter copies
    else:
        reference = rollout.online_reference(run, policy, beta=1.0)  # a frozen copy, moved each round
    evaluation = rollout.held_out_reward(run, policy, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)
    micro, pad_id = run.trainer.micro_batch_size, tokenizer.pad_token_id
    current: Round | None = None

    for step in training:
        if current is None or step.number > current.last:  # a round starts (or a resumed run re-enters one)
            if step.number > 1:
                sync_reference(reference, policy)  # pi_t: the policy the round samples from
            policy.eval()
            current = sample_round(run, generator, tokenizer, data.train, reward_mix, judge, step.number,
                                   round_end(starts, step.number, setup.steps))
            policy.train()
        samples, offset = current.steps[step.number], 0
        for i in range(0, len(samples.groups), micro):
            chunk = samples.groups[i : i + micro]
            size = sum(g.group_size for g in chunk)
            batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
            # the reference first: a LoRA reference swaps the adapter in place, which the policy's graph must not see
            pi_t = Computed(reference.logps(batch, with_tokens=True))
            out = forward_logps(policy, batch)
            centred = (samples.targets[offset : offset + size] - 0.5).to(run.device)  # P(y > pi_t) - 1/2
            offset += size
            loss, metrics = spec.fn(rollout.rollout_inputs(out["logps"], batch, centred, None, pi_t), **hparams)
            if not step.update(policy, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        metrics = {**rollout.reward_metrics(samples.sampled), **win_rate_metrics(samples),
                   "round": float(sum(s <= step.number for s in starts))}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


class Computed:
    """A reference whose log-probs of one batch are already computed (``ModuleReference.logps``'s result)."""

    def __init__(self, result: tuple[Any, Any]) -> None:
        self.result = result

    def logps(self, batch: Any, with_tokens: bool = False) -> tuple[Any, Any]:
        return self.result


def reward_win_rates(sampled: rollout.SampledBatch) -> torch.Tensor:
    """``[S]``: each sample's mean over its prompt's other samples of ``sigmoid(r_i - r_j)``."""
    if not bool(torch.isfinite(sampled.rewards).all()):
        raise ValueError("a reward is not finite (NaN or inf): SPPO's win rates sigmoid(r_i - r_j) need finite "
                         "rewards; check reward.fns (or set judge.kind)")
    out, offset = [], 0
    for group in sampled.groups:
        r = sampled.rewards[offset : offset + group.group_size].double()
        offset += group.group_size
        wins = torch.sigmoid(r[:, None] - r[None, :]).sum(dim=1) - 0.5  # less the diagonal, sigmoid(0)
        out.append(wins / max(group.group_size - 1, 1))
    return torch.cat(out).float() if out else torch.zeros(0)


def select(sampled: rollout.SampledBatch, win_rates: torch.Tensor, mode: str) -> tuple[list[TokenizedGroup], torch.Tensor]:
    """The groups the loss trains on and the win rate of each of their sequences: per prompt all its
    samples (``all``), or (``best_worst``) its highest win rate and, among the others, its lowest (the
    lowest index among ties)."""
    groups, targets, offset = [], [], 0
    for group in sampled.groups:
        p = win_rates[offset : offset + group.group_size].tolist()
        offset += group.group_size
        if mode == "all":
            groups.append(group)
            targets += p
            continue
        best = max(range(len(p)), key=lambda k: (p[k], -k))
        worst = min((k for k in range(len(p)) if k != best), key=lambda k: (p[k], k))
        groups.append(replace(
            group,
            completion_ids=[group.completion_ids[best], group.completion_ids[worst]],
            completion_train_mask=[group.completion_train_mask[best], group.completion_train_mask[worst]],
            scores=[p[best], p[worst]],
            example_id=f"{group.example_id}/sppo",
        ))
        targets += [p[best], p[worst]]
    return groups, torch.tensor(targets, dtype=torch.float32)


@torch.no_grad()
def sample_round(run: common.Run, generator: Any, tokenizer: Any, prompts: list[TokenizedGroup],
                 reward_mix: rollout.CombinedReward, judge: judges.Judge | None, first: int, last: int) -> Round:
    """Sample, judge and select for steps ``first..last`` (this rank's prompts) with the current policy."""
    steps = {}
    for number in range(first, last + 1):
        sampled = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, prompts, number - 1),
                                        reward_mix, run.generation, num_samples=run.rl.num_generations,
                                        seed=rollout.seed_for(run, number))
        win = reward_win_rates(sampled) if judge is None else judges.win_rates(judge, sampled, tokenizer)
        groups, targets = select(sampled, win, run.rl.sppo_samples)
        steps[number] = StepSamples(sampled, win, groups, targets)
    prompts_sampled = common.all_reduce_sum(float(sum(len(s.sampled.groups) for s in steps.values())), run)
    run.print(f"round at steps {first}-{last}: reference = the current policy; {int(prompts_sampled)} prompts x "
              f"{run.rl.num_generations} samples judged")
    return Round(first, last, steps)


def win_rate_metrics(samples: StepSamples) -> dict[str, float]:
    """Per-prompt highest and lowest win rate (averaged) and the share of prompts whose samples all tie."""
    best, worst, ties, offset = [], [], [], 0
    for group in samples.sampled.groups:
        p = samples.win_rates[offset : offset + group.group_size]
        offset += group.group_size
        best.append(float(p.max()))
        worst.append(float(p.min()))
        ties.append(float(bool((p == p[0]).all())))
    n = max(len(best), 1)
    return {"win_rate/best": sum(best) / n, "win_rate/worst": sum(worst) / n, "ties": sum(ties) / n}
