"""GKD: on-policy distillation of a student (the policy) from a frozen teacher (Agarwal et al., ICLR 2024;
TRL's ``GKDTrainer``), trained with ``loss=gkd`` (``alignkit/losses/distill.py``) on SFT data.

One step: with probability ``rl.lmbda`` the step is *on-policy*: every prompt of the step's groups gets one
completion sampled from the student (the generation engine, ``generation.*``; the gkd presets sample at
TRL's 0.9); otherwise the data's own completions are kept, or, with ``rl.seq_kd``, one completion sampled
from the teacher replaces each (``rl.mixture.mixture_engine`` at coefficient 1, the HF engine). Then per
micro-batch: the teacher's final hidden states at the completion tokens (a frozen DeepSpeed engine,
``common.frozen_engine``, as a separate reference model), the student's forward with the teacher's head
(``models.logprobs.ReferenceHead`` with ``divergence`` = ``distill.generalized_jsd``): both models'
``[chunk, vocab]`` logits exist for one chunk of tokens at a time (``model.logprob_chunk_size``),
checkpointed and recomputed in backward, never ``[tokens, vocab]``. The loss is the JSD's mean over all
completion tokens of the step (TRL's batchmean with ``num_items_in_batch``: each micro-batch weighted by
its share of the step's tokens).

The teacher is ``rl.teacher`` (a ``model.name_or_path``; None = the student's starting model, as TRL),
loaded like the student, without LoRA; with ``name_or_path: tiny`` ``rl.teacher_seed`` gives it its own
random weights. Its vocabulary and tokenizer must be the student's (the JSD is over one vocabulary): a
different one stops the run after loading, before the first step (``ConfigError``).

Differences from TRL: the on-policy coin is tossed once per optimizer step (seeded by ``trainer.seed``
and the step, the same on every rank, reproducible on resume) where TRL tosses it per micro-batch and
process; generation uses the run's ``generation`` section (TRL: ``GKDConfig.temperature``=0.9,
``max_new_tokens``=128, top_k 0, top_p 1). Metrics: ``loss`` (= ``jsd``), ``on_policy`` (1 for a
student-sampled step), ``response_length`` and ``gen_seconds`` of sampled steps; ``eval/jsd`` on the
held-out data's own completions. Left out: ZeRO-3 (the teacher's head runs inside the student's pass;
refused at compose time), vLLM for the teacher's samples, TRL's ``disable_dropout`` (the tiny model and
SmolLM2 have no dropout).
"""

from __future__ import annotations

import inspect
import random
from dataclasses import replace
from functools import partial
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.data.batch import TokenizedGroup
from alignkit.errors import ConfigError
from alignkit.losses.distill import generalized_jsd, token_mean
from alignkit.models.logprobs import forward_logps
from alignkit.trainers import common, loop, rollout
from alignkit.trainers.preference import _token_shares
from alignkit.trainers.reference import ModuleReference

NO_REWARD = rollout.CombinedReward(None, None, 0.0)  # samples here are not scored
COIN_SEED = 7_919  # the on-policy coin's stream, apart from sampling seeds


def train(cfg: DictConfig, run_dir: Path) -> dict:
    objective = objective_from_cfg(cfg.loss)  # gkd (checked at compose time)
    from alignkit.rl.mixture import OTHER_SAMPLER_SEED, mixture_engine

    setup = loop.setup(cfg, run_dir, "sft")
    run, data = setup.run, setup.data
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    teacher = teacher_reference(run, policy, tokenizer)
    divergence = jsd_of(objective)
    generator = rollout.generation_engine(run, policy, tokenizer)
    teacher_sampler = mixture_engine(policy, teacher, tokenizer, coef=1.0) if run.rl.seq_kd else None
    pad_id = tokenizer.pad_token_id
    evaluation = (lambda: evaluate(run, policy, teacher, divergence, data.eval, pad_id)) if data.eval else None
    run.print(f"  gkd: on-policy with probability rl.lmbda={run.rl.lmbda}, else "
              + ("the teacher's samples (rl.seq_kd)" if run.rl.seq_kd else "the data's completions"))
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)

    for step in training:
        chunks = common.micro_chunks(run, data.train, step.number - 1)
        on_policy = on_policy_step(run, step.number)
        sampler = generator if on_policy else teacher_sampler
        sampled = None
        if sampler is not None:
            policy.eval()
            seed = rollout.seed_for(run, step.number) + (0 if on_policy else OTHER_SAMPLER_SEED)
            sampled = rollout.sample_groups(sampler, tokenizer, [prompt_only(g) for c in chunks for g in c],
                                            NO_REWARD, run.generation, num_samples=1, seed=seed)
            policy.train()
            sizes, flat, chunks = [len(c) for c in chunks], sampled.groups, []
            for size in sizes:  # the same micro-batches, each prompt with its sampled completion
                chunks, flat = chunks + [flat[:size]], flat[size:]
        batches = [common.collate_groups(chunk, run.data, pad_id).to(run.device) for chunk in chunks]
        shares = _token_shares(batches, run)  # the step optimises the token mean over the global batch
        for batch, share in zip(batches, shares):
            head = replace(teacher.head(batch), divergence=divergence)
            jsd = forward_logps(policy, batch, reference=head)["kl"]  # [N] per completion token, grad
            loss = token_mean(jsd, None)
            if not step.update(policy, loss * share, {"loss": loss, "jsd": loss}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        metrics = {"on_policy": float(on_policy)}
        if sampled is not None:
            metrics.update({k: v for k, v in rollout.reward_metrics(sampled).items()
                            if k in ("response_length", "finished_fraction", "gen_seconds")})
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    return training.complete(tokenizer)


def jsd_of(objective: Any) -> Callable[..., Any]:
    """``generalized_jsd`` with the run's ``loss.beta`` / ``loss.temperature`` (the gkd signature's defaults)."""
    part = objective.parts[0]
    hp = {k: v for k, v in inspect.signature(part.spec.fn).parameters.items() if v.kind is v.KEYWORD_ONLY}
    values = {k: part.hparams.get(k, p.default) for k, p in hp.items()}
    return partial(generalized_jsd, beta=float(values["beta"]), temperature=float(values["temperature"]))


def on_policy_step(run: common.Run, step: int) -> bool:
    """The step's coin: True with probability ``rl.lmbda`` (same on every rank, reproducible)."""
    return random.Random(run.trainer.seed * 1_000_003 + step * COIN_SEED).random() < run.rl.lmbda


def prompt_only(group: TokenizedGroup) -> TokenizedGroup:
    return replace(group, completion_ids=[], completion_train_mask=[], example_id=f"{group.example_id}/gkd")


def teacher_model_config(run: common.Run) -> Any:
    """The teacher's model section: the student's, with ``rl.teacher`` / ``rl.teacher_seed``, no LoRA."""
    rl, model = run.rl, run.model
    teacher = replace(model, name_or_path=rl.teacher or model.name_or_path, lora=replace(model.lora, r=0))
    if rl.teacher_seed is not None:
        teacher = replace(teacher, tiny=replace(teacher.tiny, seed=rl.teacher_seed))
    return teacher


def teacher_reference(run: common.Run, policy: Any, tokenizer: Any) -> ModuleReference:
    """The teacher as a frozen DeepSpeed engine over a ``TargetLogProbs``, its vocabulary checked."""
    from alignkit.models.load import load_causal_lm
    from alignkit.models.logprobs import TargetLogProbs

    model_cfg = teacher_model_config(run)
    model, teacher_tokenizer = load_causal_lm(model_cfg, dtype=run.deepspeed.dtype)
    check_same_vocabulary(common.hf_model(policy), tokenizer, model, teacher_tokenizer, model_cfg.name_or_path,
                          run.model.name_or_path)
    run.print(f"  teacher: {model_cfg.name_or_path}" + (f" (tiny seed {model_cfg.tiny.seed})"
                                                         if model_cfg.name_or_path == "tiny" else ""))
    return ModuleReference(common.frozen_engine(TargetLogProbs(model, chunk_size=run.model.logprob_chunk_size), run.deepspeed))


def check_same_vocabulary(student: Any, student_tokenizer: Any, teacher: Any, teacher_tokenizer: Any,
                          teacher_name: str, student_name: str) -> None:
    """The JSD compares two distributions over one vocabulary: the LM heads' sizes and the tokenizers must match."""
    sizes = (student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if sizes[0] != sizes[1]:
        raise ConfigError(f"rl.teacher={teacher_name!r} has a vocabulary of {sizes[1]} logits, the student "
                          f"model.name_or_path={student_name!r} {sizes[0]}: GKD compares their next-token "
                          "distributions over one vocabulary. Use a teacher with the student's tokenizer.")
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(f"rl.teacher={teacher_name!r} has another tokenizer than model.name_or_path="
                          f"{student_name!r} (same size, different tokens): GKD compares their next-token "
                          "distributions token by token. Use a teacher with the student's tokenizer.")


@torch.no_grad()
def evaluate(run: common.Run, policy: Any, teacher: ModuleReference, divergence: Any,
             groups: list[TokenizedGroup], pad_id: int) -> dict[str, float]:
    """``jsd``: the token-mean JSD on the held-out data's own completions (this rank's share, reduced)."""
    policy.eval()
    total, tokens = 0.0, 0.0
    for chunk, counted in common.eval_chunks(run, groups):
        batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
        head = replace(teacher.head(batch), divergence=divergence)
        jsd = forward_logps(policy, batch, reference=head)["kl"]
        if counted:
            total, tokens = total + float(jsd.sum()), tokens + float(jsd.numel())
    total, tokens = common.all_reduce_values([total, tokens], run)
    policy.train()
    return {"jsd": total / max(tokens, 1.0)}
