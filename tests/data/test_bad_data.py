"""The malformed corpus under tests/data/bad/: every file yields its located error, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.data import sources
from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.pipeline import prepare_data, read_records
from alignkit.errors import DataError

BAD = Path(__file__).parent / "bad"

# file -> (line, field, text the message must contain)
CASES = {
    "truncated_json.jsonl": (2, None, "found invalid JSON"),
    "missing_field.jsonl": (3, "rejected", "expected a value in column 'rejected' / found no such column"),
    "wrong_type.jsonl": (2, "prompt", "expected a string or a list of messages / found int 42"),
    "empty_response.jsonl": (2, "chosen", "expected a non-empty response / found an empty string"),
    "k_mismatch.jsonl": (2, "scores", "expected 3 scores (one per response) / found 2"),
    "non_utf8.jsonl": (2, None, "expected UTF-8 text / found byte 0xe9 at column 16"),
    "huge_line.jsonl": (2, None, "expected a line of at most 1024 bytes / found a longer line"),
    "bad_role.jsonl": (1, "chosen[0].role", "expected one of system, user, assistant, tool / found str 'bot'"),
    "bad_label.jsonl": (2, "label", "expected a boolean (true/false or 1/0) / found str 'maybe'"),
    "extra_cell.csv": (3, None, "expected 3 columns / found more cells than header columns"),
    # stepwise rows (TRL's stepwise supervision): one label per step, non-empty steps, boolean labels
    "step_labels_short.jsonl": (2, "labels", "expected 2 labels (one per step in completions) / found 1"),
    "step_labels_long.jsonl": (2, "labels", "expected 1 label (one per step in completions) / found 2"),
    "step_empty.jsonl": (2, "completions[1]", "expected a non-empty step"),
    "step_bad_label.jsonl": (2, "labels[0]", "expected a boolean (true/false or 1/0) / found str '+'"),
}


@pytest.fixture(autouse=True)
def small_line_limit(monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 1024)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_bad_file_gives_one_located_error(name):
    line, field, text = CASES[name]
    path = BAD / name
    records, errors = read_records(str(path))
    assert len(errors) == 1, [str(e) for e in errors]
    error = errors[0]
    assert (error.location, error.field) == (f"{path}:{line}", field)
    assert text in error.detail
    assert str(error).startswith(f"{path}:{line}: " + (f"{field}: " if field else "") + "expected ")
    assert len(records) >= (1 if name != "bad_role.jsonl" else 0)  # good rows around the bad one still load


def test_truncated_json_document_is_located():
    with pytest.raises(DataError) as info:
        read_records(str(BAD / "truncated.json"))
    assert info.value.location == f"{BAD / 'truncated.json'}:4"


def test_training_fails_before_the_model_or_skips_and_counts(tiny_tokenizer):
    path = str(BAD / "missing_field.jsonl")
    cfg = DataConfig(train=[SourceConfig(path=path), SourceConfig(path=str(BAD / "k_mismatch.jsonl"))])
    with pytest.raises(DataError) as info:
        prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert str(info.value).startswith(f"{path}:3: rejected: expected")
    cfg.on_error = "skip"
    data = prepare_data(cfg, "pairwise", tiny_tokenizer)
    assert data.stats.skipped == 2 and len(data.train) == 2 + 1  # 2 paired + 1 pair from the listwise row
    assert "skipped 2 bad rows" in str(data.stats)
