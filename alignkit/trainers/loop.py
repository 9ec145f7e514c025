"""The step contract every runner follows: ``setup`` -> ``begin`` -> per step ``update`` and ``end_step``.

A runner's ``train`` reads top to bottom as its algorithm; everything around the algorithm lives here
once, so every runner handles non-finite losses, metrics, progress, evaluation and checkpoints alike::

    setup = loop.setup(cfg, run_dir, view="pairwise")   # start, tokenizer, data, step count (no model yet)
    policy, tokenizer = loop.policy_engine(setup.run, setup.steps)
    training = loop.begin(setup.run, policy, setup.steps, evaluate=...)  # resume, logger, progress bar
    for step in training:                            # a Step: its number, clock, learning rate, tallies
        ... the runner's forward and loss inputs ...
        if not step.update(policy, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
            return training.stop_nonfinite(step)     # trainer.on_nonfinite=stop
        if (stopped := training.end_step(step, {...runner metrics...})) is not None:
            return stopped                           # SIGINT/SIGTERM: saved, resumable
    return training.complete(tokenizer)

``Step.update`` is one micro-batch's backward and DeepSpeed ``step`` under ``trainer.on_nonfinite``:
a loss that is NaN/inf on any rank (all ranks agree, one collective) either stops the run
(``stop``: exit code 3, nothing of the step is saved, the last good checkpoint is named) or is
skipped (``skip``: that micro-batch backpropagates an exact zero through every trainable parameter so
all ranks keep the same collectives -- ZeRO 0-2 only; the step's other micro-batches still update,
the skipped one's metrics are left out, and the step logs ``nonfinite_skipped``). The optimizer step
itself still runs at the accumulation boundary (DeepSpeed counts micro-batches), so with Adam a step
whose every micro-batch was skipped still moves the weights by the optimizer's momentum.

``Loop.end_step`` averages the step's metrics over ranks (one object collective), adds the shared
names -- ``tokens_per_s`` (real tokens of the step's training forwards, every micro-batch of every
rank and every update pass, per wall-clock second of the whole step: sampling, rewards and reference
passes included), ``step_seconds`` and ``lr`` -- logs them (the progress bar shows loss and
tokens/s), evaluates when due and saves a checkpoint when due or when a stop was requested.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.markup import escape

from alignkit.trainers import common
from alignkit.trainers.common import MetricMeter, Run

Evaluate = Callable[[], dict[str, float]]


@dataclass
class Setup:
    """What a runner has before any model loads: the run, the tokenizer, the prepared data, the step count."""

    run: Run
    tokenizer: Any
    data: Any  # alignkit.data.pipeline.PreparedData
    steps: int


def setup(cfg: DictConfig, run_dir: Path, view: str, *, kind: str = "groups") -> Setup:
    """Start the process (distributed, seeds, signals), load the tokenizer and prepare the data in
    ``view`` (so bad data fails before any model loads), count the steps and print the accounting."""
    from alignkit.data.pipeline import prepare_data
    from alignkit.models.load import load_tokenizer_for

    run = common.start(cfg, run_dir)
    tokenizer = load_tokenizer_for(run.model)  # gguf_file, trust_remote_code, revision
    data = prepare_data(run.data, view, tokenizer)
    run.print(f"[bold]data[/]: {data.stats}")  # sources, the eval set and its size, what was cut
    steps = common.total_steps(run.trainer, len(data.train))
    common.describe_batches(run, groups=len(data.train), steps=steps, kind=kind)
    return Setup(run=run, tokenizer=tokenizer, data=data, steps=steps)


def policy_engine(run: Run, steps: int) -> tuple[Any, Any]:
    """The trained causal LM (``run.model``, loaded in ``run.deepspeed.dtype``) as a ``TargetLogProbs``
    DeepSpeed engine over ``steps`` optimizer steps, and the tokenizer loaded with it."""
    from alignkit.models.load import load_causal_lm
    from alignkit.models.logprobs import TargetLogProbs

    model, tokenizer = load_causal_lm(run.model, dtype=run.deepspeed.dtype)
    module = TargetLogProbs(model, chunk_size=run.model.logprob_chunk_size)
    return common.train_engine(module, run, steps), tokenizer


@dataclass
class Step:
    """One optimizer step in progress: what ``Loop.end_step`` reports about it."""

    number: int  # 1-based
    lr: float  # the rate this step uses
    on_nonfinite: str  # stop | skip
    started: float = field(default_factory=time.time)
    meter: MetricMeter = field(default_factory=MetricMeter)
    tokens: float = 0.0  # real tokens of this rank's training forwards
    skipped: int = 0  # micro-batches skipped for a non-finite loss (the same on every rank)
    nonfinite: str | None = None  # the tensor that stopped the run

    def update(self, engine: Any, loss: torch.Tensor, metrics: dict[str, Any] | None = None, *,
               tokens: float = 0.0, name: str = "loss") -> bool:
        """Backward ``loss`` (one micro-batch) through ``engine`` and take DeepSpeed's ``step``, under
        ``trainer.on_nonfinite``; add ``metrics`` to the step's means and ``tokens`` to its count.

        Every rank must call it for every micro-batch (the finiteness check is a collective). Returns
        False when the run must stop now (``stop`` and a non-finite ``loss`` on some rank): the caller
        returns ``Loop.stop_nonfinite(step)``. ``name`` names ``loss`` in the message (``value_loss``).
        """
        from alignkit.engine.faults import any_rank

        self.tokens += float(tokens)
        if any_rank(not bool(torch.isfinite(loss.detach()).all())):
            if self.on_nonfinite == "stop":
                self.nonfinite = name
                return False
            self.skipped += 1
            common.backward_step(engine, None)  # an exact zero: same collectives on every rank
            return True
        common.backward_step(engine, loss)
        if metrics:
            self.meter.add(metrics)
        return True


@dataclass
class Loop:
    """The steps of a run after ``begin``: iterate it for ``Step``s, end each with ``end_step``."""

    run: Run
    engine: Any  # the engine checkpointed and exported (the policy; PPO's actor)
    steps: int
    done: int  # the last completed step (0 for a fresh run)
    evaluate: Evaluate | None = None
    extra_engines: dict[str, Any] | None = None  # checkpointed with ``engine`` (PPO's critic)

    def __iter__(self) -> Iterator[Step]:
        for number in range(self.done + 1, self.steps + 1):
            yield Step(number=number, lr=float(self.engine.get_lr()[0]), on_nonfinite=self.run.trainer.on_nonfinite)

    def end_step(self, step: Step, metrics: dict[str, float] | None = None) -> dict | None:
        """Close ``step``: reduce and log its metrics (plus the runner's ``metrics``: rewards, counts),
        evaluate when due, checkpoint when due or when a stop was requested.

        Returns the runner's result when the run must stop now (SIGINT/SIGTERM on any rank): the
        checkpoint is saved and the logs closed, so ``resume=auto`` continues exactly from here.
        """
        run, t = self.run, self.run.trainer
        reduced = common.all_reduce_mean({**step.meter.means(), **(metrics or {})}, run)
        tokens = common.all_reduce_sum(step.tokens, run)
        seconds = time.time() - step.started
        reduced.update(tokens_per_s=tokens / max(seconds, 1e-9), step_seconds=seconds, lr=step.lr)
        if t.on_nonfinite == "skip":
            reduced["nonfinite_skipped"] = float(step.skipped)
        run.log(step.number, {**reduced, "cpu_time_s": run.cpu_time()}, split="train")
        if self.evaluate is not None and common.should(t.eval_every, step.number, self.steps):
            run.log(step.number, {**self.evaluate(), "cpu_time_s": run.cpu_time()}, split="eval")
        stop = run.stop_requested()
        if stop or common.should(t.save_every, step.number, self.steps):
            common.save(run, self.engine, step.number, self.extra_engines)
        if not stop:
            return None
        run.print(f"[yellow]stopped at step {step.number}[/]; continue with resume=auto")
        run.finish()
        return {"exit_code": 0, "stopped": step.number}

    def stop_nonfinite(self, step: Step) -> dict:
        """``trainer.on_nonfinite=stop``: say so, close the logs; exit code 3, nothing of the step saved."""
        from alignkit.engine.checkpoint import last_good_message

        self.run.print(
            f"[bold red]non-finite {step.nonfinite or 'loss'} at step {step.number}[/]: stopping; nothing of this "
            f"step is saved. {escape(last_good_message(self.run.run_dir))} "
            "Lower trainer.lr or set trainer.on_nonfinite=skip."
        )
        self.run.finish()
        return {"exit_code": 3, "nonfinite_step": step.number}

    def complete(self, tokenizer: Any) -> dict:
        """End of a run: export the final model (``engine``), close the logs."""
        common.export_final(self.run, self.engine, tokenizer)
        self.run.finish()
        return {"exit_code": 0}


def begin(run: Run, engine: Any, steps: int, *, evaluate: Evaluate | None = None,
          extra_engines: dict[str, Any] | None = None) -> Loop:
    """Resume if asked (``resume=auto|PATH``), open the metrics log and the progress bar.

    Metrics logged after the resumed step by an interrupted run are dropped, so a resumed run's log
    reads as an uninterrupted one. A fresh run with periodic evaluation is evaluated once before
    training (logged as step 0), so every run records its held-out metrics before and after.
    """
    from alignkit.engine.checkpoint import resume_checkpoint
    from alignkit.engine.cpu_memory import release_freed_memory
    from alignkit.engine.metrics import MetricsLogger
    from alignkit.engine.progress import TrainProgress

    t, log = run.trainer, run.logger
    if run.device.type == "cpu" and t.cpu_release_freed_memory:
        # from here on: loading and a reference pre-pass stay below the training peak
        released = release_freed_memory()
        if released.reason:
            instead = ("glibc unmaps freed tensors instead (slower steps)" if released.mechanism == "mmap_threshold"
                       else "freed tensors stay in the C library's heap (higher peak RSS)")
            run.print(f"[yellow]CPU block cache unavailable; {instead}:[/] {released.reason}")
    path, state = resume_checkpoint(engine, run.run_dir, run.resume, extra_engines=extra_engines,
                                    say=lambda text: run.print(f"[yellow]{escape(text)}[/]"))
    done = int(state.get("step", 0))
    if path is not None:
        run.print(f"[green]resumed[/] from {path} at step {done}")
        common.reapply_optimizer_settings(engine, t)  # a resume_allow'ed lr/decay/betas is really used
    run.metrics = MetricsLogger(run.run_dir, backends=tuple(log.backends), rank=run.rank,
                                wandb_project=log.wandb_project, wandb_mode=log.wandb_mode,
                                run_name=run.run_dir.name, config=OmegaConf.to_container(run.cfg, resolve=True),
                                truncate_after=done)
    if done == 0 and evaluate is not None and t.eval_every > 0:
        run.log(0, evaluate(), split="eval")
    run.progress = TrainProgress(steps, rank=run.rank, start_step=done).__enter__()
    if run.stop is not None:
        run.stop.defer()  # from here a signal stops after the step, with a checkpoint
    return Loop(run=run, engine=engine, steps=steps, done=done, evaluate=evaluate, extra_engines=extra_engines)
