"""The offline trainer: SFT and every preference loss (paired, unpaired, listwise) in one loop.

SFT is the K=1 case of the same loop (its loss is the token-mean NLL of slot 0, with no
reference), so one code path serves ``runner=sft`` and ``runner=preference``:

  data (fails before any model loads) -> policy engine -> reference strategy -> steps:
  micro-batches -> one forward over the flattened batch -> SequenceLogps -> loss -> backward -> step
  -> metrics, held-out eval, checkpoints -> export.

Gradient accumulation: DeepSpeed divides each micro-batch loss by the accumulation steps and
averages over processes. Group-mean losses see equal-sized micro-batches, so that is exact; a pure
SFT objective is re-weighted by its micro-batch's share of the step's target tokens so the step
optimises the token mean over the whole global batch.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from alignkit.config.validate import objective_from_cfg
from alignkit.config.schema import TrainerConfig
from alignkit.data.batch import Batch, TokenizedGroup, per_token_view, sum_per_slot
from alignkit.losses.registry import SequenceLogps
from alignkit.models.config import ModelConfig
from alignkit.models.logprobs import forward_logps
from alignkit.trainers import common, loop
from alignkit.trainers.common import Run
from alignkit.trainers.reference import ModuleReference, NoReference, choose_strategy, default_cache_dir, precompute


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train ``cfg``'s offline objective (SFT or a preference loss) on its data: ``{"exit_code": ...}``."""
    objective = objective_from_cfg(cfg.loss)
    setup = loop.setup(cfg, run_dir, objective.view)
    run, data, t = setup.run, setup.data, setup.run.trainer
    policy, tokenizer = loop.policy_engine(run, setup.steps)
    pad_id = tokenizer.pad_token_id
    reference = build_reference(run, policy, objective, data, pad_id, setup.steps)
    evaluation = (lambda: evaluate(run, policy, reference, objective, data.eval, pad_id)) if data.eval else None
    training = loop.begin(run, policy, setup.steps, evaluate=evaluation)

    for step in training:
        chunks = common.micro_chunks(run, data.train, step.number - 1)
        batches = [common.collate_groups(chunk, run.data, pad_id).to(run.device) for chunk in chunks]
        shares = _token_shares(batches, run) if objective.view == "sft" else [1.0] * len(batches)
        step_kl = None
        if objective.needs_kl_pairs:  # KTO: one reference point for the whole step, over every rank
            order = [data.train[i] for i in common.step_groups(len(data.train), step.number - 1, t.batch_size, t.seed)]
            step_kl = kl_estimate(policy, reference, [(c, True) for c in chunks], successors(order), pad_id, run)
        for batch, share in zip(batches, shares):
            seq = sequence_logps(policy, reference, batch, objective, objective.needs_token_logps, step_kl=step_kl)
            loss, metrics = objective(seq)
            if not step.update(policy, loss * share, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                return training.stop_nonfinite(step)
        if (stopped := training.end_step(step)) is not None:
            return stopped
    return training.complete(tokenizer)


def build_reference(run: Run, policy: Any, objective: Any, data: Any, pad_id: int, steps: int) -> Any:
    """The reference strategy for this run of ``steps`` steps (see ``alignkit.trainers.reference``)."""
    from alignkit.models.load import disabled_adapter, load_causal_lm
    from alignkit.models.logprobs import TargetLogProbs

    lora = run.model.lora.r > 0
    t = run.trainer
    strategy = choose_strategy(t.reference, objective.needs_reference, lora)
    why = ""
    if strategy == "precomputed" and objective.needs_kl_pairs:
        strategy = "separate"  # KTO's mismatched pairs change every batch; they cannot be cached
    if strategy == "precomputed" and objective.needs_token_kl:  # auto (an explicit precomputed fails at compose)
        strategy, why = "separate", " (auto: the per-token KL of the loss needs the reference's logits, not a cache)"
    run.print(f"[bold]reference[/]: {strategy}{why}")
    if strategy == "none":
        return NoReference()
    if strategy == "lora":
        inner = common.hf_model(policy)
        return ModuleReference(policy, context=lambda: disabled_adapter(inner))
    if strategy == "separate":
        model, _ = load_causal_lm(_frozen_model_cfg(run.model), dtype=run.deepspeed.dtype)
        module = TargetLogProbs(model, chunk_size=run.model.logprob_chunk_size)
        return ModuleReference(common.frozen_engine(module, run.deepspeed))
    # precomputed: the starting policy, before the first step, over the groups the run will visit
    cache_dir = Path(t.reference_cache_dir or default_cache_dir())  # $ALIGNKIT_CACHE/ref_logps
    used = sorted({i for s in range(steps) for i in common.step_groups(len(data.train), s, t.batch_size, t.seed)})
    policy.eval()
    table = precompute(
        policy,
        [data.train[i] for i in used] + data.eval[: t.max_eval_groups],
        lambda groups: common.collate_groups(groups, run.data, pad_id),
        model_cfg=asdict(run.model),  # the cache key's model identity
        layout=run.data.layout,
        cache_dir=cache_dir,
        batch_groups=t.eval_batch_size,
        rank=run.rank,
        world=run.world,
        device=run.device,
        log=run.print,
        chunks=first_batches(t, data, steps),
    )
    policy.train()
    return table


def first_batches(t: TrainerConfig, data: Any, steps: int) -> list[list[TokenizedGroup]]:
    """The micro-batches (all ranks') in which training first forwards each group, then the eval batches:
    the pre-pass forwards exactly these, so at step 0 the reference equals the policy bit for bit."""
    micro, seen, chunks = t.micro_batch_size, set(), []
    for s in range(steps):
        indices = common.step_groups(len(data.train), s, t.batch_size, t.seed)
        for i in range(0, len(indices), micro):
            chunk = [data.train[j] for j in indices[i : i + micro]]
            if any(g.example_id not in seen for g in chunk):
                chunks.append(chunk)
                seen.update(g.example_id for g in chunk)
    held_out, size = data.eval[: t.max_eval_groups], t.eval_batch_size
    return chunks + [held_out[i : i + size] for i in range(0, len(held_out), size)]


def _frozen_model_cfg(model: ModelConfig) -> ModelConfig:
    """``model`` as the ``separate`` reference loads it: the base weights (no LoRA), no gradient checkpointing."""
    return replace(model, lora=replace(model.lora, r=0), gradient_checkpointing=False)


def sequence_logps(policy: Any, reference: Any, batch: Batch, objective: Any, need_tokens: bool,
                   step_kl: float | None = None) -> SequenceLogps:
    """Policy (with grad) and reference log-probs of one batch, as the loss functions take them.

    ``step_kl`` (KTO): the step's KL estimate from ``kl_estimate``, handed to the loss as one
    mismatched "pair" whose log-ratio is the estimate, so the loss's batch mean returns it unchanged.

    A loss with ``needs_token_kl`` (TDPO): the reference gives its hidden states at the targets and its
    head (``reference.head``), and the policy's forward computes, chunk by chunk, the per-token KL
    (summed per completion into ``seq_kl``) and the reference's target log-probs from them.
    """
    wpo = any(part.hparams.get("use_weighting") for part in objective.parts)
    if objective.needs_token_kl:  # the preference runner only (compose-time rule): a fixed live reference
        return _token_kl_logps(policy, reference.head(batch), batch, need_tokens, wpo, step_kl)
    # the reference first: a reference that swaps weights in and out of the policy (online DPO's moving
    # LoRA reference) must not touch tensors the policy's graph has saved
    ref_seq, ref_tokens = reference.logps(batch, with_tokens=need_tokens)
    out = forward_logps(policy, batch, with_log_sq_mass=wpo) if wpo else forward_logps(policy, batch)
    return _sequence_logps(batch, out, ref_seq, ref_tokens, need_tokens, step_kl)


def _token_kl_logps(policy: Any, ref_head: Any, batch: Batch, need_tokens: bool, wpo: bool,
                    step_kl: float | None) -> SequenceLogps:
    flags = {"with_log_sq_mass": True} if wpo else {}
    out = forward_logps(policy, batch, reference=ref_head, **flags)
    ref_tokens = out["ref_logps"].detach().float()
    seq = _sequence_logps(batch, out, sum_per_slot(ref_tokens, batch), ref_tokens, need_tokens, step_kl)
    seq.seq_kl = sum_per_slot(out["kl"].float(), batch)
    return seq


def _sequence_logps(batch: Batch, out: dict[str, torch.Tensor], ref_seq: torch.Tensor | None,
                    ref_tokens: torch.Tensor | None, need_tokens: bool, step_kl: float | None) -> SequenceLogps:
    token_logps = out["logps"].float()
    seq = SequenceLogps(
        logps=sum_per_slot(token_logps, batch),
        lengths=batch.slot_lengths().float(),
        mask=batch.slot_mask,
        ref_logps=ref_seq,
        scores=batch.scores,
        labels=batch.labels,
    )
    if need_tokens:
        seq.token_logps, seq.token_mask = per_token_view(token_logps, batch)
        if ref_tokens is not None:
            seq.ref_token_logps, _ = per_token_view(ref_tokens, batch)
        if "log_sq_mass" in out:
            seq.token_log_sq_mass, _ = per_token_view(out["log_sq_mass"].float(), batch)
    if step_kl is not None:
        seq.kl_logps = token_logps.new_full((1,), float(step_kl))
        seq.ref_kl_logps = token_logps.new_zeros(1)
    return seq


def successors(order: list[TokenizedGroup]) -> dict[int, TokenizedGroup]:
    """KTO's mismatched completions: group ``i`` of the step (in the step's global order, across every
    micro-batch and rank) takes the completion of group ``i + 1`` (the last one the first's), as TRL's
    KL dataset rotates completions by one. Keyed by ``id(group)``."""
    return {id(group): order[(i + 1) % len(order)] for i, group in enumerate(order)}


def _mismatched(chunk: list[TokenizedGroup], successor: dict[int, TokenizedGroup], pad_id: int, run: Run) -> Batch:
    rotated = [
        replace(group, completion_ids=successor[id(group)].completion_ids,
                completion_train_mask=successor[id(group)].completion_train_mask,
                example_id=group.example_id + "/kl")
        for group in chunk
    ]
    return common.collate_groups(rotated, run.data, pad_id).to(run.device)


@torch.no_grad()
def kl_estimate(policy: Any, reference: Any, chunks: list[tuple[list[TokenizedGroup], bool]],
                successor: dict[int, TokenizedGroup], pad_id: int, run: Run) -> float:
    """KTO's reference point ``max(0, mean(logp - ref_logp))`` over the mismatched pairs of every
    ``(chunk, counted)`` of every rank (no gradient, as in the paper and TRL). Every rank forwards the
    same number of chunks (ZeRO-3); uncounted padding chunks add nothing."""
    total, count = 0.0, 0
    for chunk, counted in chunks:
        kl_batch = _mismatched(chunk, successor, pad_id, run)
        logps = sum_per_slot(forward_logps(policy, kl_batch)["logps"].float(), kl_batch)[:, 0]
        ref, _ = reference.logps(kl_batch)
        if counted:
            total += float((logps - ref[:, 0]).sum())
            count += len(chunk)
    total, count = common.all_reduce_values([total, count], run)
    return max(total / max(count, 1.0), 0.0)


@torch.no_grad()
def evaluate(run: Run, policy: Any, reference: Any, objective: Any, groups: list[TokenizedGroup],
             pad_id: int) -> dict[str, float]:
    """Held-out loss and metrics (rewards/accuracy = held-out preference accuracy)."""
    policy.eval()
    meter = common.MetricMeter()
    chunks = common.eval_chunks(run, groups)
    step_kl = None
    if objective.needs_kl_pairs:  # one KL estimate over the whole held-out set
        order = groups[: run.trainer.max_eval_groups]
        step_kl = kl_estimate(policy, reference, chunks, successors(order), pad_id, run)
    for chunk, counted in chunks:
        batch = common.collate_groups(chunk, run.data, pad_id).to(run.device)
        seq = sequence_logps(policy, reference, batch, objective, objective.needs_token_logps, step_kl=step_kl)
        loss, metrics = objective(seq)
        meter.add({"loss": loss, **metrics}, weight=batch.num_groups if counted else 0)
    policy.train()
    return meter.reduced(run)


def _token_shares(batches: list[Batch], run: Run) -> list[float]:
    """Per micro-batch factor turning per-micro token means into the step's global token mean."""
    counts = [float(b.target_ids.numel()) for b in batches]
    total = common.all_reduce_sum(sum(counts), run)
    return [c * len(batches) * run.world / max(total, 1.0) for c in counts]
