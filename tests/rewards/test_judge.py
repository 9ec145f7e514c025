"""The demo judge's components on hand-made replies, with values worked out by hand."""

import pytest

from alignkit.errors import DataError
from alignkit.rewards import resolve_reward
from alignkit.rewards.judge import MAX_SCORE, accuracy_score, concise_score, extract_answer, format_score, score

# reply, reference, accuracy, format, concise
CASES = [
    ("Answer: 12", "12", 1.0, 1.0, 1.0),
    ("answer:12.", 12, 1.0, 1.0, 1.0),
    ("  Answer: 12 \n", "12.0", 1.0, 1.0, 1.0),
    ("Answer: 13", "12", 0.0, 1.0, 1.0),
    ("Answer: -4", "-4", 1.0, 1.0, 1.0),
    ("7 + 5 = 12", "12", 1.0, 0.25, 1.0),
    ("The blue key opens door 7.", "7", 1.0, 0.25, 1.0),
    ("Mia is 12 years old.", "12", 1.0, 0.0, 1.0),  # ends in a word, not a number
    ("7 + 5 = 12\nAnswer: 12", "12", 1.0, 0.5, 1.0),
    ("Answer: 12 but maybe 13", "12", 1.0, 0.5, 1.0),  # the tag wins over the last number
    ("Answer: 11\nAnswer: 12", "12", 1.0, 0.5, 1.0),  # the last tag counts
    ("12-4", "4", 1.0, 0.25, 1.0),  # '-' glued to a digit is not a sign
    ("twelve", "12", 0.0, 0.0, 0.0),  # no digits: no answer, no credit for brevity
    ("Answer: <number>", "12", 0.0, 0.0, 0.0),
    ("", "12", 0.0, 0.0, 0.0),
    (None, "12", 0.0, 0.0, 0.0),
    ("12", "not a number", 0.0, 0.25, 1.0),
]


@pytest.mark.parametrize("reply,reference,acc,fmt,conc", CASES)
def test_components(reply, reference, acc, fmt, conc):
    assert accuracy_score(reply, reference) == acc
    assert format_score(reply) == fmt
    assert concise_score(reply) == conc
    parts = score(reply, reference)
    assert parts.total == pytest.approx(1.0 * acc + 0.5 * fmt + 0.25 * conc)


@pytest.mark.parametrize("words,expected", [(8, 1.0), (9, 31 / 32), (24, 0.5), (39, 1 / 32), (40, 0.0), (100, 0.0)])
def test_concise_falls_linearly_from_8_to_40_words(words, expected):
    reply = " ".join(["word"] * (words - 1) + ["3"])
    assert concise_score(reply) == pytest.approx(expected)


def test_extract_answer():
    assert extract_answer("so 3.5 then 10.") == 10.0
    assert extract_answer("Answer: 7 and then 9") == 7.0
    assert extract_answer("nothing here") is None
    assert extract_answer(42) == 42.0


@pytest.mark.parametrize("garbage", [None, 3, 2.5, b"\xff\xfe", ["Answer: 1"], "\x00" * 10, "9" * 5000, "Answer: " * 5000,
                                     "-" * 100, "1e309", "\ud800 broken surrogate", "Answer: 1" + " x" * 100000])
def test_never_raises_on_garbage(garbage):
    parts = score(garbage, "1")
    assert 0.0 <= parts.total <= MAX_SCORE
    fn = resolve_reward("judge")
    assert len(fn(["p"], [garbage], answer=["1"])) == 1


def test_batched_functions_and_the_weighted_sum():
    replies = ["Answer: 5", "2 + 3 = 5", "Answer: 6", "I'm sorry."]
    answers = ["5", "5", "5", "5"]
    prompts = ["What is 2 + 3?"] * 4
    got = {name: resolve_reward(name)(prompts, replies, answer=answers, task=["x"] * 4)
           for name in ("accuracy", "format", "concise", "judge")}
    assert got["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert got["format"] == [1.0, 0.25, 1.0, 0.0]
    assert got["concise"] == [1.0, 1.0, 1.0, 0.0]
    assert got["judge"] == [1.75, 1.375, 0.75, 0.0]
    assert MAX_SCORE == 1.75


def test_missing_answer_column_is_a_located_data_error():
    with pytest.raises(DataError) as info:
        resolve_reward("accuracy")(["p"], ["Answer: 1"], task=["x"])
    assert "answer" in str(info.value) and "task" in str(info.value)
    # format and concise do not need the reference
    assert resolve_reward("format")(["p"], ["Answer: 1"]) == [1.0]
