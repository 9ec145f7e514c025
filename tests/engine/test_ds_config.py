"""Snapshot tests of the DeepSpeed config builders and the knob validation."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.engine.config import (
    DeepSpeedConfig,
    build_frozen_ds_config,
    build_train_ds_config,
    deep_merge,
    resolve_dtype,
    torch_dtype,
)
from alignkit.errors import ConfigError

COMMON = {"steps_per_print": 10**9, "wall_clock_breakdown": False}
FP32 = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}


def test_stage0_fp32_train_snapshot():
    got = build_train_ds_config(
        DeepSpeedConfig(zero_stage=0, dtype="fp32"), micro_batch_size=2, grad_accum_steps=4, world_size=3
    )
    assert got == {
        "train_batch_size": 24,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        **FP32,
        **COMMON,
    }


def test_stage2_offload_train_snapshot():
    cfg = DeepSpeedConfig(zero_stage=2, offload_optimizer="cpu", dtype="bf16", gradient_clipping=0.5)
    got = build_train_ds_config(cfg, micro_batch_size=1, grad_accum_steps=1, world_size=2, has_cuda=False)
    assert got["zero_optimization"] == {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    }
    assert got["bf16"] == {"enabled": True} and got["fp16"] == {"enabled": False}
    assert got["gradient_clipping"] == 0.5
    assert got["train_batch_size"] == 2


def test_stage3_offload_train_and_frozen_snapshot():
    cfg = DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_params="cpu", dtype="fp16")
    train = build_train_ds_config(cfg, micro_batch_size=1, grad_accum_steps=2, world_size=8)
    assert train["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()},
        "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()},
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    frozen = build_frozen_ds_config(cfg)
    assert frozen == {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()},
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "bf16": {"enabled": False},
        "fp16": {"enabled": True},
        **COMMON,
    }


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_frozen_below_stage3_is_unsharded(stage):
    frozen = build_frozen_ds_config(DeepSpeedConfig(zero_stage=stage, dtype="fp32"))
    assert frozen["zero_optimization"] == {"stage": 0}
    assert "optimizer" not in frozen and "train_batch_size" not in frozen


def test_raw_json_overrides_built_keys(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(
        json.dumps(
            {
                "zero_optimization": {"reduce_bucket_size": 1000, "stage": "auto"},
                "gradient_clipping": 2.0,
                "train_batch_size": "auto",
                "optimizer": {"type": "Lamb"},
            }
        )
    )
    cfg = DeepSpeedConfig(zero_stage=2, dtype="fp32", raw_json=str(raw))
    train = build_train_ds_config(cfg, micro_batch_size=2, grad_accum_steps=1, world_size=1)
    assert train["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert train["gradient_clipping"] == 2.0
    assert train["train_batch_size"] == 2  # "auto" keeps the computed value
    assert train["optimizer"] == {"type": "Lamb"}
    assert "optimizer" not in build_frozen_ds_config(cfg)


def test_raw_json_unreadable_is_config_error(tmp_path):
    raw = tmp_path / "bad.json"
    raw.write_text("{not json")
    with pytest.raises(ConfigError, match="raw_json"):
        build_train_ds_config(
            DeepSpeedConfig(raw_json=str(raw)), micro_batch_size=1, grad_accum_steps=1, world_size=1
        )
    with pytest.raises(ConfigError, match="does not exist"):
        DeepSpeedConfig(raw_json=str(tmp_path / "missing.json")).validate()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"zero_stage": 4}, ["zero_stage", "0, 1, 2, 3"]),
        ({"offload_optimizer": "nvme"}, ["offload_optimizer", "none, cpu"]),
        ({"dtype": "float32"}, ["dtype", "auto, fp32, bf16, fp16"]),
        ({"zero_stage": 2, "offload_params": "cpu"}, ["offload_params", "zero_stage=3"]),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, ["offload_optimizer", "zero_stage"]),
        ({"gradient_clipping": -1.0}, ["gradient_clipping"]),
    ],
)
def test_validate_names_key_and_choices(kwargs, words):
    with pytest.raises(ConfigError) as err:
        DeepSpeedConfig(**kwargs).validate()
    for word in words:
        assert word in str(err.value)


def test_structured_config_roundtrip():
    node = OmegaConf.structured(DeepSpeedConfig)
    node.zero_stage = 3
    assert OmegaConf.to_object(node) == DeepSpeedConfig(zero_stage=3)


def test_dtype_resolution():
    assert resolve_dtype("auto", has_cuda=False) == "fp32"
    assert resolve_dtype("bf16", has_cuda=False) == "bf16"
    assert torch_dtype({"bf16": {"enabled": True}}) is torch.bfloat16
    assert torch_dtype({"fp16": {"enabled": True}}) is torch.float16
    assert torch_dtype({"bf16": {"enabled": False}}) is torch.float32


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": 2}}
    over = {"a": {"b": 5, "d": {"e": 1}}}
    merged = deep_merge(base, over)
    assert merged == {"a": {"b": 5, "c": 2, "d": {"e": 1}}}
    assert base == {"a": {"b": 1, "c": 2}}
    merged["a"]["d"]["e"] = 9
    assert over["a"]["d"]["e"] == 1
