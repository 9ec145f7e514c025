"""Mechanics every trainer calls: start-up, step schedule, micro-batches, metrics, engines, checkpoints, export.

These are functions, not a base class, so each trainer's loop reads top to bottom; the step contract
built from them (setup, the loop, the end of a step) is ``alignkit.trainers.loop``. The step
schedule is a pure function of (seed, step): step ``s`` of epoch ``e`` takes the groups
``order_e[s*B : (s+1)*B]`` of a seeded permutation, rank ``r`` takes micro-batches
``r, r + W, ...`` of it. Resuming at step ``k`` therefore replays exactly the same data as an
uninterrupted run, and a run on W processes sees the same global batches as one on 1 process.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console

from alignkit.config.schema import GenerationConfig, JudgeConfig, RewardConfig, RLConfig, TrainerConfig, typed_sections
from alignkit.config.validate import world_size
from alignkit.data.batch import Batch, TokenizedGroup
from alignkit.data.config import DataConfig
from alignkit.engine.config import DeepSpeedConfig
from alignkit.engine.metrics import LoggerConfig
from alignkit.models.config import ModelConfig

console = Console(stderr=True)


@dataclass
class Run:
    """What a trainer knows about its run: config, directory, process placement, logger.

    ``trainer``, ``model``, ``data``, ``deepspeed``, ``generation``, ``reward``, ``rl``, ``judge`` and ``logger``
    (the logging *settings*; the open metrics logger is ``metrics``) are the config's
    sections as the schema's dataclasses, converted once at start (``schema.typed_sections``): the runners read
    typed values from there, and pass these sections down, instead of coercing ``cfg.<section>.<key>`` at
    every use (``data`` is the data *config*; a runner's prepared data is ``loop.Setup.data``). ``cfg``
    stays for what has no dataclass (the free-form ``loss`` node, ``reward.options``, the logged config)."""

    cfg: DictConfig
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    resume: str | None = None  # the config's top-level resume: auto | PATH | null
    metrics: Any = None  # the run's MetricsLogger, opened by loop.begin
    progress: Any = None
    stop: Any = None
    started: float = field(default_factory=time.time)
    cpu_started: float = field(default_factory=time.process_time)  # sweep jobs can share one process

    def cpu_time(self) -> float:
        """This process's CPU seconds since the run started (logged as ``cpu_time_s``)."""
        return time.process_time() - self.cpu_started

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step on each process (``trainer.batch_size`` over micro-batch x world)."""
        return self.trainer.batch_size // (self.trainer.micro_batch_size * self.world)

    def print(self, *args: Any) -> None:
        if self.is_main:
            console.print(*args, highlight=False)

    def stop_requested(self) -> bool:
        """True on every rank once any rank got SIGINT/SIGTERM (a collective: all ranks call it)."""
        from alignkit.engine.faults import any_rank

        return any_rank(bool(self.stop and self.stop.requested))

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        self.metrics.log(metrics, step=step, split=split)
        if split == "train" and self.progress is not None:
            self.progress.update(step, loss=metrics.get("loss"), tokens_per_s=metrics.get("tokens_per_s"))

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None
        if self.metrics is not None:
            self.metrics.close()
        if self.stop is not None:
            self.stop.uninstall()


def start(cfg: DictConfig, run_dir: Path) -> Run:
    """Distributed set-up, seeds, logger and signal handling for one process of a run."""
    from alignkit.engine.engine import setup_distributed
    from alignkit.engine.faults import StopRequest

    placement = setup_distributed()
    rank, world, device = placement.rank, placement.world_size, placement.device
    expected = world_size(cfg)
    if world != expected:
        from alignkit.errors import ConfigError

        raise ConfigError(f"the config asks for {expected} process(es) but {world} were started.")
    typed = typed_sections(cfg)
    if rank == 0:
        _record_precision(run_dir, typed["deepspeed"].dtype)
    seed_everything(typed["trainer"].seed + rank)
    torch.manual_seed(typed["trainer"].seed)  # identical model init on every rank
    return Run(cfg=cfg, run_dir=run_dir, rank=rank, world=world, device=device, **typed, resume=cfg.resume,
               stop=StopRequest(at_once=True).install())


def _record_precision(run_dir: Path, requested: str) -> None:
    """``run_dir/precision.json``: what ``deepspeed.dtype`` became on this machine (``engine.precision``)."""
    from alignkit.engine.config import resolve_dtype
    from alignkit.engine.precision import read_cpu_info, record_run_precision

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else read_cpu_info().model
    record_run_precision(run_dir, requested, resolve_dtype(requested), where)


def typed_run(cfg: DictConfig, run_dir: Path = Path(".")) -> Run:
    """A one-process CPU ``Run`` holding ``cfg``'s typed sections, as ``start`` builds it but with no distributed
    set-up, seeding or signal handling: for tools and tests that call the runners' helpers outside a run."""
    return Run(cfg=cfg, run_dir=Path(run_dir), rank=0, world=1, device=torch.device("cpu"), **typed_sections(cfg),
               resume=cfg.resume)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(t: TrainerConfig, num_groups: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` over the data when it is -1."""
    if num_groups < t.batch_size:
        from alignkit.errors import DataError

        raise DataError(f"the training data has {num_groups} usable group(s), fewer than one batch "
                        f"(trainer.batch_size={t.batch_size}). Add data, or lower trainer.batch_size "
                        "(and trainer.micro_batch_size) to at most the number of groups.")
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.floor(t.epochs * num_groups / t.batch_size))


def step_groups(num_groups: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the groups of optimizer step ``step`` (whole epochs of seeded permutations)."""
    per_epoch = max(1, num_groups // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng(seed + epoch).permutation(num_groups)
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()


def micro_chunks(run: Run, groups: list[TokenizedGroup], step: int) -> list[list[TokenizedGroup]]:
    """This rank's micro-batches (as lists of groups) of optimizer step ``step`` (0-based)."""
    t = run.trainer
    indices = step_groups(len(groups), step, t.batch_size, t.seed)
    chunks = [indices[i : i + t.micro_batch_size] for i in range(0, len(indices), t.micro_batch_size)]
    mine = chunks[run.rank :: run.world]
    assert len(mine) == run.grad_accum_steps, "batch accounting mismatch"
    return [[groups[i] for i in chunk] for chunk in mine]


def collate_groups(groups: list[TokenizedGroup], data: DataConfig, pad_token_id: int) -> Batch:
    """``groups`` as one ``Batch`` in ``data.layout`` (``run.data``), packed rows within ``data.max_tokens_per_row``."""
    from alignkit.data.collate import collate

    return collate(groups, layout=data.layout, pad_token_id=pad_token_id, max_tokens_per_row=data.max_tokens_per_row)


def rank_share(items: list, rank: int, world: int) -> list[tuple[Any, bool]]:
    """This rank's items ``rank::world`` as ``(item, counted)``, padded so every rank gets the same
    number (ZeRO-3 forwards are collective): padding repeats an item with ``counted=False``."""
    mine = [(item, True) for item in items[rank::world]]
    per_rank = -(-len(items) // world) if items else 0
    while len(mine) < per_rank:
        mine.append((items[0], False))
    return mine


def eval_chunks(run: Run, groups: list[TokenizedGroup]) -> list[tuple[list[TokenizedGroup], bool]]:
    """This rank's share of the held-out groups, in fixed order, as ``(chunk, counted)``."""
    groups = groups[: run.trainer.max_eval_groups]
    size = run.trainer.eval_batch_size
    return rank_share([groups[i : i + size] for i in range(0, len(groups), size)], run.rank, run.world)


def all_reduce_mean(values: dict[str, float], run: Run) -> dict[str, float]:
    """Average scalar metrics over processes; a rank may lack a key (e.g. it had no eval batch)."""
    meter = MetricMeter()
    meter.add(values)
    return meter.reduced(run)


def all_reduce_sum(value: float, run: Run) -> float:
    """Sum of ``value`` over processes (on the process group's device: see ``engine.collectives``)."""
    from alignkit.engine import collectives

    return collectives.all_reduce_sum(value)


def all_reduce_values(values: list[float], run: Run) -> list[float]:
    """Element-wise sums of a few floats over processes (one collective)."""
    from alignkit.engine import collectives

    return collectives.all_reduce(values, "sum")


class MetricMeter:
    """Accumulates metric dicts of tensors/floats and returns their means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, Any], weight: int = 1) -> None:
        for key, value in metrics.items():
            value = float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
            self.counts[key] = self.counts.get(key, 0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}

    def reduced(self, run: Run) -> dict[str, float]:
        """Means over every process's entries (weighted by their counts)."""
        from alignkit.engine import collectives

        parts = collectives.all_gather_object((self.sums, self.counts))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for part_sums, part_counts in parts:
            for key, value in part_sums.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + part_counts[key]
        return {k: sums[k] / max(counts[k], 1) for k in sorted(sums)}


def ds_train_config(run: Run) -> dict:
    """The DeepSpeed config of a trained engine: ``run.deepspeed`` for this run's batch accounting."""
    from alignkit.engine.config import build_train_ds_config

    return build_train_ds_config(
        run.deepspeed,
        micro_batch_size=run.trainer.micro_batch_size,
        grad_accum_steps=run.grad_accum_steps,
        world_size=run.world,
    )


def train_engine(module: torch.nn.Module, run: Run, steps: int, lr: float | None = None) -> Any:
    """``module`` as a DeepSpeed training engine (AdamW, the ``trainer`` schedule over ``steps`` steps);
    ``lr`` replaces ``trainer.lr`` (PPO's critic)."""
    from alignkit.engine.engine import init_train_engine

    t = run.trainer
    return init_train_engine(
        module,
        ds_train_config(run),
        lr=t.lr if lr is None else lr,
        weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2),
        warmup_steps=t.warmup_steps,
        total_steps=steps,
        scheduler=t.scheduler,
        optimizer_in_backward=run.deepspeed.optimizer_in_backward,
    )


def frozen_engine(module: torch.nn.Module, deepspeed: DeepSpeedConfig) -> Any:
    """``module`` as a frozen DeepSpeed engine (reference, reward model): ``deepspeed``'s (``run.deepspeed``)
    inference config."""
    from alignkit.engine.config import build_frozen_ds_config
    from alignkit.engine.engine import init_frozen_engine

    return init_frozen_engine(module, build_frozen_ds_config(deepspeed))


def reapply_optimizer_settings(engine: Any, t: TrainerConfig) -> None:
    """After a checkpoint load: the config's lr, weight decay and Adam betas replace the restored ones.

    The optimizer and LR-scheduler states in a checkpoint carry the values of the run that saved
    it; a resume that changed them (``resume_allow``, see ``alignkit.config.resume``) must train
    with the new ones. The schedule's factor at the restored step is kept.
    """
    optimizer = getattr(engine, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrappers hold the torch one
    scheduler = getattr(engine, "lr_scheduler", None)
    if optimizer is None or not getattr(optimizer, "param_groups", None):
        return
    lr, betas = t.lr, (t.adam_beta1, t.adam_beta2)
    factor, same_lr = 1.0, False
    if scheduler is not None and getattr(scheduler, "base_lrs", None):
        base = scheduler.base_lrs[0]
        same_lr = base == lr
        factor = optimizer.param_groups[0]["lr"] / base if base else 1.0
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        if not same_lr:  # unchanged: leave the restored rate bit for bit (exact resume)
            group["initial_lr"] = lr
            group["lr"] = lr * factor
        if "betas" in group:
            group["betas"] = betas
        # engine._weight_decay_groups puts the decayed matrices first; biases and norms stay at 0
        if (len(groups) == 2 and i == 0) or (len(groups) == 1 and group.get("weight_decay", 0.0) != 0.0):
            group["weight_decay"] = t.weight_decay


def save(run: Run, engine: Any, step: int, extra_engines: dict[str, Any] | None = None) -> None:
    from alignkit.engine.checkpoint import save_checkpoint

    save_checkpoint(engine, run.run_dir, step, {"step": step}, keep_last=run.trainer.keep_last,
                    extra_engines=extra_engines)


def should(every: int, step: int, last: int) -> bool:
    """True on every ``every``-th step (1-based) and on the last step."""
    return step == last or (every > 0 and step % every == 0)


def export_final(run: Run, engine: Any, tokenizer: Any, name: str = "final",
                 prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Path | None:
    """Write ``run_dir/<name>``: a transformers-loadable model + tokenizer (LoRA merged unless
    ``trainer.merge_lora=false``, which saves the adapter alone); ``prepare`` as in ``export_hf_model``."""
    if not run.trainer.export:
        return None
    from alignkit.engine.export import export_hf_model

    out = run.run_dir / name
    export_hf_model(engine, tokenizer, out, prepare=prepare, merge_lora=run.trainer.merge_lora)
    run.print(f"[green]model exported[/] to {out}")
    return out


def hf_model(engine: Any) -> torch.nn.Module:
    """The transformers model inside an engine wrapping a ``TargetLogProbs``-style module."""
    module = getattr(engine, "module", engine)
    return getattr(module, "model", module)


def backward_step(engine: Any, loss: torch.Tensor | None) -> None:
    """One micro-batch: backward and DeepSpeed's ``step`` (which applies the optimizer only at the
    accumulation boundary; DeepSpeed counts micro-batches through these calls).

    ``loss=None`` (a skipped, non-finite micro-batch) backpropagates an exact zero through every
    trainable parameter so that all ranks keep the same collective sequence. ZeRO 0-2 only: under
    ZeRO-3 the parameters are partitioned outside a forward, so a rank with nothing to learn from
    must run a real forward and scale its loss by 0 (as online DPO does for tied samples).
    """
    if loss is None:
        loss = sum((p.sum() for p in engine.module.parameters() if p.requires_grad), torch.zeros(())) * 0.0
    engine.backward(loss)
    engine.step()


def describe_batches(run: Run, *, groups: int, steps: int, kind: str = "groups") -> None:
    """Print the batch accounting: groups per step, per micro-batch, accumulation, processes, epochs."""
    t = run.trainer
    run.print(
        f"[bold]batch accounting[/]: {t.batch_size} {kind}/step = {t.micro_batch_size} per micro-batch "
        f"x {run.grad_accum_steps} accumulation x {run.world} process(es); {groups} training {kind}, {steps} steps "
        f"(~{steps * t.batch_size / max(groups, 1):.2f} epochs)"
    )
