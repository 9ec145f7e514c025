"""Step-labelled data (format and view ``stepwise``): the published layouts read as their sources mean them
(TRL's stepwise columns; Math-Shepherd's ки tags, as TRL's conversion script reads them), the tokens laid out
as TRL's PRMTrainer lays them out, located errors, and every cut or odd step counted."""

from __future__ import annotations

import json
import re
from itertools import chain
from pathlib import Path

import pytest

from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.formats import parse_row, to_row
from alignkit.data.pipeline import prepare_data, read_records
from alignkit.data.sources import RawRow
from alignkit.data.stepwise import STEP_LABELS, split_steps
from alignkit.data.tokenize import TokenizeStats, tokenize_group
from alignkit.errors import ConfigError, DataError

PUBLISHED = Path(__file__).parent / "published"


def trl_math_shepherd(example: dict) -> dict:
    """TRL's examples/datasets/math_shepherd.py ``process_example`` (how trl-lib/math_shepherd was made), as a
    reference: written from that script, without its 12 special-cased prompts."""
    inputs = example["input"].replace("ки", "ⶻ")
    indexes = [m.start() for m in re.finditer("ⶻ", inputs)]
    labels = [example["label"][idx] == "+" for idx in indexes]
    steps = [inputs[i:j] for i, j in zip(chain([0], indexes), chain(indexes, [None]))][:-1]
    prompt, completions = steps[0], [c[1:].strip() for c in steps[1:]]
    if "Step 1:" in prompt:
        prompt, first = prompt.split("Step 1:")
        completions = [("Step 1:" + first).strip()] + completions
    elif "step 1:" in prompt:
        prompt, first = prompt.split("step 1:")
        completions = [("step 1:" + first).strip()] + completions
    else:
        prompt, first = prompt.split("?")
        prompt = prompt + "?"
        completions = [first.strip()] + completions
    return {"prompt": prompt.strip(), "completions": completions, "labels": labels}


def trl_tokenize_row(features: dict, tokenizer, step_separator: str) -> dict:
    """TRL's ``PRMTrainer.tokenize_row`` (TRL 0.13-1.15; no truncation, training labels), as a reference."""
    prompt_ids = tokenizer(features["prompt"], add_special_tokens=False)["input_ids"]
    completions_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in features["completions"]]
    labels = [int(label) for label in features["labels"]]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [c + separator_ids for c in completions_ids]
    labels = [[-100] * (len(c) - 1) + [label] for c, label in zip(completions_ids, labels)]
    completion_ids, labels = list(chain(*completions_ids)), list(chain(*labels))
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    return {"input_ids": prompt_ids + completion_ids, "labels": [-100] * len(prompt_ids) + labels}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (PUBLISHED / name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", ["trl_math_shepherd.jsonl", "trl_prm800k.jsonl"])
def test_trl_stepwise_rows_read_as_published(name):
    records, errors = read_records(str(PUBLISHED / name))
    assert not errors
    for record, row in zip(records, _rows(name), strict=True):
        assert record.format == "stepwise"
        assert record.prompt == row["prompt"] and record.completions == row["completions"]
        assert record.labels == [float(v) for v in row["labels"]]
        assert to_row(record) == row  # alignkit data convert writes the same columns back


def test_math_shepherd_matches_trls_conversion():
    records, errors = read_records(str(PUBLISHED / "math_shepherd.jsonl"), columns="math_shepherd")
    assert not errors and len(records) == 3
    for record, row in zip(records, _rows("math_shepherd.jsonl"), strict=True):
        expected = trl_math_shepherd(row)
        assert (record.prompt, record.completions) == (expected["prompt"], expected["completions"])
        assert record.labels == [float(v) for v in expected["labels"]]
        assert record.extra == {"task": row["task"]}  # the task column stays a column
    assert records[1].completions[0].startswith("step 1:") and records[1].labels == [1.0, 0.0, 0.0]
    assert records[2].prompt.endswith("How many bolts in total does it take?")  # no step marker: split at '?'


def test_math_shepherd_without_the_option_names_it():
    _, errors = read_records(str(PUBLISHED / "math_shepherd.jsonl"))
    assert len(errors) == 3 and "data.columns=math_shepherd" in str(errors[0])


@pytest.mark.parametrize("label, field, text", [
    ("Q? Step 1: a +\nStep 2: b ", "label", "'+' or '-' where input has tag 2"),
    ("Q? Step 1: a +\nStep 2: b", "label", "the label ending at character 24"),
    ("Q? Step 1: a +\nStep 2: c +", "label", "a different text at character 23: str 'c +'"),
    ("Q? Step 1: a *\nStep 2: b +", "label", "'+' or '-' where input has tag 1"),
    ("Q? Step 1: a +\nStep 2: b +!", "label", "1 extra characters at the end"),
])
def test_math_shepherd_label_that_is_not_the_tagged_input_is_located(label, field, text):
    row = RawRow("ms.jsonl:7", {"input": "Q? Step 1: a ки\nStep 2: b ки", "label": label})
    with pytest.raises(DataError) as info:
        parse_row(row, preset="math_shepherd")
    assert (info.value.location, info.value.field) == ("ms.jsonl:7", field)
    assert text in info.value.detail


def test_math_shepherd_empty_step_and_trailing_text():
    with pytest.raises(DataError) as info:  # two tags in a row: an empty step
        parse_row(RawRow("ms:1", {"input": "Q? Step 1: a ки ки", "label": "Q? Step 1: a + +"}), preset="math_shepherd")
    assert info.value.field == "completions[1]"
    record = parse_row(RawRow("ms:2", {"input": "Q? Step 1: a ки tail", "label": "Q? Step 1: a + tail"}),
                       preset="math_shepherd")
    assert record.completions == ["Step 1: a"] and "text after the last ки tag (no label) dropped" in record.notes


def test_tokens_match_trls_prm_trainer(tiny_tokenizer):
    """String prompts, the default separator: prompt + completion tokens are TRL's input_ids, and the trained
    tokens are exactly TRL's labelled positions with its labels."""
    cfg = DataConfig(max_length=4096, max_prompt_length=2048)
    for name in ("trl_math_shepherd.jsonl", "trl_prm800k.jsonl"):
        records, _ = read_records(str(PUBLISHED / name))
        for record, row in zip(records, _rows(name)):
            group = tokenize_group(record, tiny_tokenizer, cfg)
            reference = trl_tokenize_row(row, tiny_tokenizer, "\n")
            assert group.prompt_ids + group.completion_ids[0] == reference["input_ids"]
            labels = reference["labels"][len(group.prompt_ids):]
            assert group.completion_train_mask[0] == [v != -100 for v in labels]
            assert group.extra[STEP_LABELS] == [float(v) for v in labels if v != -100]


def test_chat_prompts_use_the_template_and_the_steps_stay_text(smollm2_tokenizer):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    record = parse_row(RawRow("x:1", {"prompt": prompt, "completions": ["2 + 3 = 5.", "Answer: 5"], "labels": [1, 0]}))
    group = tokenize_group(record, smollm2_tokenizer, DataConfig())
    rendered = smollm2_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert smollm2_tokenizer.decode(group.prompt_ids) == rendered
    assert smollm2_tokenizer.decode(group.completion_ids[0]) == "2 + 3 = 5.\nAnswer: 5\n"
    labelled = [t for t, m in zip(group.completion_ids[0], group.completion_train_mask[0]) if m]
    assert [smollm2_tokenizer.decode([t]) for t in labelled] == ["\n", "\n"]  # the separator carries the label


def test_a_system_column_goes_into_the_prompt_only():
    record = parse_row(RawRow("x:1", {"system": "Be terse.", "prompt": "Q?", "completions": ["a"], "labels": [True]}))
    assert record.prompt == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Q?"}]
    assert record.completions == ["a"]


def test_steps_holding_the_separator_are_counted_and_cuts_are_counted(tiny_tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(PUBLISHED / "trl_prm800k.jsonl"))], max_length=48,
                     max_prompt_length=24)
    data = prepare_data(cfg, "stepwise", tiny_tokenizer)
    tok = data.stats.tokenize
    assert tok.steps_with_separator == 2  # "...,\nand the numerator ..." and "# Answer\n\n2"
    assert "2 steps contain data.step_separator" in str(data.stats)
    assert tok.prompts_truncated == 2 and tok.dropped["labelled steps past data.max_length"] > 0
    kept = sum(len(g.extra[STEP_LABELS]) for g in data.train)
    assert kept + tok.dropped["labelled steps past data.max_length"] == 6  # every label kept or counted
    for group in data.train:
        assert len(group.prompt_ids) + len(group.completion_ids[0]) <= 48
        assert sum(group.completion_train_mask[0]) == len(group.extra[STEP_LABELS])
    cfg.response_truncation = "drop"
    with pytest.raises(DataError, match="found none left"):
        prepare_data(cfg, "stepwise", tiny_tokenizer)


def test_stepwise_data_feeds_only_the_stepwise_view(tiny_tokenizer):
    cfg = DataConfig(train=[SourceConfig(path=str(PUBLISHED / "trl_math_shepherd.jsonl"))])
    with pytest.raises(ConfigError, match="stepwise data .* cannot feed a loss that consumes pairwise data"):
        prepare_data(cfg, "pairwise", tiny_tokenizer)
    cfg = DataConfig(train=[SourceConfig(path=str(PUBLISHED / "ultrafeedback_binarized.jsonl"))])
    with pytest.raises(ConfigError, match="cannot feed a loss that consumes stepwise data"):
        prepare_data(cfg, "stepwise", tiny_tokenizer)


def test_bad_rows_fail_before_the_model_or_are_skipped_and_counted(tiny_tokenizer):
    bad = Path(__file__).parent / "bad" / "step_labels_short.jsonl"
    cfg = DataConfig(train=[SourceConfig(path=str(bad))])
    with pytest.raises(DataError) as info:
        prepare_data(cfg, "stepwise", tiny_tokenizer)
    assert str(info.value).startswith(f"{bad}:2: labels: expected 2 labels")
    cfg.on_error = "skip"
    data = prepare_data(cfg, "stepwise", tiny_tokenizer)
    assert data.stats.skipped == 1 and len(data.train) == 1 and "skipped 1 bad rows" in str(data.stats)


def test_split_steps_as_the_reward_reads_a_completion():
    assert split_steps("a.\n\n b.\nAnswer: 5\n", "\n") == ["a.", "b.", "Answer: 5"]
    assert split_steps("\n \n", "\n") == []
    assert split_steps("one step", "") == ["one step"]


def test_cached_stepwise_data_round_trips(tiny_tokenizer, tmp_path):
    cfg = DataConfig(train=[SourceConfig(path=str(PUBLISHED / "trl_math_shepherd.jsonl"))], cache_dir=str(tmp_path))
    first = prepare_data(cfg, "stepwise", tiny_tokenizer)
    again = prepare_data(cfg, "stepwise", tiny_tokenizer)
    assert again.stats.cached and [g.extra for g in again.train] == [g.extra for g in first.train]
    assert TokenizeStats().steps_with_separator == 0
