"""The final-answer parser: tagged answers, trailing equations, the last number, reference answers."""

from __future__ import annotations

import pytest

from alignkit.rewards import answer
from alignkit.rewards.answer import answers_match, extract_answer, gold_answer, is_correct, normalize_number

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    "reply, expected",
    [
        # tagged answers
        ("Answer: 12", "12"),
        ("Answer: 12.", "12"),
        ("answer:12", "12"),
        ("The answer is 12.", "12"),
        ("The answer is: 8", "8"),
        ("So the final answer is 42 apples.", "42"),
        ("Answer: **12**", "12"),
        ("Answer:\n15", "15"),
        ("Answer: 7 + 5 = 12", "12"),
        ("\\boxed{72}", "72"),
        ("The final answer is $\\boxed{72}$.", "72"),
        ("#### 72", "72"),
        ("<answer>42</answer>", "42"),
        ("<answer> 1,000 </answer>", "1000"),
        (GSM8K_SOLUTION, "72"),
        # the last tag wins, and a tag wins over numbers after it
        ("Answer: 9. Hmm, recheck: Answer: 8", "8"),
        ("Answer: 9\nI used 5 + 3 = 8 to check.", "9"),
        # an earlier number wrong, the last right -- and the other way round
        ("5 + 3 = 9? No: 5 + 3 = 8", "8"),
        ("First 5 + 3 = 9, wait no. The answer is 8.", "8"),
        ("The answer is 8. (5 + 3 = 9 was my first guess.)", "8"),
        ("I counted 8, then 9", "9"),
        # trailing equations and the last number
        ("7 + 5 = 12", "12"),
        ("23 + 14 = 37.", "37"),
        ("3 * 4 = 12 cookies for 3 friends", "12"),  # the equation's result, not the last number
        ("Step 1: 2 + 2 = 4\nStep 2: 4 * 3 = 12 in 2 boxes", "12"),
        ("2 + 2 = 4\nso she keeps 3", "3"),  # the equation is not on the last line with a number
        ("She has 3 red and 4 blue, 7 in all", "7"),
        ("The blue key opens door 7.", "7"),
        # number normalisation
        ("It costs $12.00.", "12"),
        ("He pays $1,250 in total.", "1250"),
        ("12.0", "12"),
        ("0.50", "0.5"),
        ("x = -3", "-3"),
        ("50% of them", "50"),
        ("Answer: 12.5.", "12.5"),
        ("The answer is 1/2", "0.5"),
        ("\\boxed{\\frac{1}{3}}", "1/3"),
        # symbolic answers stay as written
        ("The final answer is $\\boxed{3\\sqrt{2}}$", "3\\sqrt{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("So the answer is $\\frac{\\sqrt{3}}{2}$.", "\\frac{\\sqrt{3}}{2}"),
        ("The answer is $\\frac{1}{2}$ of the cake.", "0.5"),
        ("Answer: \\frac{3}{4}", "0.75"),
        ("The answer is \\(12\\).", "12"),
        # no answer at all
        ("I don't know", None),
        ("", None),
        (None, None),
        ("version 1.2.3", None),
    ],
)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        (GSM8K_SOLUTION, "72"),
        ("72", "72"),
        (" 72\n", "72"),
        (72, "72"),
        (72.0, "72"),
        (-3, "-3"),
        ("#### 1,000", "1000"),
        ("\\boxed{72}", "72"),
        ("<answer>72</answer>", "72"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("", None),
        (None, None),
        (True, None),
    ],
)
def test_gold_answer(value, expected):
    assert gold_answer(value) == expected


@pytest.mark.parametrize(
    "reply, gold, expected",
    [
        ("Answer: 12.", "12", True),
        ("Answer: 12.", "#### 12", True),
        ("The answer is 72", GSM8K_SOLUTION, True),
        (GSM8K_SOLUTION, GSM8K_SOLUTION, True),  # gsm8k's own solution is a correct reply
        ("Answer: 13", "#### 12", False),
        ("7 + 5 = 12", 12, True),
        ("7 + 5 = 13", 12, False),
        ("12 is wrong, 13 is right", "13", True),
        ("13 is right, no wait, 12", "13", False),
        ("$1,000", "1000", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\boxed{0.5}", "1/2", True),
        ("12.5", "12", False),
        ("no idea", "12", False),
        ("Answer: 12", None, False),
        ("Answer: 12", "", False),
    ],
)
def test_is_correct(reply, gold, expected):
    assert is_correct(reply, gold) is expected


@pytest.mark.skipif(not answer.MATH_VERIFY_AVAILABLE, reason="math-verify not installed")
def test_symbolic_answers_use_math_verify():
    assert is_correct("\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}")
    assert is_correct("The answer is \\boxed{2\\sqrt{2}}", "\\sqrt{8}")
    assert not is_correct("\\boxed{\\sqrt{2}}", "\\sqrt{3}")
    # LaTeX our extraction does not isolate: math-verify reads the whole reply
    assert is_correct("Hence we obtain $\\frac{\\sqrt{3}}{2}$", "\\frac{\\sqrt{3}}{2}")
    assert is_correct("So the answer is $\\frac{\\sqrt{3}}{2}$.", "\\frac{\\sqrt{3}}{2}")
    # a numeric reference is never decided by a number elsewhere in the reply
    assert not is_correct("I guessed 12 at first; the answer is 13", "12")


def test_symbolic_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(answer, "MATH_VERIFY_AVAILABLE", False)
    assert answers_match("\\sqrt{3}", " \\sqrt{3} ")
    assert not answers_match("\\sqrt{3}/2", "\\frac{\\sqrt{3}}{2}")  # only math-verify knows these are equal
    assert is_correct("Answer: 12", "#### 12")  # numbers never need it


def test_symbolic_check_off_the_main_thread():
    import threading

    if not answer.MATH_VERIFY_AVAILABLE:
        pytest.skip("math-verify not installed")
    out = []
    worker = threading.Thread(target=lambda: out.append(is_correct("\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}")))
    worker.start()
    worker.join()
    assert out == [True]


def test_normalize_number():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("$12") == "12"
    assert normalize_number("12.") == "12"
    assert normalize_number("-0.250") == "-0.25"
    assert normalize_number("abc") is None
    assert normalize_number("1/0") is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reply", ["Answer: " * 20000, "\\boxed{" * 20000, "The answer is " * 20000 + "12"])
def test_degenerate_replies_stay_linear(reply):
    """A hostile reply (a tag repeated 20k times) is read in about a second, not hours (was quadratic)."""
    extract_answer(reply)
