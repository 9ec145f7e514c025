"""The demo judge's components on hand-made replies, with values worked out by hand.

The rules under test: correctness is read by ``alignkit.rewards.answer`` (the same parser that
scores the starting model), and format and brevity pay nothing for a wrong answer.
"""

import pytest

from alignkit.errors import DataError
from alignkit.rewards import answer, resolve_reward
from alignkit.rewards.judge import MAX_SCORE, WEIGHTS, accuracy_score, concise_score, extract_answer, format_score, score

# reply, reference, accuracy, format, concise
CASES = [
    ("The blue key opens door 47. Answer: 47", "47", 1.0, 1.0, 1.0),  # the ideal: the fact, then the tag
    ("Answer: 47", "47", 1.0, 1.0, 1.0),
    ("answer:47.", 47, 1.0, 1.0, 1.0),
    ("  Answer: 47 \n", "47.0", 1.0, 1.0, 1.0),
    ("The blue key opens door 47.", "47", 1.0, 0.5, 1.0),  # right, but no closing tag
    ("Answer: 47, from the blue key", "47", 1.0, 0.5, 1.0),  # the tag does not end the reply
    ("The blue key opens door 83. Answer: 83", "47", 0.0, 0.0, 0.0),  # a wrong answer in perfect format: nothing
    ("Answer: 83", "47", 0.0, 0.0, 0.0),
    ("The red key opens door 47. The blue key opens door 83.", "47", 0.0, 0.0, 0.0),  # lists facts: the last one counts
    ("Answer: 47\nAnswer: 83", "47", 0.0, 0.0, 0.0),  # the last tag counts
    ("Answer: 83 is wrong. The answer is 47.", "47", 1.0, 0.5, 1.0),
    ("20 + 27 = 47", "47", 1.0, 0.5, 1.0),  # a trailing equation
    ("forty-seven", "47", 0.0, 0.0, 0.0),  # no digits: no answer
    ("Answer: <number>", "47", 0.0, 0.0, 0.0),
    ("", "47", 0.0, 0.0, 0.0),
    (None, "47", 0.0, 0.0, 0.0),
    ("Answer: 47", "not a number", 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("reply,reference,acc,fmt,conc", CASES)
def test_components(reply, reference, acc, fmt, conc):
    assert accuracy_score(reply, reference) == acc
    assert format_score(reply, reference) == fmt
    assert concise_score(reply, reference) == conc
    parts = score(reply, reference)
    assert parts.total == pytest.approx(1.0 * acc + 0.3 * fmt + 0.2 * conc)


def test_weights_make_any_right_answer_beat_any_wrong_one():
    assert WEIGHTS == {"accuracy": 1.0, "format": 0.3, "concise": 0.2} and MAX_SCORE == pytest.approx(1.5)
    rambling_right = "Well, let me read all of these facts again very carefully before I reply. " * 4 + "Answer: 47"
    assert score(rambling_right, "47").total == 1.0 + 0.3  # concise 0 at >= 48 words, format still paid
    assert score("Answer: 83", "47").total == 0.0


@pytest.mark.parametrize("words,expected", [(16, 1.0), (17, 31 / 32), (32, 0.5), (47, 1 / 32), (48, 0.0), (100, 0.0)])
def test_concise_falls_linearly_from_16_to_48_words_for_a_right_answer(words, expected):
    reply = " ".join(["word"] * (words - 1) + ["3"])
    assert concise_score(reply, "3") == pytest.approx(expected)
    assert concise_score(reply, "4") == 0.0


REPLIES = ["The blue key opens door 47. Answer: 47", "Answer: 47.", "47", "The answer is 47.", "$47", "47.0",
           "Leo is 47 years old, Mia is 12.", "12 + 35 = 47", "Answer: 4 7", "I think 46, or 47", "\\boxed{47}",
           "Answer: 47\nAnswer: 48", "nothing", None, "Answer: 1,047", "-47"]


@pytest.mark.parametrize("reply", REPLIES)
def test_judge_correctness_is_answer_py(reply):
    """The judge reads correctness exactly as ``answer.is_correct``: the eval's parser, the same for both models."""
    assert accuracy_score(reply, "47") == float(answer.is_correct("" if reply is None else reply, "47"))
    assert extract_answer(reply) == answer.extract_answer("" if reply is None else reply)


@pytest.mark.parametrize("garbage", [None, 3, 2.5, b"\xff\xfe", ["Answer: 1"], "\x00" * 10, "9" * 5000, "Answer: " * 200,
                                     "-" * 100, "1e309", "\ud800 broken surrogate", "Answer: 1" + " x" * 100000])
def test_never_raises_on_garbage(garbage):
    parts = score(garbage, "1")
    assert 0.0 <= parts.total <= MAX_SCORE
    fn = resolve_reward("judge")
    assert len(fn(["p"], [garbage], answer=["1"])) == 1


def test_batched_functions_and_the_weighted_sum():
    replies = ["Mia is 5 years old. Answer: 5", "Mia is 5 years old.", "Mia is 6 years old. Answer: 6", "I'm sorry."]
    answers = ["5", "5", "5", "5"]
    prompts = ["Mia is 5 years old. Tom is 6 years old. How old is Mia?"] * 4
    got = {name: resolve_reward(name)(prompts, replies, answer=answers, task=["ages"] * 4)
           for name in ("accuracy", "format", "concise", "judge")}
    assert got["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert got["format"] == [1.0, 0.5, 0.0, 0.0]
    assert got["concise"] == [1.0, 1.0, 0.0, 0.0]
    assert got["judge"] == pytest.approx([1.5, 1.35, 0.0, 0.0])


@pytest.mark.parametrize("name", ["accuracy", "format", "concise", "judge"])
def test_missing_answer_column_is_a_located_data_error(name):
    with pytest.raises(DataError) as info:
        resolve_reward(name)(["p"], ["Answer: 1"], task=["x"])
    assert "answer" in str(info.value) and "task" in str(info.value)
