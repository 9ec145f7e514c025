"""Loading DeepSpeed's ``torch.save`` files without running code: ``torch.load(weights_only=True)``.

Only tensors, containers and the few bookkeeping types DeepSpeed 0.19 stores (``safe_globals``) load;
a file holding anything else is refused with ``UnsafeCheckpoint`` before any of it runs.
``weights_only_loading(engine)`` makes an engine's checkpoint engine (and any direct ``torch.load``)
load that way while it is active. Left out: DeepSpeed's universal checkpoints (full pickle; refused).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch

from alignkit.engine.checkpoint.layout import UnsafeCheckpoint


def safe_globals() -> list[type]:
    """The non-tensor types DeepSpeed 0.19 pickles into model/optimizer state files (nothing else loads).

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints of ZeRO 0-3,
    fp32/bf16/fp16, CPU optimizer/parameter offload and LoRA: the loss scalers and the ZeRO stage
    enum of the optimizer states, ``fragment_address`` (ZeRO 1/2 parameter slices), and
    ``argparse.Namespace`` (the ``args`` DeepSpeed saves when ``deepspeed.initialize`` got them).
    All are rebuilt from plain attributes: unpickling them runs no user code.
    """
    import argparse

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [argparse.Namespace, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with ``safe_globals()`` allowed; anything else -> ``UnsafeCheckpoint``."""
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"GLOBAL (\S+)", str(error)) or re.search(r"global[s]?:? (\S+)", str(error))
            what = f" ({found.group(1).rstrip('.,')})" if found else ""
            raise UnsafeCheckpoint(
                f"{path} holds Python objects other than tensors and DeepSpeed's bookkeeping{what}; loading it "
                "would run code, so it was refused and nothing in it ran. If this checkpoint did not come from "
                "alignkit, do not use it; otherwise resume from another one with resume=PATH, or start fresh "
                "with resume=null."
            ) from None


@contextlib.contextmanager
def weights_only_loading(engine: Any) -> Iterator[None]:
    """While active, ``engine``'s checkpoint engine (and any direct ``torch.load``) load weights only."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    replaced = checkpoint_engine is not None
    if replaced:
        previous = checkpoint_engine.__dict__.get("load")
        checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(path, map_location)
    saved_env = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if replaced:
            if previous is None:
                del checkpoint_engine.load
            else:
                checkpoint_engine.load = previous
