"""Converters and loss views on hand-made records with exact expected output."""

from __future__ import annotations

import pytest

from alignkit.data.config import DataConfig
from alignkit.data.convert import listwise_to_paired, paired_to_unpaired, scores_to_labels, unpaired_to_paired
from alignkit.data.record import Record
from alignkit.data.views import to_view
from alignkit.errors import ConfigError


def listwise(scores, prompt="Q"):
    return Record("listwise", prompt, [f"r{i}" for i in range(len(scores))], scores=list(scores), location="x:1")


def pairs(records):
    return [(r.completions[0], r.completions[1], r.scores) for r in records]


# scores r0=3, r1=1, r2=2, r3=2 (r2, r3 tie): sorted best first r0, r2, r3, r1
SCORES = [3, 1, 2, 2]


@pytest.mark.parametrize(
    "strategy,expected,dropped",
    [
        ("all_pairs", [("r0", "r2", [3, 2]), ("r0", "r3", [3, 2]), ("r0", "r1", [3, 1]), ("r2", "r1", [2, 1]),
                       ("r3", "r1", [2, 1])], {"tie": 1}),
        ("best_vs_worst", [("r0", "r1", [3, 1])], {}),
        ("best_vs_rest", [("r0", "r2", [3, 2]), ("r0", "r3", [3, 2]), ("r0", "r1", [3, 1])], {}),
        ("adjacent", [("r0", "r2", [3, 2]), ("r3", "r1", [2, 1])], {"tie": 1}),
    ],
)
def test_listwise_to_paired_strategies(strategy, expected, dropped):
    out, stats = listwise_to_paired([listwise(SCORES)], strategy)
    assert pairs(out) == expected
    assert all(r.format == "paired" and r.prompt == "Q" and r.location == "x:1" for r in out)
    assert (stats.records_in, stats.records_out, dict(stats.dropped)) == (1, len(expected), dropped)


def test_min_gap_drops_close_pairs_and_all_ties_drop_everything():
    out, stats = listwise_to_paired([listwise(SCORES)], "all_pairs", min_gap=1.0)
    assert pairs(out) == [("r0", "r1", [3, 1])]
    assert dict(stats.dropped) == {"tie": 1, "score gap <= 1": 4}
    out, stats = listwise_to_paired([listwise([5, 5])], "best_vs_worst")
    assert out == [] and dict(stats.dropped) == {"tie": 1}
    assert str(stats) == "listwise -> paired (best_vs_worst): 1 in, 0 out, dropped 1 (1 tie)"


def test_paired_to_unpaired_drops_identical_pairs():
    same = Record("paired", "P", ["x", "x"])
    out, stats = paired_to_unpaired([Record("paired", "Q", ["good", "bad"], scores=[2.0, 1.0]), same])
    assert [(r.format, r.completions, r.labels, r.scores) for r in out] == [
        ("unpaired", ["good"], [1.0], None), ("unpaired", ["bad"], [0.0], None)]
    assert (stats.records_in, stats.records_out, dict(stats.dropped)) == (2, 2, {"chosen == rejected": 1})


def test_unpaired_to_paired_groups_by_prompt():
    records = [
        Record("unpaired", "Q", ["a"], scores=[0.2]),
        Record("unpaired", "R", ["lonely"], labels=[1.0]),
        Record("unpaired", "Q", ["b"], scores=[0.9]),
        Record("unpaired", "Q", ["c"], scores=[0.5]),
    ]
    out, stats = unpaired_to_paired(records, "best_vs_rest")
    assert pairs(out) == [("b", "c", [0.9, 0.5]), ("b", "a", [0.9, 0.2])]
    assert (stats.records_in, stats.records_out, dict(stats.dropped)) == (4, 2, {"single completion for its prompt": 1})


def test_scores_to_labels_by_group_mean_and_by_threshold():
    out, stats = scores_to_labels([listwise([3, 1, 2])])  # mean 2: r0 -> 1, r1 -> 0, r2 dropped
    assert [(r.completions, r.labels) for r in out] == [(["r0"], [1.0]), (["r1"], [0.0])]
    assert dict(stats.dropped) == {"score equals group mean": 1}
    out, _ = scores_to_labels([listwise([3, 1, 2])], threshold=2.0)
    assert [r.labels[0] for r in out] == [1.0, 0.0, 1.0]
    singles = [Record("unpaired", "Q", ["a"], scores=[1.0]), Record("unpaired", "Q", ["b"], scores=[3.0]),
               Record("unpaired", "R", ["c"], scores=[7.0])]
    out, stats = scores_to_labels(singles)
    assert [(r.completions, r.labels) for r in out] == [(["a"], [0.0]), (["b"], [1.0])]
    assert dict(stats.dropped) == {"one completion per prompt and no threshold": 1}


def test_views():
    cfg = DataConfig(pair_expansion="best_vs_worst")
    paired = Record("paired", "Q", ["good", "bad"])
    lst = listwise([1, 3, 2])
    sft, _ = to_view([paired, lst], "sft", cfg)
    assert [r.completions for r in sft] == [["good"], ["r1"]]
    pw, _ = to_view([paired, lst], "pairwise", cfg)
    assert pairs(pw) == [("good", "bad", None), ("r1", "r0", [3, 1])]
    lw, _ = to_view([paired], "listwise", cfg)
    assert (lw[0].format, lw[0].completions, lw[0].scores) == ("listwise", ["good", "bad"], [1.0, 0.0])
    up, _ = to_view([paired], "unpaired", cfg)
    assert [(r.completions, r.labels) for r in up] == [(["good"], [1.0]), (["bad"], [0.0])]
    prompts, _ = to_view([paired], "rollout", cfg)
    assert (prompts[0].format, prompts[0].completions) == ("prompt", [])
    with pytest.raises(ConfigError, match="sft data .* cannot feed a loss that consumes pairwise data"):
        to_view([Record("sft", "Q", ["A"], location="f:1")], "pairwise", cfg)


def test_unpaired_view_of_scored_pairs_follows_the_pair():
    cfg = DataConfig(label_threshold=10.0)  # both scores are below the threshold
    pair = Record("paired", "Q", ["good", "bad"], scores=[5.0, 1.0])
    out, stats = to_view([pair, Record("unpaired", "R", ["x"], scores=[12.0])], "unpaired", cfg)
    assert [(r.completions, r.labels) for r in out] == [(["x"], [1.0]), (["good"], [1.0]), (["bad"], [0.0])]
    assert (stats.records_in, stats.records_out) == (2, 3)
