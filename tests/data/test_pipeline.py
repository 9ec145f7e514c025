"""prepare_data (split, weights, cache keys)."""

from __future__ import annotations

import copy

import pytest

from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.pipeline import cache_key, prepare_data, tokenizer_fingerprint
from alignkit.errors import ConfigError


@pytest.fixture
def paired_file(tmp_path, write_jsonl):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."} for i in range(20)]
    rows += [{"prompt": "Question 0?", "chosen": "Zero.", "rejected": "One."}]  # a repeated prompt
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_eval_fraction_holds_out_whole_prompts_deterministically(paired_file, tiny_tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(paired_file))], eval_fraction=0.25, seed=3)
    first = prepare_data(cfg, "pairwise", tiny_tokenizer)
    again = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert [g.example_id for g in first.eval] == [g.example_id for g in again.eval]
    assert len(first.train) + len(first.eval) == 21 and 4 <= len(first.eval) <= 6
    train_prompts = {tuple(g.prompt_ids) for g in first.train}
    assert not train_prompts & {tuple(g.prompt_ids) for g in first.eval}


def test_source_weights_repeat_or_subsample(paired_file, tiny_tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(paired_file), weight=2.0),
                            SourceConfig(path=str(paired_file), weight=0.5)])
    data = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert len(data.train) == 2 * 21 + round(0.5 * 21)
    assert data.stats.train_groups == len(data.train) and data.eval == []


def test_bad_settings_fail_with_the_valid_choices(paired_file, tiny_tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(paired_file))], layout="pakced")
    with pytest.raises(ConfigError, match="data.layout='pakced' is not a valid choice. Valid choices: padded, packed"):
        prepare_data(cfg, "pairwise", tiny_tokenizer)


def test_cache_is_reused_and_rebuilt_when_inputs_change(paired_file, tiny_tokenizer, tmp_path):
    cfg = DataConfig(train=[SourceConfig(path=str(paired_file))], cache_dir=str(tmp_path / "cache"))
    built = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert not built.stats.cached and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    cached = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert cached.stats.cached and [g.example_id for g in cached.train] == [g.example_id for g in built.train]
    key = cache_key(cfg, "pairwise", tiny_tokenizer)
    assert cache_key(DataConfig(**{**cfg.__dict__, "layout": "packed"}), "pairwise", tiny_tokenizer) == key
    assert cache_key(DataConfig(**{**cfg.__dict__, "max_length": 99}), "pairwise", tiny_tokenizer) != key
    assert cache_key(cfg, "sft", tiny_tokenizer) != key
    other_template = copy.deepcopy(tiny_tokenizer)
    other_template.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other_template) != tokenizer_fingerprint(tiny_tokenizer)
    assert cache_key(cfg, "pairwise", other_template) != key
    with open(paired_file, "a") as handle:
        handle.write('{"prompt": "New?", "chosen": "Yes.", "rejected": "No."}\n')
    assert cache_key(cfg, "pairwise", tiny_tokenizer) != key
    rebuilt = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert not rebuilt.stats.cached and len(rebuilt.train) == 22
