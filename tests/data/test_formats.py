"""Every format and column layout loads into the canonical record, from every kind of source."""

from __future__ import annotations

import csv
import json

import pytest

from alignkit.data.pipeline import read_records
from alignkit.data.sources import RawRow
from alignkit.data.formats import parse_row
from alignkit.errors import DataError

USER = [{"role": "user", "content": "2+2?"}]
GOOD = [{"role": "assistant", "content": "4"}]
BAD = [{"role": "assistant", "content": "5"}]


def parse(data: dict, fmt: str = "auto", preset: str = "trl", column_map=None):
    return parse_row(RawRow("f.jsonl:7", data), fmt, preset, column_map)


def test_trl_string_formats():
    sft = parse({"prompt": "Q", "completion": "A"})
    assert (sft.format, sft.prompt, sft.completions) == ("sft", "Q", ["A"])
    paired = parse({"prompt": "Q", "chosen": "A", "rejected": "B", "id": 3})
    assert (paired.format, paired.completions, paired.scores, paired.extra) == ("paired", ["A", "B"], None, {"id": 3})
    unpaired = parse({"prompt": "Q", "completion": "A", "label": False})
    assert (unpaired.format, unpaired.labels, unpaired.scores) == ("unpaired", [0.0], None)
    scored = parse({"prompt": "Q", "completion": "A", "score": 0.25})
    assert (scored.format, scored.labels, scored.scores) == ("unpaired", None, [0.25])
    listwise = parse({"prompt": "Q", "responses": ["a", "b", "c"], "scores": [1, 3, 3]})
    assert (listwise.format, listwise.scores) == ("listwise", [1.0, 3.0, 3.0])
    ranked = parse({"prompt": "Q", "responses": ["a", "b"], "ranks": [2, 1]})
    assert ranked.scores == [-2.0, -1.0]  # lower rank = better = higher score
    prompt = parse({"prompt": "Q", "answer": "42"})
    assert (prompt.format, prompt.completions, prompt.extra) == ("prompt", [], {"answer": "42"})


def test_trl_conversational_formats():
    messages = USER + GOOD + [{"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    sft = parse({"messages": [{"role": "system", "content": "be brief"}] + messages})
    assert sft.prompt == [{"role": "system", "content": "be brief"}] + USER  # up to the first assistant turn
    assert sft.completions == [messages[1:]]
    paired = parse({"prompt": USER, "chosen": GOOD, "rejected": BAD})
    assert (paired.prompt, paired.completions) == (USER, [GOOD, BAD])
    implicit = parse({"chosen": USER + GOOD, "rejected": USER + BAD})
    assert (implicit.format, implicit.prompt, implicit.completions) == ("paired", USER, [GOOD, BAD])
    mixed = parse({"prompt": USER, "chosen": "4", "rejected": "5"})  # string responses to a chat prompt
    assert mixed.completions == [GOOD, BAD]


def test_paired_scores_and_margin():
    row = {"prompt": "Q", "chosen": "A", "rejected": "B", "score_chosen": 8, "score_rejected": 3}
    assert parse(row).scores == [8.0, 3.0]
    assert parse({"prompt": "Q", "chosen": "A", "rejected": "B", "margin": 0.5}).scores == [0.5, 0.0]


def test_openrlhf_keys_and_explicit_column_map():
    sft = parse({"input": "Q", "output": "A"}, preset="openrlhf")
    assert (sft.format, sft.prompt, sft.completions) == ("sft", "Q", ["A"])
    paired = parse({"question": "Q", "good": "A", "bad": "B"}, preset="openrlhf",
                   column_map={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (paired.format, paired.prompt, paired.completions) == ("paired", "Q", ["A", "B"])


def test_llamafactory_layouts():
    alpaca = parse({"instruction": "Add", "input": "2 2", "chosen": "4", "rejected": "5"}, preset="llamafactory")
    # LLaMA-Factory renders every row through the chat template: the prompt is a user turn
    assert (alpaca.format, alpaca.prompt, alpaca.completions) == (
        "paired", [{"role": "user", "content": "Add\n2 2"}],
        [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]])
    sharegpt = parse({"conversations": [{"from": "human", "value": "2+2?"}],
                      "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
                     preset="llamafactory")
    assert (sharegpt.prompt, sharegpt.completions) == (USER, [GOOD, BAD])
    kto = parse({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
                 "kto_tag": True}, preset="llamafactory")
    assert (kto.format, kto.prompt, kto.completions, kto.labels) == ("unpaired", USER, [GOOD], [1.0])
    sft = parse({"instruction": "Hi", "output": "Hello", "system": "S", "history": [["a", "b"]]}, preset="llamafactory")
    # LLaMA-Factory trains the history's responses too in SFT: they are part of the completion
    assert sft.prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]
    assert sft.completions == [[{"role": "assistant", "content": "b"}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]]


def test_nemo_layouts():
    completions = [{"rank": 1, "completion": "good"}, {"rank": 0, "completion": "best"}]
    listwise = parse({"context": "Q", "completions": completions}, preset="nemo")
    assert (listwise.format, listwise.prompt, listwise.completions, listwise.scores) == (
        "listwise", "Q", ["good", "best"], [-1.0, 0.0])
    paired = parse({"prompt": "Q", "chosen_response": "A", "rejected_response": "B"}, preset="nemo")
    assert paired.completions == ["A", "B"]


def test_explicit_format_overrides_detection():
    with pytest.raises(DataError) as info:
        parse({"prompt": "Q", "completion": "A"}, fmt="paired")
    assert str(info.value) == ("f.jsonl:7: chosen: expected a value in column 'chosen' / "
                               "found no such column (columns: ['completion', 'prompt'])")


ROWS = [{"prompt": "Q1", "chosen": "A", "rejected": "B"}, {"prompt": "Q2", "chosen": "C", "rejected": "D"}]


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_wrapped", "csv", "parquet", "datasets"])
def test_every_source_kind_loads(tmp_path, kind, write_jsonl):
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "json_wrapped":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": ROWS}))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        path.write_text("prompt,chosen,rejected\nQ1,A,B\nQ2,C,D\n")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    else:
        import datasets

        path = tmp_path / "folder"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    records, errors = read_records(str(path))
    assert errors == []
    assert [(r.prompt, r.completions) for r in records] == [("Q1", ["A", "B"]), ("Q2", ["C", "D"])]
    assert all(r.format == "paired" for r in records)


def test_csv_locations_count_multiline_cells_and_decode_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["prompt", "responses", "scores"], ["multi\nline", '["a", "b"]', "[1, 2]"],
                          ["Q", "x", "[1]"]])
    records, errors = read_records(str(path))
    assert records[0].completions == ["a", "b"] and records[0].scores == [1.0, 2.0]
    assert [(e.location, e.field) for e in errors] == [(f"{path}:4", "responses")]


def test_missing_path_and_unreachable_hub_name(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="expected an existing file or folder"):
        read_records(str(tmp_path / "nope.jsonl"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # tests/conftest.py sets it
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(DataError, match="could not load hub dataset 'someone/missing-set': 127.0.0.1:9 is unreachable"):
        read_records("someone/missing-set")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline: asks the local cache, which does not have it
    with pytest.raises(DataError, match="could not load hub dataset 'someone/missing-set' .*save_to_disk"):
        read_records("someone/missing-set")


def test_conversation_must_not_open_with_the_assistant():
    with pytest.raises(DataError) as info:
        parse({"messages": GOOD + USER + BAD})
    assert (info.value.field, info.value.detail) == (
        "messages[0].role", "expected a user or system message before the first assistant message / found assistant")


def test_json_array_rows_are_located_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "Q", "chosen": "A", "rejected": "B"},\n  {"prompt": "Q",\n   "chosen": null,'
                    ' "rejected": "B"},\n  3\n]\n')
    records, errors = read_records(str(path))
    assert len(records) == 1
    assert [(e.location, e.field, e.detail) for e in errors] == [
        (f"{path}:3", "chosen", "expected a value in column 'chosen' / found null"),
        (f"{path}:5", None, "expected a JSON object / found int 3"),
    ]


@pytest.mark.parametrize("name,body", [("d.csv", "prompt,completion\nQ,A\n"),
                                       ("d.jsonl", '{"prompt": "Q", "completion": "A"}\n'),
                                       ("d.json", '[{"prompt": "Q", "completion": "A"}]')])
def test_byte_order_mark_is_ignored(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    records, errors = read_records(str(path))
    assert errors == [] and [(r.prompt, r.completions) for r in records] == [("Q", ["A"])]
