"""One DeepSpeed code path for 1 or N processes: process-group setup, trained engines, frozen engines.

* ``setup_distributed()`` makes a bare ``python`` process look like rank 0 of a world of 1 (the
  env vars DeepSpeed's launcher would set, a free port on loopback), selects the CPU accelerator
  when there is no GPU, and initialises the process group (gloo on CPU, nccl on CUDA). On one
  machine the rendezvous store listens on 127.0.0.1 only (``loopback_store``). On CPU it
  then unlinks DeepSpeed's shared-memory all-reduce files, which DeepSpeed itself never removes.
* ``init_train_engine(module, ds_config, ...)`` wraps a model for training. The optimizer is AdamW
  with weight decay on matrices only (not on biases/norm weights):
    - CUDA without offload: DeepSpeed builds it from the config (FusedAdam);
    - optimizer offload (any device): DeepSpeed builds DeepSpeedCPUAdam from the config;
    - CPU without offload: we build torch's fused ``AdamW`` and pass it in
      (``zero_allow_untested_optimizer``), since FusedAdam needs CUDA.
  With one process under ZeRO-0 the engine's gradient all-reduce is switched off (it would only
  flatten and copy every gradient).
  With ``optimizer_in_backward`` (one CPU process, ZeRO-0) each parameter is updated, and its
  gradient freed, as soon as its gradient is complete (``step_in_backward``).
  The LR schedule (linear warmup, then constant / linear / cosine decay to 0) is a torch
  ``LambdaLR`` handed to DeepSpeed as a callable, so the engine steps it at accumulation
  boundaries and saves it in its checkpoints.
* ``init_frozen_engine(module, ds_config)`` wraps a reference or reward model: eval mode, no
  grads, sharded under ZeRO-3.

Precision: DeepSpeed casts the module to the config's dtype (``config.torch_dtype(ds_config)``):
bf16 on GPUs (``dtype=auto``), fp32 here on CPU; with bf16/fp16 it keeps fp32 master weights in
the optimizer. A trainer feeds integer token ids unchanged, casts any float input (e.g. a 4D
additive attention mask) to the module's dtype (``models.logprobs.model_dtype``), and upcasts
logits to fp32 before ``log_softmax`` so losses are computed in fp32.

Left out: pipeline/tensor parallelism, DeepSpeed's own LR schedulers, and the training loop itself
(``engine.backward(loss); engine.step()`` is the trainer's business).
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
from datetime import timedelta
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import ConfigError

SCHEDULERS = ("constant", "linear", "cosine")  # trainer.scheduler: the one table (lr_multiplier)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port() -> int:
    """A TCP port that is free on loopback right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shm_buffer_path(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce op maps for ``rank`` of this process group."""
    env = os.environ
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{rank}"


def _unlink_shm_buffer() -> None:
    """Remove this rank's DeepSpeed shared-memory all-reduce file name once every rank has mapped it.

    DeepSpeed's CPU backend creates one ~67 MB file per rank in /dev/shm and never deletes it, so
    each run leaked RAM until the machine ran out (seen here: 18 GB after a day of test runs). After
    the barrier every rank has opened every peer's file, so the names can go; the mappings stay
    valid until the processes exit, and nothing is left behind even after a SIGKILL.
    """
    if torch.cuda.is_available():
        return
    torch.distributed.barrier()
    shm_buffer_path(torch.distributed.get_rank()).unlink(missing_ok=True)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def loopback_store(timeout: timedelta = timedelta(minutes=30)):
    """The rendezvous store of a single-node run, listening on 127.0.0.1 only; None for multi-node.

    torch's ``env://`` rendezvous starts rank 0's unauthenticated ``TCPStore`` on every interface
    (``*:PORT``) whatever ``MASTER_ADDR`` says. When ``MASTER_ADDR`` is a loopback address (the
    run is on one machine: a bare process, or DeepSpeed's launcher without a hostfile) rank 0
    binds the listening socket to it itself and hands it to the store (``master_listen_fd``); the
    other ranks connect to it as clients. A multi-node run (``MASTER_ADDR`` another host) keeps
    torch's store, which must be reachable from the other nodes.
    """
    host = os.environ.get("MASTER_ADDR", "")
    if not _is_loopback(host):
        return None
    port, rank = int(os.environ["MASTER_PORT"]), int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if rank != 0:
        return torch.distributed.TCPStore(host, port, world, False, timeout=timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1" if host == "localhost" else host, port))
        listener.listen(max(128, world))
        store = torch.distributed.TCPStore(host, port, world, True, timeout=timeout,
                                           master_listen_fd=listener.fileno(), wait_for_workers=False)
    except BaseException:
        listener.close()
        raise
    _LISTENERS.append(listener)  # the store serves on this socket for the life of the process
    return store


_LISTENERS: list[socket.socket] = []


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed; idempotent; works with or without the launcher."""
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    own_port = False
    if "RANK" not in os.environ:  # started without the DeepSpeed launcher: a world of one
        os.environ.update(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        )
        own_port = "MASTER_PORT" not in os.environ
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    import deepspeed  # imported late: DS_ACCELERATOR must be set first

    for attempt in range(5):
        if torch.distributed.is_initialized():
            break
        try:
            backend = "nccl" if has_cuda else "gloo"
            store = loopback_store()
            if store is not None:  # torch's env:// store would listen on every interface
                torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                                     world_size=int(os.environ["WORLD_SIZE"]))
            deepspeed.init_distributed(dist_backend=backend)
        except (torch.distributed.DistNetworkError, OSError) as exc:
            # the free port we picked was taken before the store bound it (another run started at
            # the same moment): pick another; a port given by the user or the launcher is kept
            if not own_port or attempt == 4 or (isinstance(exc, OSError) and exc.errno != errno.EADDRINUSE):
                raise
            os.environ["MASTER_PORT"] = str(find_free_port())
        else:
            _unlink_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if has_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def shutdown_distributed() -> None:
    """End this process's part in the process group after a run that finished normally on every rank.

    A process that exits with the group still alive can die at interpreter shutdown with SIGABRT
    ("terminate called without an active exception": gloo's worker threads outlive the interpreter;
    pytorch/pytorch#190489), so DeepSpeed's launcher reported a run that had finished and saved as
    failed (return code -6, seen about once in ten 2-process starts here). The barrier keeps a rank
    that finished early from leaving while another still reduces. Only for a normal end: after an
    error on one rank a barrier would wait for ranks that will never come (the launcher stops them).
    For a process that exits next (``alignkit worker``, test workers): DeepSpeed keeps its own handles
    on the destroyed group, so engines built afterwards in the same process would fail. A one-process
    run in the CLI or a notebook keeps its group. Idempotent; nothing happens without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, scheduler: str) -> float:
    """Factor on the peak LR after ``step`` optimizer steps: linear warmup from 0, then the decay.

    Same shape as transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    raise _scheduler_error(scheduler)


def _scheduler_error(scheduler: str) -> ConfigError:
    return ConfigError(
        f"trainer.scheduler={scheduler!r} is not valid; choose one of: {', '.join(SCHEDULERS)}."
    )


def _weight_decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (ndim >= 2) only; biases and norm weights are left alone. Frozen params are skipped."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def init_train_engine(
    module: torch.nn.Module,
    ds_config: dict[str, Any],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: Iterable[float] = (0.9, 0.999),
    eps: float = 1e-8,
    warmup_steps: int = 0,
    total_steps: int,
    scheduler: str = "cosine",
    optimizer_in_backward: bool = False,
):
    """Wrap ``module`` in a training ``DeepSpeedEngine`` with AdamW and a warmup LR schedule.

    ``optimizer_in_backward``: see ``step_in_backward`` (CPU fp32 path only).

    Call ``setup_distributed()`` first. Returns the engine: ``engine(**inputs)`` runs forward,
    ``engine.backward(loss)``, ``engine.step()`` (steps optimizer and scheduler at accumulation
    boundaries), ``engine.module`` is the wrapped model, ``engine.get_lr()[0]`` the current LR.
    """
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    if scheduler not in SCHEDULERS:
        raise _scheduler_error(scheduler)
    betas = tuple(float(b) for b in betas)
    config = dict(ds_config)
    param_groups = _weight_decay_groups(module, weight_decay)
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    optimizer = None
    if "optimizer" in config:
        pass  # the user's raw_json names an optimizer: respect it
    elif torch.cuda.is_available() or offload:
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
        }
    else:
        # CPU: torch's fused AdamW (one vectorised pass per tensor, ~3x faster than the default
        # per-op loop on CPU, the same update up to rounding)
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      fused=True)
        config["zero_allow_untested_optimizer"] = True

    def make_scheduler(opt):
        return LambdaLR(
            opt,
            lambda step: lr_multiplier(
                step, warmup_steps=warmup_steps, total_steps=total_steps, scheduler=scheduler
            ),
        )

    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=param_groups,
        optimizer=optimizer,
        lr_scheduler=make_scheduler,
        config=config,
    )
    if optimizer_in_backward:
        if optimizer is None or engine.world_size != 1 or engine.zero_optimization_stage() != 0:
            built = ("torch's AdamW" if optimizer is not None
                     else "an optimizer built by DeepSpeed (CUDA, offload or raw_json)")
            raise ConfigError("deepspeed.optimizer_in_backward=true is implemented for one CPU process with "
                              f"torch's AdamW (ZeRO-0, no offload, no raw_json optimizer); this run has {built}, "
                              f"{engine.world_size} process(es), ZeRO-{engine.zero_optimization_stage()}.")
        step_in_backward(optimizer)
    if engine.world_size == 1 and engine.zero_optimization_stage() == 0:
        # one process, plain data parallel: the gradient all-reduce averages over one rank, but
        # DeepSpeed still flattens every gradient into buckets and copies them back (~10% of a
        # SmolLM2 DPO step on CPU); skip it
        engine.enable_backward_allreduce = False
    return engine


def step_in_backward(optimizer: torch.optim.Optimizer) -> None:
    """Apply ``optimizer`` to each parameter as soon as its gradient is complete, then free the gradient.

    A post-accumulate-grad hook calls ``optimizer.step()`` while that parameter is the only one
    holding a gradient (the others are not computed yet or already consumed), so the update is
    the optimizer's own, with its state, param groups and the scheduler's current LR; the
    engine's ``step()`` afterwards finds no gradients and only advances the schedule. The full set
    of gradients never exists at once: at the end of a SmolLM2 backward that is 0.5 GB. Exact
    only without global-norm clipping and without accumulation (``validate`` enforces both).
    """

    def update(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    for group in optimizer.param_groups:
        for param in group["params"]:
            param.register_post_accumulate_grad_hook(update)


def init_frozen_engine(module: torch.nn.Module, ds_config: dict[str, Any]):
    """Wrap a frozen model (reference, reward judge) in an optimizer-less engine: eval mode, no grads.

    Under ZeRO-3 its parameters are sharded across ranks and gathered layer by layer in forward,
    so every rank must call forward the same number of times. Use inside ``torch.no_grad()``.
    """
    import deepspeed

    module.eval()
    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=dict(ds_config))
    engine.eval()
    return engine


def zero_stage(engine) -> int:
    """The engine's ZeRO stage (0 when ZeRO is off)."""
    return int(engine.zero_optimization_stage())
