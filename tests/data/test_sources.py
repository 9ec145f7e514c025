"""Sources as people get them: compressed files, globs, verl and hub-layout parquet folders, README
subsets, splits; and every unreadable source is one located paragraph, never a traceback."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest

from alignkit.data.pipeline import read_records
from alignkit.data.sources import fingerprint_source, iter_rows
from alignkit.errors import DataError

PAIR = {"prompt": "Q", "chosen": "A", "rejected": "B"}


def _lines(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _gsm8k_verl(split: str, n: int) -> list[dict]:
    """verl's examples/data_preprocess/gsm8k.py output schema (prompt as chat messages, nested reward_model)."""
    return [{"data_source": "openai/gsm8k",
             "prompt": [{"role": "user", "content": f"{split} question {i} Let's think step by step and output "
                                                    "the final answer after \"####\"."}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i)},
             "extra_info": {"split": split, "index": i, "answer": f"... #### {i}", "question": f"{split} question {i}"}}
            for i in range(n)]


# ---------------------------------------------------------------- compressed files


@pytest.mark.parametrize("suffix,compress", [(".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress),
                                             (".jsonl.xz", lzma.compress)])
def test_compressed_jsonl_keeps_line_numbers_of_bad_lines(tmp_path, suffix, compress):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(compress(_lines([PAIR, '{"prompt": "Q2", "chosen": "A"', {**PAIR, "prompt": "Q3"}])))
    records, errors = read_records(str(path))
    assert [r.prompt for r in records] == ["Q", "Q3"]
    assert [e.location for e in errors] == [f"{path}:2"]
    assert "invalid JSON" in errors[0].detail


def test_compressed_json_and_csv(tmp_path):
    json_gz = tmp_path / "d.json.gz"
    json_gz.write_bytes(gzip.compress(json.dumps([PAIR, {**PAIR, "prompt": "Q2"}], indent=1).encode()))
    records, errors = read_records(str(json_gz))
    assert errors == [] and [r.prompt for r in records] == ["Q", "Q2"]
    assert records[1].location == f"{json_gz}:7"  # line of the item in the decompressed text
    csv_gz = tmp_path / "d.csv.gz"
    csv_gz.write_bytes(gzip.compress(b"prompt,completion\nQ,A\n"))
    records, errors = read_records(str(csv_gz))
    assert errors == [] and [(r.prompt, r.completions) for r in records] == [("Q", ["A"])]


def test_truncated_gzip_is_a_located_error_not_a_traceback(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    whole = gzip.compress(_lines([PAIR] * 200))
    path.write_bytes(whole[: len(whole) // 2])
    records, errors = read_records(str(path))
    assert len(errors) == 1 and "cannot be decompressed" in errors[0].detail
    assert errors[0].location == f"{path}:{len(records) + 1}"
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(_lines([PAIR]))
    _, errors = read_records(str(not_gzip))
    assert [e.location for e in errors] == [f"{not_gzip}:1"] and "cannot be decompressed" in errors[0].detail


def test_zstd_jsonl(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(_lines([PAIR, "not json"])))
    records, errors = read_records(str(path))
    assert len(records) == 1 and [e.location for e in errors] == [f"{path}:2"]


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "d.json"  # many hub datasets ship JSON Lines under a .json name
    path.write_bytes(_lines([PAIR, {**PAIR, "chosen": None}]))
    records, errors = read_records(str(path))
    assert len(records) == 1 and [(e.location, e.field) for e in errors] == [(f"{path}:2", "chosen")]


def test_unknown_suffix_is_named(tmp_path):
    path = tmp_path / "d.parquet.gz"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"expected a file ending in .* found '.parquet.gz'"):
        read_records(str(path))


# ---------------------------------------------------------------- globs


def test_glob_reads_matches_in_sorted_order_with_their_own_locations(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.jsonl").write_bytes(_lines([{**PAIR, "prompt": "B1"}, "oops"]))
    (tmp_path / "data" / "a.jsonl.gz").write_bytes(gzip.compress(_lines([{**PAIR, "prompt": "A1"}])))
    (tmp_path / "data" / "notes.txt").write_text("not matched")
    records, errors = read_records(str(tmp_path / "data" / "*.jsonl*"))
    assert [(r.prompt, r.location) for r in records] == [
        ("A1", f"{tmp_path}/data/a.jsonl.gz:1"), ("B1", f"{tmp_path}/data/b.jsonl:1")]
    assert [e.location for e in errors] == [f"{tmp_path}/data/b.jsonl:2"]


def test_parquet_shard_glob(tmp_path):
    for i in range(2):
        _parquet(tmp_path / f"train-0000{i}-of-00002.parquet", [{**PAIR, "prompt": f"S{i}R{j}"} for j in range(2)])
    records, _ = read_records(str(tmp_path / "train-*.parquet"))
    assert [r.prompt for r in records] == ["S0R0", "S0R1", "S1R0", "S1R1"]
    assert records[3].location == f"{tmp_path}/train-00001-of-00002.parquet:row 2"


def test_glob_matching_nothing_says_what_the_folder_holds(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    with pytest.raises(DataError) as info:
        read_records(str(tmp_path / "data" / "*.jsonl"))
    message = str(info.value)
    assert "expected files matching the glob" in message and "found none" in message
    assert f"The folder {tmp_path}/data holds: train.json." in message
    assert "\n" not in message


def test_a_file_or_glob_is_split_train_only(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(_lines([PAIR]))
    assert len(read_records(str(path), split="train")[0]) == 1  # as datasets: a lone file is split 'train'
    for source in (str(path), str(tmp_path / "*.jsonl")):
        with pytest.raises(DataError, match="split 'test' was asked of a"):
            read_records(source, split="test")
    with pytest.raises(DataError, match="subset 'main' was asked of a single file"):
        read_records(str(path), subset="main")


def test_missing_file_lists_the_folder(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(_lines([PAIR]))
    with pytest.raises(DataError) as info:
        read_records(str(tmp_path / "trian.jsonl"))
    assert "found nothing at" in str(info.value) and "holds: train.jsonl" in str(info.value)


# ---------------------------------------------------------------- folders


def test_verl_parquet_folder_train_and_test(tmp_path):
    folder = tmp_path / "data" / "gsm8k"  # verl writes ~/data/gsm8k/train.parquet + test.parquet
    _parquet(folder / "train.parquet", _gsm8k_verl("train", 3))
    _parquet(folder / "test.parquet", _gsm8k_verl("test", 2))
    train, errors = read_records(str(folder))
    assert errors == [] and len(train) == 3
    test, _ = read_records(str(folder), split="test")
    assert [r.format for r in test] == ["prompt", "prompt"]
    assert test[1].prompt == [{"role": "user", "content": _gsm8k_verl("test", 2)[1]["prompt"][0]["content"]}]
    assert test[0].location == f"{folder}/test.parquet:row 1"
    with pytest.raises(DataError) as info:
        read_records(str(folder), split="validation")
    assert "expected split 'validation' / found splits ['test', 'train']" in str(info.value)
    assert info.value.location == str(folder)


def test_hub_layout_folder_reads_every_shard_of_the_split(tmp_path):
    folder = tmp_path / "ultrafeedback"
    for i in range(2):
        _parquet(folder / "data" / f"train-0000{i}-of-00002.parquet", [{**PAIR, "prompt": f"train{i}"}])
    _parquet(folder / "data" / "test-00000-of-00001.parquet", [{**PAIR, "prompt": "test0"}])
    (folder / "README.md").write_text("# a dataset card without YAML\n")
    assert [r.prompt for r in read_records(str(folder))[0]] == ["train0", "train1"]
    test, _ = read_records(str(folder), split="test")
    assert [(r.prompt, r.location) for r in test] == [("test0", f"{folder}/data/test-00000-of-00001.parquet:row 1")]


def test_jsonl_folder_keeps_line_locations(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(_lines([PAIR, {"prompt": "Q"}, PAIR]))
    (tmp_path / "validation.jsonl").write_bytes(_lines([PAIR]))
    records, errors = read_records(str(tmp_path))
    assert len(records) == 2 and errors[0].location == f"{tmp_path}/train.jsonl:2"
    assert len(read_records(str(tmp_path), split="validation")[0]) == 1


def test_readme_configs_choose_the_subset(tmp_path):
    """openai/gsm8k's layout: main/ and socratic/ subsets declared in the README's YAML configs."""
    for subset in ("main", "socratic"):
        for split in ("train", "test"):
            _parquet(tmp_path / subset / f"{split}-00000-of-00001.parquet",
                     [{"question": f"{subset} {split}", "answer": "Natalia sold 48/2 = 24 clips.\n#### 72"}])
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n" + "".join(
            f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train-*\n"
            f"  - split: test\n    path: {s}/test-*\n" for s in ("main", "socratic")) + "---\n# gsm8k\n")
    rows = list(iter_rows(str(tmp_path), "test", "socratic"))
    assert [r.data["question"] for r in rows] == ["socratic test"]
    with pytest.raises(DataError, match=r"expected subset 'nope' / found subsets \['main', 'socratic'\]"):
        iter_rows(str(tmp_path), "test", "nope")
    with pytest.raises(DataError, match=r"expected a subset / found none given.*\['main', 'socratic'\]"):
        iter_rows(str(tmp_path))


def test_folder_with_only_other_splits_or_nothing(tmp_path):
    _parquet(tmp_path / "one" / "test.parquet", [PAIR])
    assert len(read_records(str(tmp_path / "one"))[0]) == 1  # the only split
    _parquet(tmp_path / "two" / "test.parquet", [PAIR])
    _parquet(tmp_path / "two" / "validation.parquet", [PAIR])
    with pytest.raises(DataError, match=r"expected a split / found splits \['test', 'validation'\]"):
        read_records(str(tmp_path / "two"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="save_to_disk / found none"):
        read_records(str(tmp_path / "empty"))


def test_folder_of_text_files_goes_through_load_dataset(tmp_path):
    (tmp_path / "train.txt").write_text("line one\nline two\n")
    rows = list(iter_rows(str(tmp_path)))
    assert [(r.location, r.data) for r in rows] == [(f"{tmp_path} (split train):row 1", {"text": "line one"}),
                                                    (f"{tmp_path} (split train):row 2", {"text": "line two"})]


def test_save_to_disk_folder_wrong_split_lists_splits(tmp_path):
    import datasets

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([PAIR]),
                          "test_prefs": datasets.Dataset.from_list([PAIR])}).save_to_disk(str(tmp_path / "uf"))
    with pytest.raises(DataError, match=r"expected a split / found splits \['test_prefs', 'train_prefs'\]"):
        read_records(str(tmp_path / "uf"))
    assert len(read_records(str(tmp_path / "uf"), split="test_prefs")[0]) == 1


# ---------------------------------------------------------------- hub names


def test_hub_name_passes_subset_and_split_and_lists_splits(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None):
        calls.append((name, subset, split))
        if split != "train_prefs":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train_prefs', 'test_prefs'].")
        return datasets.Dataset.from_list([PAIR])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records, _ = read_records("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs", subset="default")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "default", "train_prefs")]
    assert records[0].location == "HuggingFaceH4/ultrafeedback_binarized (split train_prefs):row 1"
    with pytest.raises(DataError) as info:
        read_records("HuggingFaceH4/ultrafeedback_binarized")
    assert "expected split 'train' / found splits ['train_prefs', 'test_prefs']" in str(info.value)


def test_fingerprint_of_a_glob_follows_its_files(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_lines([PAIR]))
    before = fingerprint_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "b.jsonl").write_bytes(_lines([PAIR]))
    assert fingerprint_source(str(tmp_path / "*.jsonl")) != before


# ---------------------------------------------------------------- the data CLI takes the same source options


def test_cli_validate_and_inspect_take_split_subset_and_column_map(tmp_path):
    from typer.testing import CliRunner

    from alignkit.data.cli import data_app

    runner = CliRunner()
    folder = tmp_path / "gsm8k"
    _parquet(folder / "train.parquet", [{"question": "Q1", "answer": "#### 1"}])
    _parquet(folder / "test.parquet", [{"question": "T1", "answer": "#### 2"}, {"question": None, "answer": "x"}])
    result = runner.invoke(data_app, ["validate", str(folder), "--split", "test", "--column-map", "prompt=question"])
    assert result.exit_code == 1, result.output
    assert f"{folder}/test.parquet:row 2: prompt" in result.output
    assert f"{folder} (split test): 1 valid records (1 prompt), 1 problems" in result.output
    result = runner.invoke(data_app, ["validate", str(folder), "--split", "nope", "--map", "prompt=question"])
    assert isinstance(result.exception, DataError) and "found splits ['test', 'train']" in str(result.exception)
    result = runner.invoke(data_app, ["inspect", str(folder), "--split", "train", "--column-map", "prompt=question",
                                      "--eval", str(folder), "--eval-split", "test", "--n", "1"])
    assert result.exit_code == 0, result.output
    assert "records: 1 (1 prompt)" in result.output and "prompts shared with the eval file: 0" in result.output


def test_cli_validate_reads_what_training_reads_from_config_overrides(tmp_path):
    from typer.testing import CliRunner

    from alignkit.data.cli import data_app

    runner = CliRunner()
    path = tmp_path / "mine.jsonl.gz"
    path.write_bytes(gzip.compress(_lines([PAIR, {"prompt": "Q2", "chosen": "A"}])))
    result = runner.invoke(data_app, ["validate", "recipe=dpo_tiny", f"data.train=[{{path: '{path}'}}]",
                                      "data.eval=[]"])
    assert result.exit_code == 1, result.output
    assert f"{path}:2: rejected" in result.output
    assert f"data.train[0]: {path}: 1 valid records (1 paired), 1 problems" in result.output
    assert "data.eval" not in result.output
    result = runner.invoke(data_app, ["validate", "recipe=dpo_tiny", "--split", "test"])
    assert "--split only go with a PATH" in str(result.exception)


@pytest.mark.parametrize("args,expected", [
    (["missing.jsonl"], "expected an existing file or folder / found nothing at 'missing.jsonl'. The folder"),
    (["nothing/*.jsonl"], "expected files matching the glob 'nothing/*.jsonl' / found none."),
    (["gsm8k", "--split", "tset"], "gsm8k: expected split 'tset' / found splits ['test', 'train']"),
    (["bad.jsonl.gz", "--split", "test"], "split 'test' was asked of a single file"),
])
def test_unreadable_sources_are_one_paragraph_from_the_main_cli(tmp_path, monkeypatch, capsys, args, expected):
    from alignkit.cli import main

    _parquet(tmp_path / "gsm8k" / "train.parquet", _gsm8k_verl("train", 1))
    _parquet(tmp_path / "gsm8k" / "test.parquet", _gsm8k_verl("test", 1))
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(_lines([PAIR])))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["alignkit", "data", "validate", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and expected in err, err
