"""Every collective alignkit issues itself, placed on the device the process group can reduce.

A process group created with NCCL reduces only CUDA tensors, one created with gloo only CPU
tensors; a CPU tensor handed to NCCL fails at the first step of a multi-GPU run, and nothing on a
CPU-only CI shows it. So no module hands a tensor to ``torch.distributed.all_reduce`` & co. directly
(a test scans the source for that; object collectives such as ``broadcast_object_list`` place their
own buffers and may be called anywhere): they call these helpers, which build or move every tensor onto
``device()`` -- the accelerator's current device for NCCL-like backends, the CPU for gloo/MPI --
and hand results back where the caller's tensor lives.

The helpers run the collective whenever the process group is initialised, also in a world of
one (a few microseconds on gloo), so the single-process runs of the test suite go through the
same calls as a multi-GPU run. Without an initialised group they return their input.

Left out: async collectives, sub-groups, and barriers (they carry no tensor; call
``torch.distributed.barrier()`` directly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
CPU_BACKENDS = ("gloo", "mpi")


def active() -> bool:
    """Whether a process group is initialised (the helpers are identities otherwise)."""
    return dist.is_available() and dist.is_initialized()


def accelerator_device() -> torch.device:
    """The accelerator device of this process as DeepSpeed names it (``cuda:N`` on a GPU machine)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def device() -> torch.device:
    """Where a tensor must live to be reduced by the default process group."""
    if not active():
        return torch.device("cpu")
    backend = str(dist.get_backend())
    if backend in CPU_BACKENDS:
        return torch.device("cpu")
    return accelerator_device()


def all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    """Reduce a few Python floats over ranks (float64 on ``device()``)."""
    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op=_OPS[op])
    return tensor.cpu().tolist()


def all_reduce_sum(value: float) -> float:
    return all_reduce([value], "sum")[0]


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (every rank must call it)."""
    return all_reduce([1.0 if flag else 0.0], "max")[0] > 0


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; torch serialises them on ``device()``)."""
    if not active():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
