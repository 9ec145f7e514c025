"""DeepSpeed configuration built from a few knobs (stage, offload, dtype), plus a raw-JSON escape hatch.

``DeepSpeedConfig`` is the structured-config node ``deepspeed`` of the Hydra schema; its defaults
live here once. Two pure functions turn it into the dict ``deepspeed.initialize`` takes:

* ``build_train_ds_config`` for the trained model (policy, critic, reward model being trained);
* ``build_frozen_ds_config`` for frozen models (reference, reward judge): no optimizer, the same
  ZeRO stage when it is 3 (so the frozen model is sharded too), stage 0 otherwise (stages 1/2
  only partition optimizer state and gradients, which a frozen model has none of).

The optimizer block is not built here: ``engine.init_train_engine`` adds it, because it depends on
the learning rate and on the device (see there). Keys of ``raw_json`` (a JSON file) override the
built ones recursively, so users can reach every DeepSpeed option without a new knob.

Precision (``dtype``; ``auto`` is resolved by ``alignkit.engine.precision``):

* ``fp32``: everything in fp32 (the fp32 block: bf16 and fp16 off);
* ``bf16`` / ``fp16``: DeepSpeed's own mixed precision: the module's weights and gradients in
  16 bits, fp32 master weights and optimizer states inside DeepSpeed's optimizer wrapper (checked
  in 0.19.8: ZeRO-0 wraps the optimizer in ``FP16_Optimizer`` with flat fp32 master copies, ZeRO-1/2
  keep fp32 partitions, ZeRO-3 fp32 partitions); gradients accumulate in 16 bits across
  micro-batches at ZeRO-0 (DeepSpeed refuses fp32 accumulation there), exports are 16-bit;
* ``bf16_autocast``: the weights, gradients, optimizer states, all-reduces and exports stay fp32
  (DeepSpeed sees an fp32 model, every ZeRO stage and ``optimizer_in_backward`` work unchanged) and
  the engine runs each forward under ``torch.autocast(bf16)`` (DeepSpeed's ``torch_autocast``
  block, with no module's communication narrowed to bf16): matmuls and attention in bf16, the
  residual stream, norms and log-sum-exps in fp32. This is what ``auto`` picks on a CPU with bf16
  hardware: fp32 master weights for free, no 16-bit gradient accumulation, and the same
  arithmetic as TRL's ``bf16=True`` on CPU. The precomputed reference is computed by the same
  engine, hence in the same precision.

Left out on purpose: tensor/pipeline parallelism, ZeRO++ and MiCS knobs, autotuning, fp16 loss
scaling knobs (the dynamic defaults are used); reach them through ``raw_json``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from alignkit.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_CHOICES = ("none", "cpu")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "bf16_autocast")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed knobs; everything else keeps DeepSpeed's defaults or comes from ``raw_json``."""

    zero_stage: int = 0  # 0 = plain data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters
    offload_optimizer: str = "none"  # none | cpu (optimizer states and step on the CPU: DeepSpeedCPUAdam)
    offload_params: str = "none"  # none | cpu (ZeRO-3 only)
    # auto (bf16 on a bf16-capable GPU; on CPU fp32, or bf16_autocast on a CPU measured faster in bf16 with
    # unless ALIGNKIT_CPU_AUTO_BF16=0, see engine/precision.py) | fp32 | bf16 | fp16 | bf16_autocast (fp32 weights)
    dtype: str = "auto"
    gradient_clipping: float = 1.0  # max global grad norm; 0 disables
    # apply AdamW to each parameter as soon as its gradient is ready, then free that gradient (one
    # process, ZeRO-0, CPU fp32, no clipping, no accumulation): ~0.5 GB less peak memory on SmolLM2
    optimizer_in_backward: bool = False
    raw_json: Optional[str] = None  # path to a DeepSpeed JSON whose keys override the built ones

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the key and the valid choices."""
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(
                f"deepspeed.zero_stage={self.zero_stage!r} is not a ZeRO stage; valid: 0, 1, 2, 3 "
                "(or pick a preset: deepspeed=none|zero1|zero2|zero3|zero2_offload|zero3_offload)."
            )
        _check_choice("deepspeed.offload_optimizer", self.offload_optimizer, OFFLOAD_CHOICES)
        _check_choice("deepspeed.offload_params", self.offload_params, OFFLOAD_CHOICES)
        _check_choice("deepspeed.dtype", self.dtype, DTYPE_CHOICES)
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ConfigError(
                f"deepspeed.offload_params={self.offload_params!r} needs deepspeed.zero_stage=3 "
                f"(got {self.zero_stage}); parameters are only partitioned, hence offloadable, "
                "under ZeRO-3. Set deepspeed=zero3_offload or offload_params=none."
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError(
                "deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage >= 1 (ZeRO-Offload "
                "moves the partitioned optimizer state); set deepspeed=zero2_offload or zero_stage=2."
            )
        if self.gradient_clipping < 0:
            raise ConfigError(
                f"deepspeed.gradient_clipping={self.gradient_clipping} must be >= 0 (0 disables clipping)."
            )
        if self.optimizer_in_backward and self.dtype in ("bf16", "fp16"):
            raise ConfigError(
                f"deepspeed.optimizer_in_backward=true needs fp32 weights, but deepspeed.dtype={self.dtype} trains "
                "16-bit weights through DeepSpeed's master-weight optimizer (the per-parameter hooks would never "
                "see a gradient); use deepspeed.dtype=bf16_autocast (fp32 weights, bf16 matmuls) or fp32."
            )
        if self.optimizer_in_backward and (self.zero_stage != 0 or self.gradient_clipping > 0):
            raise ConfigError(
                "deepspeed.optimizer_in_backward=true updates each parameter while backward runs, so it "
                "cannot clip by the global gradient norm (known only at the end) or shard the optimizer: "
                f"set deepspeed.gradient_clipping=0 (got {self.gradient_clipping}) and deepspeed=none "
                f"(zero_stage 0, got {self.zero_stage})."
            )
        if self.raw_json is not None and not Path(self.raw_json).is_file():
            raise ConfigError(
                f"deepspeed.raw_json={self.raw_json!r} does not exist or is not a file; give the path "
                "of a DeepSpeed JSON config (its keys override the ones built from the knobs)."
            )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.")


def resolve_dtype(dtype: str, *, has_cuda: Optional[bool] = None) -> str:
    """``auto`` -> ``bf16`` on a bf16-capable GPU; on a CPU ``bf16_autocast`` where the CPU has bf16
    instructions and a cached probe measured bf16 matmuls faster (unless ``ALIGNKIT_CPU_AUTO_BF16=0``),
    else ``fp32``; other values pass through. The decision is
    ``precision.choose_dtype``, a pure function; this gathers its inputs on the machine.
    """
    if dtype != "auto":
        return dtype
    from alignkit.engine.precision import resolve_auto

    return resolve_auto(dtype, has_cuda=has_cuda).dtype


def weights_dtype(dtype: str, *, has_cuda: Optional[bool] = None) -> torch.dtype:
    """The dtype a model's weights load in for ``deepspeed.dtype=dtype``: the one DeepSpeed keeps
    them in (bf16 / fp16; fp32 for fp32 and bf16_autocast; ``auto`` resolved first), so loading
    neither holds a wider copy than training does nor narrows what DeepSpeed keeps in fp32."""
    _check_choice("deepspeed.dtype", dtype, DTYPE_CHOICES)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_dtype(dtype, has_cuda=has_cuda),
                                                               torch.float32)


def torch_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed keeps the module's parameters in for this config (bf16/fp16/fp32)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def _precision_block(dtype: str) -> dict[str, Any]:
    block: dict[str, Any] = {"bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"}}
    if dtype == "bf16_autocast":
        # fp32 weights; forward under torch.autocast(bf16). An empty module list keeps every parameter's
        # all-gather and gradient reduction in fp32 (DeepSpeed's default narrows nn.Linear's to bf16).
        block["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return block


def _zero_block(cfg: DeepSpeedConfig, *, stage: int, with_optimizer: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if with_optimizer and cfg.offload_optimizer != "none" and stage >= 1:
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        if cfg.offload_params != "none":
            zero["offload_param"] = {"device": cfg.offload_params, "pin_memory": torch.cuda.is_available()}
        # Lets export gather a consolidated 16-bit (or fp32) state dict on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def build_train_ds_config(
    cfg: DeepSpeedConfig,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    has_cuda: Optional[bool] = None,
) -> dict[str, Any]:
    """DeepSpeed config for a trained model: batch accounting, ZeRO stage and offload, precision, clipping.

    ``micro_batch_size`` is per process per forward pass; ``train_batch_size`` follows as
    micro x accumulation x world size. The batch sizes count whatever unit the trainer feeds
    (groups); DeepSpeed only uses them for its own accounting and ``is_gradient_accumulation_boundary``.
    """
    cfg.validate()
    dtype = resolve_dtype(cfg.dtype, has_cuda=has_cuda)
    built: dict[str, Any] = {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": _zero_block(cfg, stage=cfg.zero_stage, with_optimizer=True),
        **_precision_block(dtype),
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _apply_raw_json(built, cfg.raw_json)


def build_frozen_ds_config(cfg: DeepSpeedConfig, *, has_cuda: Optional[bool] = None) -> dict[str, Any]:
    """DeepSpeed config for a frozen model (reference, reward judge): no optimizer, sharded under ZeRO-3.

    Parameter offload follows ``cfg.offload_params`` (ZeRO-3 only); optimizer offload is meaningless
    here. ``train_micro_batch_size_per_gpu`` is a placeholder DeepSpeed insists on; the frozen engine
    is only called in forward.
    """
    cfg.validate()
    dtype = resolve_dtype(cfg.dtype, has_cuda=has_cuda)
    stage = 3 if cfg.zero_stage == 3 else 0
    built: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": _zero_block(cfg, stage=stage, with_optimizer=False),
        **_precision_block(dtype),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    raw = _apply_raw_json(built, cfg.raw_json)
    raw.pop("optimizer", None)
    raw.pop("scheduler", None)
    return raw


def _apply_raw_json(built: dict[str, Any], raw_json: Optional[str]) -> dict[str, Any]:
    if raw_json is None:
        return built
    try:
        overrides = json.loads(Path(raw_json).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"deepspeed.raw_json={raw_json!r} cannot be read as JSON ({err}); fix the file or drop the option."
        ) from None
    if not isinstance(overrides, dict):
        raise ConfigError(
            f"deepspeed.raw_json={raw_json!r} must hold a JSON object, not {type(overrides).__name__}."
        )
    return deep_merge(built, overrides)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``base`` with ``overrides`` applied recursively (override wins; ``"auto"`` keeps base)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif value == "auto" and key in merged:
            continue  # HF-style "auto" placeholders mean "whatever alignkit computes"
        else:
            merged[key] = copy.deepcopy(value)
    return merged
