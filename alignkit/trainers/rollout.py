"""Sampling and scoring shared by the online runners (GRPO, PPO, online DPO, RAFT, XPO, Nash-MD).

``sample_groups`` takes this rank's prompts (prompt-only ``TokenizedGroup``s, K=0), samples G
completions per prompt with the policy, scores them with the reward mix, and returns the
groups filled with their completions (K=G) plus rewards. Groups never span ranks, so
group-relative statistics are local. ``prompt_schedule`` is the online analogue of
``common.step_groups``: the prompts of step ``s`` are a pure function of the seed and ``s``.
The functions take the run's typed sections (``run.generation``, ``run.deepspeed`` ...); ``build_reward_mix``
takes the Run (its rule mix also reads the free-form ``reward.options`` from ``run.cfg``).
Left out: asynchronous generation (the engines, HF and vLLM, are ``alignkit.rl.generation.engine_for_run``'s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from alignkit.config.schema import GenerationConfig, RewardConfig
from alignkit.data.batch import Batch, TokenizedGroup, decode_prompt, per_token_view
from alignkit.data.config import DataConfig
from alignkit.engine.config import DeepSpeedConfig
from alignkit.models.config import ModelConfig
from alignkit.losses.registry import RolloutLogps
from alignkit.trainers import common
from alignkit.trainers.reference import ModuleReference, NoReference


@dataclass
class SampledBatch:
    groups: list[TokenizedGroup]  # K = G completions each, train mask all True
    rewards: torch.Tensor  # [S] S = groups * G, group-major
    reward_parts: dict[str, torch.Tensor]  # per reward function, [S]
    finished: torch.Tensor  # [S] bool, ended with EOS
    gen_seconds: float
    gen_tokens: int


def build_reward_mix(run: common.Run, data: Any = None, tokenizer: Any = None) -> CombinedReward:
    """Rule rewards by name (``run.reward.fns``) plus, with ``reward.model``, a trained reward model and, with
    ``reward.prm``, a process reward model (each step scored, aggregated by ``reward.prm_aggregate``).

    With ``data`` (prepared prompts) every rule function is called once on the first record before
    the reward model (or anything else) loads, so a function that cannot serve fails here, named.
    The rule mix reads ``reward.options`` (free-form: no dataclass) from ``run.cfg``.
    """
    from alignkit.rewards.registry import RewardMix

    reward, mix = run.reward, None
    if reward.fns:
        mix = RewardMix.from_config(run.cfg)  # fns, weights, reward.options, generation.max_new_tokens
        first = (list(data.train[:1]) or list(data.eval[:1])) if data is not None else []
        if first and tokenizer is not None:
            columns = {k: v for k, v in first[0].extra.items() if k != "prompt"}
            from alignkit.rewards.registry import DRY_RUN_COMPLETION

            mix.dry_run(decode_prompt(first[0], tokenizer), columns, raw_prompt=first[0].extra.get("prompt"),
                        completion_ids=tokenizer.encode(DRY_RUN_COMPLETION, add_special_tokens=False))
    model = prm = None
    if reward.model:
        model = ModelReward(run.model, reward, run.deepspeed, run.data)
    if reward.prm:  # a process reward model: steps scored, aggregated (alignkit/rewards/process.py)
        from alignkit.rewards.process import load_process_reward

        prm = load_process_reward(reward.prm, run.model, run.data, run.deepspeed,
                                  separator=reward.prm_separator, how=reward.prm_aggregate)
    return CombinedReward(mix, model, reward.model_weight, prm, reward.prm_weight)


class ModelReward:
    """Scores (prompt ids, completion ids) with a reward model exported by ``recipe=rm_*``
    (``reward.model``), loaded as ``model`` says but from that folder and without LoRA."""

    def __init__(self, model: ModelConfig, reward: RewardConfig, deepspeed: DeepSpeedConfig, data: DataConfig) -> None:
        from alignkit.engine.collectives import accelerator_device
        from alignkit.models.load import load_reward_model
        from alignkit.trainers.reward import RewardScorer

        model_cfg = replace(model, name_or_path=reward.model, lora=replace(model.lora, r=0))
        scorer, tokenizer = load_reward_model(model_cfg, dtype=deepspeed.dtype)
        self.device = accelerator_device()  # the GPU of this rank when there is one
        self.scorer = RewardScorer(scorer.eval().requires_grad_(False)).to(self.device)
        self.pad_id, self.data = tokenizer.pad_token_id, data

    @torch.no_grad()
    def __call__(self, groups: list[TokenizedGroup]) -> list[float]:
        from alignkit.trainers.reward import score_batch

        scores = []
        for i in range(0, len(groups), 4):
            batch = common.collate_groups(groups[i : i + 4], self.data, self.pad_id).to(self.device)
            values = score_batch(self.scorer, batch)
            scores += values[batch.slot_mask].float().cpu().tolist()
        return scores


class CombinedReward:
    """``total = rule mix + model_weight * reward model + prm_weight * process reward model``; parts reported
    per source (``reward/model``, ``reward/prm``)."""

    def __init__(self, mix: Any, model: ModelReward | None, model_weight: float, prm: Any = None,
                 prm_weight: float = 1.0) -> None:
        self.mix, self.model, self.model_weight = mix, model, model_weight
        self.prm, self.prm_weight = prm, prm_weight

    def __call__(self, groups: list[TokenizedGroup], prompt_texts: list[str], texts: list[str],
                 columns: dict[str, list]) -> tuple[list[float], dict[str, list[float]]]:
        total, parts = [0.0] * len(texts), {}
        if self.mix is not None:
            ids = [list(c) for g in groups for c in g.completion_ids]
            total, parts = self.mix(prompt_texts, texts, **{**columns, "completion_ids": ids})
            total, parts = list(total), dict(parts)
        if self.model is not None:
            scores = self.model(groups)
            parts["model"] = scores
            total = [t + self.model_weight * s for t, s in zip(total, scores)]
        if self.prm is not None:  # the prompt as the data has it (a prompt record keeps it), one per completion
            raw = [g.extra.get("prompt", text) for g, text in zip(
                (g for g in groups for _ in g.completion_ids), prompt_texts)]
            scores = self.prm(raw, texts)
            parts["prm"] = scores
            total = [t + self.prm_weight * s for t, s in zip(total, scores)]
        return total, parts


def generation_engine(run: common.Run, policy: Any, tokenizer: Any) -> Any:
    """The run's generation engine over ``policy`` (``generation.engine``: hf | vllm, weights pushed after
    each optimizer step; ``generation.decode_dtype``), from its typed sections."""
    from alignkit.rl.generation import engine_for_run

    return engine_for_run(run.generation, policy, tokenizer, max_prompt_length=run.data.max_prompt_length,
                          seed=run.trainer.seed)


def prompt_schedule(run: common.Run, prompts: list[TokenizedGroup], step: int) -> list[TokenizedGroup]:
    """This rank's prompts for optimizer step ``step`` (0-based)."""
    indices = common.step_groups(len(prompts), step, run.trainer.batch_size, run.trainer.seed)
    return [prompts[i] for i in indices[run.rank :: run.world]]


@torch.no_grad()
def sample_groups(
    generator: Any,
    tokenizer: Any,
    prompts: list[TokenizedGroup],
    reward_mix: CombinedReward,
    generation: GenerationConfig,
    *,
    num_samples: int,
    seed: int,
    greedy: bool = False,
) -> SampledBatch:
    """``num_samples`` completions of each prompt sampled with ``generation`` (``run.generation``; greedy:
    temperature 0), scored by ``reward_mix``: the groups filled with them (K = ``num_samples``) and rewards."""
    tick = time.time()
    rollouts = generator.generate(
        [p.prompt_ids for p in prompts],
        num_samples=num_samples,
        max_new_tokens=generation.max_new_tokens,
        temperature=0.0 if greedy else generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        seed=seed,
    )
    gen_seconds = time.time() - tick
    by_prompt: dict[int, list] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt_index, []).append(r)
    groups, texts, prompt_texts, finished = [], [], [], []
    columns: dict[str, list] = {}
    for i, prompt in enumerate(prompts):
        samples = sorted(by_prompt[i], key=lambda r: r.sample_index)
        ids = [list(r.completion_ids) for r in samples]
        groups.append(replace(prompt, completion_ids=ids, completion_train_mask=[[True] * len(x) for x in ids]))
        prompt_text = decode_prompt(prompt, tokenizer)
        for r in samples:
            texts.append(tokenizer.decode(r.completion_ids, skip_special_tokens=True))
            prompt_texts.append(prompt_text)
            finished.append(bool(r.finished))
    for key in sorted({k for p in prompts for k in p.extra}):  # every column; None where a record lacks it
        columns[key] = [p.extra.get(key) for p, g in zip(prompts, groups) for _ in g.completion_ids]
    total, parts = reward_mix(groups, prompt_texts, texts, columns)
    return SampledBatch(
        groups=groups,
        rewards=torch.as_tensor(total, dtype=torch.float32),
        reward_parts={k: torch.as_tensor(v, dtype=torch.float32) for k, v in parts.items()},
        finished=torch.tensor(finished),
        gen_seconds=gen_seconds,
        gen_tokens=sum(len(r.completion_ids) for r in rollouts),
    )


def reward_metrics(sampled: SampledBatch) -> dict[str, float]:
    """The sampled batch's rewards (``reward/*``), lengths, and the seconds its sampling took (``gen_seconds``)."""
    r = sampled.rewards
    lengths = [len(ids) for g in sampled.groups for ids in g.completion_ids]
    out = {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
        "response_length": sum(lengths) / max(len(lengths), 1),
        "finished_fraction": float(sampled.finished.float().mean()),
        "gen_seconds": sampled.gen_seconds,
    }
    out.update({f"reward/{k}": float(v.nanmean()) for k, v in sampled.reward_parts.items()})  # NaN: not applicable
    return out


def group_index(groups: list[TokenizedGroup]) -> torch.Tensor:
    """``[S]``: the group of each completion of ``groups`` (group-major)."""
    return torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([g.group_size for g in groups]))


@torch.no_grad()
def evaluate_generations(run: common.Run, generator: Any, tokenizer: Any, prompts: list[TokenizedGroup],
                         reward_mix: CombinedReward) -> dict[str, float]:
    """Mean reward of greedy completions on held-out prompts (this rank's share, then averaged)."""
    t = run.trainer
    prompts = prompts[: t.max_eval_groups]
    size = t.eval_batch_size
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    meter = common.MetricMeter()
    for chunk, counted in common.rank_share(chunks, run.rank, run.world):
        sampled = sample_groups(generator, tokenizer, chunk, reward_mix, run.generation, num_samples=1,
                                seed=t.seed, greedy=True)
        meter.add({k: v for k, v in reward_metrics(sampled).items() if not k.startswith("gen_")},
                  weight=len(sampled.groups) if counted else 0)
    return meter.reduced(run)


def held_out_reward(run: common.Run, engine: Any, generator: Any, tokenizer: Any, prompts: list[TokenizedGroup],
                    reward_mix: CombinedReward) -> Callable[[], dict[str, float]] | None:
    """The evaluation callable of the online runners (None without held-out prompts)."""
    if not prompts:
        return None

    def evaluate() -> dict[str, float]:
        engine.eval()
        return evaluate_generations(run, generator, tokenizer, prompts, reward_mix)

    return evaluate


def seed_for(run: common.Run, step: int) -> int:
    """Sampling seed of (step, rank): different per rank and step, reproducible on resume."""
    return run.trainer.seed * 1_000_003 + step * run.world + run.rank


def slot_tokens(flat: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-target values ``[N]`` of a rollout batch as ``[S, T]`` rows, one per existing completion."""
    tokens, _ = per_token_view(flat.float(), batch)
    return tokens.flatten(0, 1)[batch.slot_mask.flatten()]


def online_reference(run: common.Run, policy: Any, beta: float) -> NoReference | ModuleReference:
    """The KL reference of the online runners: none at beta 0, the LoRA-disabled base, or a frozen copy."""
    if beta <= 0:
        return NoReference()
    from alignkit.models.load import disabled_adapter, load_causal_lm
    from alignkit.models.logprobs import TargetLogProbs

    if run.model.lora.r > 0:
        inner = common.hf_model(policy)
        return ModuleReference(policy, context=lambda: disabled_adapter(inner))
    model_cfg = replace(run.model, lora=replace(run.model.lora, r=0))
    model, _ = load_causal_lm(model_cfg, dtype=run.deepspeed.dtype)
    return ModuleReference(common.frozen_engine(TargetLogProbs(model), run.deepspeed))


def rollout_inputs(logps: torch.Tensor, batch: Batch, advantages: torch.Tensor, old: torch.Tensor | None,
                   reference: NoReference | ModuleReference) -> RolloutLogps:
    """Per-target log-probs of a collated rollout batch as the [S, T] tensors rollout losses take."""
    tokens = slot_tokens(logps, batch)
    mask = slot_tokens(torch.ones_like(logps, dtype=torch.float32), batch).bool()
    _, ref_flat = reference.logps(batch, with_tokens=True)
    ref = slot_tokens(ref_flat, batch) if ref_flat is not None else None
    return RolloutLogps(
        logps=tokens,
        old_logps=tokens.detach() if old is None else old,
        advantages=advantages[:, None].expand_as(tokens) * mask,
        mask=mask,
        ref_logps=ref,
    )


