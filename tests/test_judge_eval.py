"""``scripts/judge_eval.py``'s arithmetic: the judge's pick per prompt, its accuracy against the first sample's,
the mean-sample and oracle rates, on hand-made replies (no model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import judge_eval  # noqa: E402


def test_the_pick_is_the_highest_win_rate_and_ties_go_to_the_earlier_sample():
    rows = [{"answer": "58", "replies": ["Answer: 30", "Answer: 58", "Answer: 58"]},
            {"answer": "7", "replies": ["Answer: 7", "Answer: 1", "Answer: 2"]},
            {"answer": "3", "replies": ["Answer: 1", "Answer: 2", "Answer: 4"]},
            {"answer": "9", "replies": ["Answer: 9", "Answer: 9", "Answer: 1"]}]
    rates = [[0.1, 0.6, 0.6], [0.2, 0.9, 0.4], [0.5, 0.5, 0.5], [0.5, 0.5, 0.0]]
    s = judge_eval.summarise(rows, rates)
    # picks: reply 1 (tie with 2: earlier), reply 1 (wrong), reply 0, reply 0
    assert s["picked"]["accuracy"] == pytest.approx(2 / 4) and s["first_sample"]["accuracy"] == pytest.approx(2 / 4)
    assert s["paired_picked_vs_first"]["only_model_right"] == 1 and s["paired_picked_vs_first"]["only_baseline_right"] == 1
    assert s["mean_sample_accuracy"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 2 / 3) / 4)
    assert s["oracle"]["accuracy"] == pytest.approx(3 / 4)
    assert s["mixed_prompts"] == 3 and s["right_picked_on_mixed"] == pytest.approx(2 / 3)
    assert s["k"] == 3 and s["n"] == 4


def test_win_rates_from_pairwise_probabilities(monkeypatch):
    """Three replies, P(a > b) = 1 when a is listed before b in the judge's order: reply 2 > 0 > 1."""
    order = {"c": 0, "a": 1, "b": 2}

    class Judge:
        def compare(self, prompts, a, b, **columns):
            import torch

            assert columns["answer"] == ["x"] * len(prompts)
            return torch.tensor([1.0 if order[x] < order[y] else 0.0 for x, y in zip(a, b)])

    from alignkit.rl import judges

    monkeypatch.setattr(judges, "build_judge", lambda run: Judge())
    rows = [{"prompt": "p", "answer": "x", "extra": {"answer": "x"}, "replies": ["a", "b", "c"]}]
    assert judge_eval.pick(rows, "rule", None) == [[0.5, 0.0, 1.0]]


def test_prm_scores_each_reply_alone_with_the_prompt_as_one_user_turn(monkeypatch):
    """--judge-kind prm: pointwise, the PRM sees the prompt as its training data had it (the record's messages,
    else the text as a user turn), the flat
    scores are split back per prompt, and the pick is the highest score."""
    seen = {}

    class Prm:
        def __call__(self, prompts, completions):
            seen["prompts"], seen["completions"] = prompts, completions
            return [float(len(c)) for c in completions]  # longer = better, so the pick is visible

    from alignkit.rewards import process

    def load(path, model, data, deepspeed, *, separator=None, how="min"):
        seen["path"], seen["how"] = path, how
        return Prm()

    monkeypatch.setattr(process, "load_process_reward", load)
    q2 = [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"}]
    rows = [{"prompt": "q1", "answer": "1", "replies": ["Answer: 1", "Answer: 22"]},
            {"prompt": "system\ns\nuser\nq2", "answer": "5", "extra": {"prompt": q2},
             "replies": ["x\nAnswer: 5", "Answer: 3", "Answer: 4"]}]
    scores = judge_eval.pick(rows, "prm", "some/prm", "prod")
    assert scores == [[9.0, 10.0], [11.0, 9.0, 9.0]]
    assert seen["prompts"] == [[{"role": "user", "content": "q1"}]] * 2 + [q2] * 3  # the record's messages win
    assert seen["completions"] == rows[0]["replies"] + rows[1]["replies"] and seen["how"] == "prod"
    s = judge_eval.summarise(rows, scores)
    assert s["picked"]["accuracy"] == pytest.approx(1 / 2)  # row 0 picks the wrong "22", row 1 the right one
    with pytest.raises(SystemExit, match="judge-path"):
        judge_eval.pick(rows, "prm", None)
