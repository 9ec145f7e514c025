"""The tokenized-data cache executes nothing it reads, and a bad file is reported, moved aside and rebuilt.

Every case plants or damages the cache file of the exact key ``prepare_data`` will look up, then
checks: no code ran (a marker file a pickle payload would create is absent), the stats line says
what happened, the bad file is kept aside, and the data equal a fresh build.
"""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from alignkit.data import cache as data_cache
from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.pipeline import cache_key, prepare_data


class Payload:
    """Unpickling this creates ``path`` (stands for any code an attacker would run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def setup(tmp_path, write_jsonl, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea.", "topic": {"n": i, "tags": ["a"]}}
            for i in range(12)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = DataConfig(train=[SourceConfig(path=str(path))], eval_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    key = cache_key(cfg, "pairwise", tiny_tokenizer)
    return cfg, key, tmp_path / "cache", tmp_path / "marker"


def fields(prepared):
    return [[(g.prompt_ids, g.completion_ids, g.completion_train_mask, g.scores, g.labels, g.example_id, g.extra)
             for g in split] for split in (prepared.train, prepared.eval)]


def test_round_trip_is_exact_and_uses_no_pickle(setup, tiny_tokenizer):
    cfg, key, cache_dir, _ = setup
    built = prepare_data(cfg, "pairwise", tiny_tokenizer)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == [f"{key}.safetensors"]
    assert (cache_dir / files[0]).read_bytes()[:2] != b"\x80\x04"  # not a pickle stream
    cached = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert cached.stats.cached and not built.stats.cached
    assert fields(cached) == fields(built)
    assert cached.train[0].extra == {"topic": {"n": cached.train[0].extra["topic"]["n"], "tags": ["a"]}}
    assert str(cached.stats) == str(built.stats) + "; from cache"


def test_scores_with_nan_and_labels_round_trip(tmp_path, write_jsonl, tiny_tokenizer):
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(6)]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = DataConfig(train=[SourceConfig(path=str(path))], cache_dir=str(tmp_path / "cache"))
    built = prepare_data(cfg, "unpaired", tiny_tokenizer)
    cached = prepare_data(cfg, "unpaired", tiny_tokenizer)
    assert cached.stats.cached and fields(cached) == fields(built)
    assert [g.labels for g in cached.train] == [g.labels for g in built.train] and built.train[0].labels is not None
    # NaN scores survive the JSON metadata
    groups = [built.train[0]]
    groups[0].scores = [float("nan"), 1.0]
    target = tmp_path / "nan.safetensors"
    data_cache.write_cache(target, "k", groups, [], built.stats)
    train, _, _ = data_cache.read_cache(target, "k")
    assert math.isnan(train[0].scores[0]) and train[0].scores[1] == 1.0


def test_planted_pickle_never_runs(setup, tiny_tokenizer):
    cfg, key, cache_dir, marker = setup
    cache_dir.mkdir()
    for name in (f"{key}.pkl", f"{key}.safetensors"):  # the old cache name, and the new one holding a pickle
        (cache_dir / name).write_bytes(pickle.dumps(Payload(marker)))
    prepared = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert not marker.exists(), "a planted cache file executed code"
    assert not prepared.stats.cached
    assert "was damaged (unreadable" in prepared.stats.cache_note and "moved aside" in prepared.stats.cache_note
    assert str(prepared.stats).endswith(prepared.stats.cache_note)
    aside = list(cache_dir.glob(f"{key}.safetensors.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == pickle.dumps(Payload(marker))
    again = prepare_data(cfg, "pairwise", tiny_tokenizer)  # rebuilt: the next run reads the new file quietly
    assert again.stats.cached and again.stats.cache_note == "" and not marker.exists()
    assert fields(again) == fields(prepared)


def _rewrite_token(path, old_to_new):
    """Change one token id inside the file's tensor bytes, keeping the header (and its checksum) as is."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(path))
    tensors["tokens"][3] = old_to_new(int(tensors["tokens"][3]))
    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("damage", ["values", "truncated", "other_key", "format", "lengths"])
def test_damaged_cache_is_reported_moved_aside_and_rebuilt(setup, tiny_tokenizer, damage):
    cfg, key, cache_dir, _ = setup
    fresh = prepare_data(cfg, "pairwise", tiny_tokenizer)
    path = cache_dir / f"{key}.safetensors"
    if damage == "values":
        _rewrite_token(path, lambda t: t + 1)
        reason = "checksum mismatch"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
        reason = "unreadable"
    elif damage == "other_key":
        data_cache.write_cache(path, "0" * 24, fresh.train, fresh.eval, fresh.stats)
        reason = "it holds key '000000000000000000000000'"
    elif damage == "format":
        from safetensors.torch import save_file

        save_file({"tokens": torch.zeros(3, dtype=torch.int64)}, str(path), metadata={"format": "x", "key": key})
        reason = "not an alignkit-data-cache/2 file"
    else:  # a forged file with a valid checksum whose lengths do not add up
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path))
        tensors["tokens"] = torch.cat([tensors["tokens"], torch.tensor([7])])
        save_file(tensors, str(path), metadata={"format": data_cache.FORMAT, "key": key,
                                                "sha256": data_cache._digest(**tensors)})
        reason = "lengths do not add up"
    prepared = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert not prepared.stats.cached
    assert f"data cache {path} was damaged ({reason}" in prepared.stats.cache_note
    assert len(list(cache_dir.glob(f"{key}.safetensors.bad-*"))) == 1
    assert fields(prepared) == fields(fresh)
    again = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert again.stats.cached and fields(again) == fields(fresh)


def test_extra_columns_json_cannot_carry_are_not_cached_and_said(setup, tiny_tokenizer):
    cfg, key, cache_dir, _ = setup
    fresh = prepare_data(cfg, "pairwise", tiny_tokenizer)
    group = fresh.train[0]
    group.extra = {"when": (1, 2)}  # a tuple would come back as a list
    with pytest.raises(data_cache.CacheUnsupported, match="would change type through JSON"):
        data_cache.write_cache(cache_dir / "x.safetensors", key, [group], [], fresh.stats)
    group.extra = {"blob": b"\x00"}
    with pytest.raises(data_cache.CacheUnsupported, match="cannot be stored as JSON"):
        data_cache.write_cache(cache_dir / "x.safetensors", key, [group], [], fresh.stats)
    assert not (cache_dir / "x.safetensors").exists() and not list(cache_dir.glob(".x*"))


def test_no_pickle_import_left_in_the_pipeline():
    import alignkit.data.cache
    import alignkit.data.pipeline

    for module in (alignkit.data.pipeline, alignkit.data.cache):
        source = open(module.__file__).read()
        assert "import pickle" not in source and "pickle.load" not in source


def test_a_source_whose_columns_json_cannot_carry_runs_uncached_and_says_so(tmp_path, tiny_tokenizer):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Q1?", "Q2?"], "chosen": ["A.", "B."], "rejected": ["C.", "D."],
                             "when": [datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)]}), tmp_path / "d.parquet")
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path / "d.parquet"))], cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert prepared.train[0].extra == {"when": datetime.date(2024, 1, 1)}  # the data itself is untouched
    assert prepared.stats.cache_note.startswith("not cached: ") and "date is not JSON serializable" in str(prepared.stats)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
