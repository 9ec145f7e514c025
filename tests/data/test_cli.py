"""alignkit data validate|inspect|convert through Typer's test runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.data.cli import data_app
from alignkit.errors import DataError, UserError

BAD = Path(__file__).parent / "bad"
runner = CliRunner()


def test_validate_lists_located_problems_and_exits_nonzero():
    path = BAD / "k_mismatch.jsonl"
    result = runner.invoke(data_app, ["validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: scores: expected 3 scores (one per response) / found 2" in result.output
    assert "1 valid records (1 listwise), 1 problems (by field: scores 1)" in result.output


def test_validate_good_file_exits_zero(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"input": "Q", "output": "A"}])
    result = runner.invoke(data_app, ["validate", str(path), "--columns", "openrlhf"])
    assert result.exit_code == 0 and "1 valid records (1 sft), 0 problems" in result.output


def test_user_mistakes_raise_user_errors_not_tracebacks(tmp_path):
    result = runner.invoke(data_app, ["validate", str(tmp_path / "missing.jsonl")])
    assert isinstance(result.exception, DataError)
    result = runner.invoke(data_app, ["validate", str(BAD / "k_mismatch.jsonl"), "--format", "pairs"])
    assert isinstance(result.exception, UserError) and "valid choices: auto, sft, paired" in str(result.exception)


def test_convert_writes_atomically_and_reports_counts(tmp_path, write_jsonl):
    source = write_jsonl(tmp_path / "lw.jsonl", [{"prompt": "Q", "responses": ["a", "b", "c"], "scores": [2, 1, 1]}])
    target = tmp_path / "out" / "pairs.jsonl"
    result = runner.invoke(data_app, ["convert", str(source), str(target), "--to", "paired", "--strategy", "adjacent"])
    assert result.exit_code == 0, result.output
    assert "listwise -> paired (adjacent): 1 in, 1 out, dropped 1 (1 tie)" in result.output
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert rows == [{"prompt": "Q", "chosen": "a", "rejected": "b", "chosen_score": 2.0, "rejected_score": 1.0}]
    assert sorted(p.name for p in target.parent.iterdir()) == ["pairs.jsonl"]  # no temp file left


def test_convert_of_bad_input_leaves_no_output(tmp_path):
    target = tmp_path / "out.jsonl"
    result = runner.invoke(data_app, ["convert", str(BAD / "truncated_json.jsonl"), str(target), "--to", "unpaired"])
    assert isinstance(result.exception, DataError) and result.exception.location.endswith("truncated_json.jsonl:2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [[], ["--eval", str(BAD / "missing_field.jsonl")]])
def test_inspect_prints_samples_and_statistics(tmp_path, write_jsonl, extra):
    rows = [{"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Long answer here.", "rejected": "Short."},
            {"prompt": "Q1", "chosen": "Same", "rejected": "Same"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    # both records are rendered through the chat template (the string one too: data.chat_template=auto): 19 and 16 tokens
    result = runner.invoke(data_app, ["inspect", str(path), "--n", "1", "--max-length", "17", *extra])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Long answer here.<|im_end|>" in out and "records: 2 (2 paired)" in out
    assert "chosen == rejected: 1; chosen longer than rejected in 50.0% of pairs" in out
    assert "truncated at max_length=17: 50.0% of records" in out
    if extra:
        assert "prompts shared with the eval file: 1" in out  # "Q1" is in both


def test_validate_rejects_empty_files_and_unreadable_folders(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = runner.invoke(data_app, ["validate", str(empty)])
    assert result.exit_code == 1 and "expected records / found none" in result.output
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    result = runner.invoke(data_app, ["validate", str(folder)])
    assert isinstance(result.exception, DataError) and "save_to_disk" in str(result.exception)
