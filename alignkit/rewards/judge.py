"""The demo task's rule-based judge: correctness first; format and brevity pay only for a right answer.

The demo task (``data/demo/README.md``) states 3 or 4 facts of one kind (``The red key opens door
20. The blue key opens door 47. ...``) and asks for the number of one of them, followed by the
instruction ``INSTRUCTION``. The ideal reply quotes the fact it uses, then the tagged answer:
``The blue key opens door 47. Answer: 47``. Three components, each a pure function of the reply
text and the reference answer, each in [0, 1]:

* ``accuracy`` -- 1.0 when the reply's final answer is right, as ``alignkit.rewards.answer.is_correct``
  reads it (the last ``Answer:`` tag, else a trailing equation, else the last number), the same
  parser that scores the starting model, the trained model and the ``correctness`` reward.
* ``format``   -- only for a right answer: 1.0 when the reply ends with the ``Answer: N`` tag
  (work before it allowed, a trailing period too); 0.5 for a right answer without that ending;
  0.0 for a wrong answer, whatever its format.
* ``concise``  -- only for a right answer: 1.0 up to ``CONCISE_FULL_WORDS`` words, falling linearly
  to 0.0 at ``CONCISE_ZERO_WORDS``; 0.0 for a wrong answer.

``judge = 1.0 * accuracy + 0.3 * format + 0.2 * concise`` (maximum 1.5). A wrong reply scores 0
in any format, a right one at least 1.0: no amount of format or brevity outweighs correctness, so
the preferences built from the judge (``scripts/make_demo_data.py``) and the RL rewards teach
*which number is right*, and format is learned only along with it. (The judge before issue 16
paid 0.75 to a wrong ``Answer: N`` and a brevity bonus to any reply with a number; DPO and GRPO
then learned the bare tag and lost the fact-quoting that made the model right.)

Every component is robust to any model output: non-strings are stringified (``None`` -> ``""``),
nothing here raises on garbage. A missing ``answer`` column is a data mistake and raises
``DataError``. Left out: number words, units, and any model-based judging.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from alignkit.errors import DataError
from alignkit.rewards import answer as answer_parser
from alignkit.rewards.registry import register_reward

INSTRUCTION = "Quote the fact you use, then end with 'Answer: <number>'."
WEIGHTS = {"accuracy": 1.0, "format": 0.3, "concise": 0.2}
CONCISE_FULL_WORDS = 16
CONCISE_ZERO_WORDS = 48
MAX_SCORE = sum(WEIGHTS.values())

_ENDS_WITH_TAG_RE = re.compile(r"answer\s*:\s*-?\d+(?:\.\d+)?\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class JudgeScore:
    accuracy: float
    format: float
    concise: float

    @property
    def total(self) -> float:
        return sum(WEIGHTS[name] * getattr(self, name) for name in WEIGHTS)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def extract_answer(reply: Any) -> str | None:
    """The reply's final answer as ``alignkit.rewards.answer`` reads it (normalised), or ``None``."""
    return answer_parser.extract_answer(_text(reply))


def accuracy_score(reply: Any, answer: Any) -> float:
    return 1.0 if answer_parser.is_correct(_text(reply), answer) else 0.0


def format_score(reply: Any, answer: Any) -> float:
    """1.0 for a right answer ending in ``Answer: N``, 0.5 for a right answer otherwise, 0.0 when wrong."""
    if not accuracy_score(reply, answer):
        return 0.0
    return 1.0 if _ENDS_WITH_TAG_RE.search(_text(reply)) else 0.5


def concise_score(reply: Any, answer: Any) -> float:
    """For a right answer: 1.0 up to 16 words, linearly down to 0.0 at 48 words; 0.0 when wrong."""
    if not accuracy_score(reply, answer):
        return 0.0
    words = len(_text(reply).split())
    span = CONCISE_ZERO_WORDS - CONCISE_FULL_WORDS
    return min(1.0, max(0.0, (CONCISE_ZERO_WORDS - words) / span))


def score(reply: Any, answer: Any) -> JudgeScore:
    """All three components of one reply against its reference answer."""
    return JudgeScore(accuracy_score(reply, answer), format_score(reply, answer), concise_score(reply, answer))


def _answers(completions: Sequence[Any], columns: dict[str, Any]) -> list[Any]:
    answers = columns.get("answer")
    if answers is None:
        given = ", ".join(sorted(columns)) or "none"
        raise DataError(
            "the demo judge needs each prompt record's reference answer in an 'answer' column "
            f"(extra columns received: {given}). Use the demo prompts files (data/demo/prompts_*.jsonl) "
            "or add an 'answer' column to your prompt-only data.",
            field="answer",
        )
    if len(answers) != len(completions):
        raise ValueError(f"{len(answers)} answers for {len(completions)} completions")
    return list(answers)


@register_reward("accuracy")
def accuracy_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """1.0 where the completion's final answer equals the record's ``answer`` (``answer.is_correct``)."""
    return [accuracy_score(c, a) for c, a in zip(completions, _answers(completions, columns))]


@register_reward("format")
def format_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """For a right answer: 1.0 when it ends in ``Answer: N``, else 0.5; 0.0 for a wrong answer."""
    return [format_score(c, a) for c, a in zip(completions, _answers(completions, columns))]


@register_reward("concise")
def concise_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """For a right answer: 1.0 up to 16 words, linearly down to 0.0 at 48 words; 0.0 for a wrong answer."""
    return [concise_score(c, a) for c, a in zip(completions, _answers(completions, columns))]


@register_reward("judge")
def judge_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """The demo judge: 1.0 * accuracy + 0.3 * format + 0.2 * concise (maximum 1.5)."""
    return [score(c, a).total for c, a in zip(completions, _answers(completions, columns))]
