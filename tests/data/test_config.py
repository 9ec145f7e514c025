"""DataConfig is an OmegaConf structured config, and its validate() names the valid choices."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from alignkit.data.config import DataConfig, SourceConfig
from alignkit.errors import ConfigError


def test_structured_config_round_trip():
    base = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(base, OmegaConf.create({
        "train": [{"path": "a.jsonl", "weight": 2, "column_map": {"prompt": "question"}}],
        "eval_fraction": 0.1, "max_tokens_per_row": 512, "label_threshold": 0.5,
    }))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and isinstance(cfg.train[0], SourceConfig)
    assert (cfg.train[0].weight, cfg.train[0].column_map, cfg.train[0].format) == (2.0, {"prompt": "question"}, None)
    cfg.validate()


@pytest.mark.parametrize("field,value,choices", [
    ("format", "pairs", "auto, sft, paired, unpaired, listwise, prompt, stepwise"),
    ("columns", "axolotl", "trl, openrlhf, llamafactory, nemo, hh_rlhf, ultrafeedback, nectar, orca, math_shepherd"),
    ("chat_template", "sometimes", "auto, always, never"),
    ("prompt_truncation", "middle", "keep_end, keep_start"),
    ("response_truncation", "cut", "truncate, drop"),
    ("pair_expansion", "random", "all_pairs, best_vs_worst, best_vs_rest, adjacent"),
    ("on_error", "ignore", "raise, skip"),
    ("layout", "ragged", "padded, packed, prefix_shared"),
    ("train_on", "all", "all_assistant, last_assistant"),
])
def test_enum_fields_list_valid_choices(field, value, choices):
    with pytest.raises(ConfigError) as info:
        DataConfig(**{field: value}).validate()
    assert f"data.{field}={value!r} is not a valid choice. Valid choices: {choices}." in str(info.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="max_prompt_length=600 must be < data.max_length=512"):
        DataConfig(max_length=512, max_prompt_length=600).validate()
    with pytest.raises(ConfigError, match=r"data.train\[0\].format='x' is not a valid choice"):
        DataConfig(train=[SourceConfig(path="a", format="x")]).validate()
