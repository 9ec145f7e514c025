"""Export the trained model as a transformers folder (safetensors + config + tokenizer), atomically.

One path for every ZeRO stage: all ranks gather the full parameters
(``deepspeed.zero.GatheredParameters``; a no-op below ZeRO-3), rank 0 makes a standalone CPU copy
of the module (plain parameters, no DeepSpeed hooks), applies the caller's optional ``prepare``
hook to that copy, and hands it to ``alignkit.models.load.export_pretrained``, which merges LoRA
(on a copy; or saves the adapter alone with ``merge_lora=False``) and writes a temp folder renamed
to ``out_dir``. The live training module is never modified, so an export in the middle of a run
is safe and training continues.

Run folders: the policy (or reward model) goes to ``RUN_DIR/final``; PPO also writes its critic to
``RUN_DIR/final_critic`` through this same path, with ``prepare=ValueModel.as_token_classifier``
(a ``*ForTokenClassification`` folder, LoRA always merged, that ``alignkit.models.value.load_value_model``
loads back). A sibling rather than a sub-folder of ``final``, so each folder is replaced atomically
on its own and ``final`` stays exactly one model.

Memory: while gathering, every rank holds the full model once (fine up to ~8B on 80 GB GPUs);
rank 0 also holds a CPU copy. The copy keeps the engine's dtype (bf16 on GPU, fp32 here).

Permissions follow the umask (``follow_umask``): files 0o666 and folders 0o777 less the umask,
whatever mode the writers chose (``final/model.safetensors`` was 0600, ``final/`` 0755 under umask 077).

Left out: sharded export without gathering (DeepSpeed's ``zero_to_fp32`` does that offline from a
checkpoint), pushing to a hub, GGUF export.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import torch

PrepareHook = Callable[[torch.nn.Module], torch.nn.Module]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def standalone_cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A CPU deep copy of ``module`` with plain parameters and no forward/backward hooks.

    Call it while the parameters are gathered (under ZeRO-3 each parameter carries DeepSpeed
    attributes and its modules carry fetch/release hooks; both are dropped). Tied parameters stay tied.
    """
    clone = copy.deepcopy(module)
    fresh: dict[int, torch.nn.Parameter] = {}
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in fresh:
                data = param.data.detach().to("cpu", copy=True)
                fresh[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
            sub._parameters[name] = fresh[id(param)]
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = buf.detach().to("cpu", copy=True)
        for hooks in (
            sub._forward_hooks,
            sub._forward_pre_hooks,
            sub._backward_hooks,
            sub._backward_pre_hooks,
        ):
            hooks.clear()
        for attr in ("ds_external_parameters", "_external_params"):
            sub.__dict__.pop(attr, None)
    return clone


def gathered_cpu_copy(module: torch.nn.Module) -> torch.nn.Module | None:
    """All ranks call it; rank 0 gets ``standalone_cpu_copy`` of the full model, other ranks None."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        clone = standalone_cpu_copy(module) if _rank() == 0 else None
    return clone


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes ``open``/``mkdir`` would: 0o666 / 0o777 less the umask.

    Writers on the way (temp folders from ``mkdtemp``, safetensors) create private or fixed
    modes; an exported model is an ordinary folder, shared as the user's umask says. Symlinks are
    left alone (``os.walk`` does not follow them and ``chmod`` is not applied to them).
    """
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def _unwrap(engine_or_module) -> torch.nn.Module:
    return getattr(engine_or_module, "module", engine_or_module)


def export_hf_model(
    engine,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    prepare: PrepareHook | None = None,
    merge_lora: bool = True,
) -> Path | None:
    """Write ``out_dir`` (safetensors weights, config, tokenizer) loadable by ``from_pretrained``.

    Every rank must call it. ``engine`` is a DeepSpeed engine (or a plain module) wrapping a
    transformers or peft model; ``tokenizer`` may be None. ``prepare(model) -> model`` runs on rank 0
    on the CPU copy before saving. Writing (atomic rename, LoRA merged unless ``merge_lora=False``,
    which saves the adapter alone) is ``alignkit.models.load.export_pretrained``.
    Returns ``out_dir`` on rank 0, None elsewhere.
    """
    from alignkit.models.load import export_pretrained

    model = gathered_cpu_copy(_unwrap(engine))
    result = None
    if _rank() == 0:
        if prepare is not None:
            model = prepare(model)
        result = export_pretrained(model, tokenizer, out_dir, merge_lora=merge_lora)
        follow_umask(Path(out_dir))
    _barrier()
    return result
