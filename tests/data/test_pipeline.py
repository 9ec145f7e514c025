"""prepare_data (split, weights, cache keys) and iterate_batches (determinism, sharding, resume)."""

from __future__ import annotations

import copy

import pytest

from alignkit.data.batch import TokenizedGroup
from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.pipeline import cache_key, iterate_batches, num_batches, prepare_data, tokenizer_fingerprint
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


def groups(n: int) -> list[TokenizedGroup]:
    return [TokenizedGroup([1, 2], [[3 + i % 5]], [[True]], example_id=str(i)) for i in range(n)]


def ids_of(batches) -> list[list[str]]:
    return [batch.example_ids for batch in batches]


def run(data, **kwargs):
    return ids_of(iterate_batches(data, layout="padded", pad_token_id=0, **{"batch_groups": 2, **kwargs}))


def test_iterate_batches_is_deterministic_per_seed_and_epoch():
    data = groups(10)
    assert run(data, seed=1, epoch=0) == run(data, seed=1, epoch=0)
    assert run(data, seed=1, epoch=0) != run(data, seed=1, epoch=1)
    assert sorted(sum(run(data, seed=1, epoch=1), [])) == sorted(g.example_id for g in data)
    assert run(data, shuffle=False) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"], ["8", "9"]]


def test_iterate_batches_shards_ranks_and_resumes():
    data = groups(10)
    rank0 = run(data, seed=4, world_size=2, rank=0)
    rank1 = run(data, seed=4, world_size=2, rank=1)
    assert len(rank0) == len(rank1) == num_batches(10, 2, 2) == 3  # 10 groups, global batch 4: last one wraps
    everything = sum(rank0, []) + sum(rank1, [])
    assert len(everything) == 12 and set(everything) == {g.example_id for g in data}
    single = run(data, seed=4, batch_groups=4)  # the same global batches, unsharded
    assert [sorted(a + b) for a, b in zip(rank0, rank1)][:2] == [sorted(s) for s in single[:2]]
    assert run(data, seed=4, world_size=2, rank=1, skip_batches=2) == rank1[2:]
