"""The ``scalar`` view (DRO's data: one completion with a scalar reward in ``scores``): what each record
format becomes, that conversions are counted, and bad rewards fail located to file, line and field."""

from __future__ import annotations

import json

import pytest

from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.pipeline import read_records
from alignkit.data.record import Record
from alignkit.data.views import to_view
from alignkit.errors import ConfigError, DataError


def test_each_format_becomes_one_completion_with_its_reward():
    records = [
        Record("unpaired", "A", ["scored"], scores=[0.25]),
        Record("unpaired", "B", ["scored and labelled"], scores=[-2.0], labels=[1.0]),  # the score is the reward
        Record("unpaired", "C", ["good"], labels=[1.0]),
        Record("unpaired", "D", ["bad"], labels=[0.0]),
        Record("paired", "E", ["chosen", "rejected"], scores=[7.0, 3.0]),  # the pair's verdict, as the unpaired view
        Record("listwise", "F", ["r0", "r1", "r2"], scores=[0.5, 1.5, -1.0]),
    ]
    out, stats = to_view(records, "scalar", DataConfig())
    assert [(r.format, r.prompt, r.completions, r.scores) for r in out] == [
        ("unpaired", "A", ["scored"], [0.25]),
        ("unpaired", "B", ["scored and labelled"], [-2.0]),
        ("unpaired", "C", ["good"], [1.0]),
        ("unpaired", "D", ["bad"], [0.0]),
        ("unpaired", "E", ["chosen"], [1.0]),
        ("unpaired", "E", ["rejected"], [0.0]),
        ("unpaired", "F", ["r0"], [0.5]),
        ("unpaired", "F", ["r1"], [1.5]),
        ("unpaired", "F", ["r2"], [-1.0]),
    ]
    assert (stats.records_in, stats.records_out) == (6, 9) and not stats.dropped
    assert stats.converted == {"label -> reward 1.0/0.0": 2, "paired -> labels 1/0 as rewards": 1,
                               "listwise -> one record per response": 1}
    assert "converted 2 label -> reward 1.0/0.0" in str(stats)


def test_no_row_is_dropped_silently():
    out, stats = to_view([Record("paired", "Q", ["same", "same"])], "scalar", DataConfig())
    assert out == [] and stats.dropped == {"chosen == rejected": 1}
    assert "dropped 1" in str(stats)


def test_sft_and_prompt_data_cannot_feed_it():
    for fmt in ("sft", "prompt"):
        with pytest.raises(ConfigError, match=f"{fmt} data .* cannot feed a loss that consumes scalar data"):
            to_view([Record(fmt, "Q", ["A"] if fmt == "sft" else [], location="f.jsonl:1")], "scalar", DataConfig())


def test_a_record_without_reward_is_an_error():
    with pytest.raises(DataError, match="f.jsonl:4: score: expected a scalar reward"):
        to_view([Record("unpaired", "Q", ["A"], location="f.jsonl:4")], "scalar", DataConfig())


@pytest.mark.parametrize("value, found", [("abc", "str 'abc'"), (None, "null"), (True, "bool"), ([1], "list")])
def test_bad_rewards_fail_with_file_line_and_field(tmp_path, value, found):
    path = tmp_path / "rewards.jsonl"
    good = {"prompt": "Q", "completion": "A", "score": 0.5}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "score": value}) + "\n")
    records, errors = read_records(str(path))
    assert len(records) == 1 and len(errors) == 1
    message = str(errors[0])
    assert f"{path}:2" in message and "score" in message and "expected a number" in message
    assert found in message, message


def test_nan_reward_fails_located(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"prompt": "Q", "completion": "A", "score": NaN}\n')
    _, errors = read_records(str(path))
    assert errors and f"{path}:1" in str(errors[0]) and "score" in str(errors[0])


def test_the_shipped_demo_rewards_read_as_judge_scores():
    from alignkit.config.compose import demo_data_dir
    from alignkit.rewards.judge import score

    records, errors = read_records(str(demo_data_dir() / "scalar_train.jsonl"))
    assert not errors and len(records) == 1000
    out, stats = to_view(records, "scalar", DataConfig(train=[SourceConfig(path="x")]))
    assert len(out) == 1000 and not stats.dropped and not stats.converted
    for record in out[:50]:
        reply = record.completions[0][0]["content"]
        assert record.scores == [score(reply, int(record.extra["answer"])).total]
    rewards = {r.scores[0] for r in out}
    assert min(rewards) == 0.0 and max(rewards) > 1.0  # wrong replies 0, right ones the judge's full marks
