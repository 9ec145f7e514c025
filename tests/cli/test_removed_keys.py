"""A knob that was removed (issue 21: one precision knob, one LoRA-merge knob) fails at compose time
with a message naming its replacement, however it is set; a run frozen before the removal still loads."""

import pytest
from omegaconf import OmegaConf

from alignkit.config.compose import REMOVED_KEYS, compose, freeze, load_frozen
from alignkit.errors import ConfigError


@pytest.mark.parametrize(
    "override, replacement",
    [
        ("model.dtype=bf16", "deepspeed.dtype"),
        ("+model.dtype=bf16", "deepspeed.dtype"),
        ("++model.dtype=fp32", "deepspeed.dtype"),
        ("model.lora.merge_on_export=false", "trainer.merge_lora"),
        ("++model.lora.merge_on_export=true", "trainer.merge_lora"),
    ],
)
def test_a_removed_knob_names_its_replacement(override, replacement):
    with pytest.raises(ConfigError) as info:
        compose(["recipe=dpo_tiny", override])
    message = str(info.value)
    key = override.lstrip("+").split("=")[0]
    assert f"{key!r} was removed" in message and replacement in message, message


def test_the_kept_knobs_compose_and_the_removed_ones_are_gone():
    cfg = compose(["recipe=dpo_tiny", "deepspeed.dtype=bf16", "trainer.merge_lora=false", "model.lora.r=4"])
    assert cfg.deepspeed.dtype == "bf16" and cfg.trainer.merge_lora is False
    assert "dtype" not in cfg.model and "merge_on_export" not in cfg.model.lora
    for key in REMOVED_KEYS:
        assert OmegaConf.select(cfg, key) is None


def test_a_run_frozen_before_the_removal_still_loads(tmp_path):
    """Old run directories froze model.dtype and model.lora.merge_on_export (the schema wrote every
    key): resume and the workers load them without the removed keys (merge_on_export was never read;
    the model now loads in the precision deepspeed.dtype trains in, which DeepSpeed cast it to before)."""
    path = tmp_path / "config.yaml"
    freeze(compose(["recipe=dpo_tiny"]), path)
    old = OmegaConf.load(path)
    old.model.dtype = "fp32"
    old.model.lora.merge_on_export = True
    OmegaConf.save(old, path)
    cfg = load_frozen(path)
    assert "dtype" not in cfg.model and "merge_on_export" not in cfg.model.lora
    assert cfg.recipe == "dpo_tiny"
