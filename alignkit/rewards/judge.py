"""The demo task's rule-based judge: accuracy, format and conciseness of a short numeric answer.

The demo task (``data/demo/README.md``) asks small questions with one integer answer -- arithmetic
(``What is 23 + 14?``), one-step word problems and copying a number from a given fact -- always
followed by the instruction ``Answer with 'Answer: <number>' only.`` The ideal reply is
``Answer: 37``. Three components, each a pure function of the reply text (and the reference
answer), each in [0, 1]:

* ``accuracy`` -- 1.0 when the reply's final answer equals the reference: the number after the
  last ``Answer:`` tag if there is one, otherwise the last number in the reply; else 0.0.
* ``format``   -- 1.0 when the whole reply is ``Answer: N`` (a trailing period allowed);
  0.5 when an ``Answer: N`` tag appears amid other text; 0.25 when the reply has no tag but is a
  single line ending in a number (``7 + 5 = 12``); else 0.0.
* ``concise``  -- 1.0 up to ``CONCISE_FULL_WORDS`` words, falling linearly to 0.0 at
  ``CONCISE_ZERO_WORDS`` words; 0.0 for a reply without any number, so that saying nothing (or
  "I don't know") earns no credit for being short.

``judge = 1.0 * accuracy + 0.5 * format + 0.25 * concise`` (maximum 1.75). The weights make
correctness dominate: a correct but rambling reply (>= 1.0) beats a wrong reply in the perfect
format (0.75), which beats rambling without any number (0.0).

What SmolLM2-135M-Instruct (Q4_1 GGUF, its chat template with the default system prompt) does,
sampled before this design was fixed (20 hand-written prompts in several phrasings), then
re-measured on the shipped prompts:

* greedy: short equations (``7 + 5 = 12``, ``23 + 14 = 37``) or a copied sentence (``The blue key
  opens door 7.``); wrong sums are common (``12 - 4 = 12``, ``53 + 54 = 167``); it never writes the
  ``Answer:`` tag, whatever the phrasing (also with an in-prompt example), though it sometimes
  ends with ``The answer is: 8``. On the first 40 ``prompts_eval`` rows: accuracy 0.40, format
  0.15, concise 0.92, judge 0.71 of 1.75 (fact-copy 1.27, arithmetic and word problems ~0.58).
* sampled at T=1 (full vocabulary, top_p=1): mostly rambling of 20-48 tokens, about 15% correct
  final numbers, the ``Answer: N`` tag in ~3 of 60 samples, short equations in ~15%: judge 0.33
  on the 60 hand-written samples, 0.32 on 16 samples of shipped prompts (accuracy 0.12, format
  0.09, concise 0.58), with a wide spread within each prompt's group.

So the starting reward is well above 0 and well below the maximum: conciseness and the
"single line ending in a number" format level are within reach of the model's own samples
(RL can raise them quickly), correctness is partly reachable, and the full ``Answer: N`` format
is rare at first (the SFT and preference data teach it). Numbers are digits only (``twelve`` is
not an answer); references are compared as numbers (``"12"`` == ``12.0``).

Every component is robust to any model output: non-strings are stringified (``None`` -> ``""``),
nothing here raises on garbage. A missing ``answer`` column is a data mistake and raises
``DataError``. Left out: number words, fractions, units, and any model-based judging.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from alignkit.errors import DataError
from alignkit.rewards.registry import register_reward

INSTRUCTION = "Answer with 'Answer: <number>' only."
WEIGHTS = {"accuracy": 1.0, "format": 0.5, "concise": 0.25}
CONCISE_FULL_WORDS = 8
CONCISE_ZERO_WORDS = 40
MAX_SCORE = sum(WEIGHTS.values())

# A number not glued to a preceding digit or decimal point: "12-4" reads as 12 and 4, "-3" as -3.
_NUMBER = r"(?<![\d.])-?\d+(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_TAG_RE = re.compile(r"answer\s*:\s*(" + _NUMBER + r")", re.IGNORECASE)
_STRICT_RE = re.compile(r"\s*answer\s*:\s*" + _NUMBER + r"\s*\.?\s*", re.IGNORECASE)
_ENDS_WITH_NUMBER_RE = re.compile(_NUMBER + r"\s*\.?\s*$")


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


def _as_number(value: Any) -> float | None:
    try:
        number = float(_text(value).strip().replace(",", ""))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def extract_answer(reply: Any) -> float | None:
    """The reply's final answer: the number after the last ``Answer:`` tag, else its last number."""
    text = _text(reply)
    tagged = _TAG_RE.findall(text)
    found = tagged or _NUMBER_RE.findall(text)
    return _as_number(found[-1]) if found else None


def accuracy_score(reply: Any, answer: Any) -> float:
    reference = _as_number(answer)
    given = extract_answer(reply)
    return 1.0 if reference is not None and given is not None and abs(given - reference) < 1e-9 else 0.0


def format_score(reply: Any) -> float:
    text = _text(reply)
    if _STRICT_RE.fullmatch(text):
        return 1.0
    if _TAG_RE.search(text):
        return 0.5
    stripped = text.strip()
    if stripped and "\n" not in stripped and _ENDS_WITH_NUMBER_RE.search(stripped):
        return 0.25
    return 0.0


def concise_score(reply: Any) -> float:
    text = _text(reply)
    if not _NUMBER_RE.search(text):
        return 0.0
    words = len(text.split())
    span = CONCISE_ZERO_WORDS - CONCISE_FULL_WORDS
    return min(1.0, max(0.0, (CONCISE_ZERO_WORDS - words) / span))


def score(reply: Any, answer: Any) -> JudgeScore:
    """All three components of one reply against its reference answer."""
    return JudgeScore(accuracy_score(reply, answer), format_score(reply), concise_score(reply))


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
    """1.0 where the final number of the completion equals the record's ``answer``."""
    return [accuracy_score(c, a) for c, a in zip(completions, _answers(completions, columns))]


@register_reward("format")
def format_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """1.0 for exactly ``Answer: N``, 0.5 for a tag amid other text, 0.25 for one line ending in a number."""
    return [format_score(c) for c in completions]


@register_reward("concise")
def concise_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """1.0 up to 8 words, linearly down to 0.0 at 40 words; 0.0 without any number."""
    return [concise_score(c) for c in completions]


@register_reward("judge")
def judge_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """The demo judge: 1.0 * accuracy + 0.5 * format + 0.25 * concise (maximum 1.75)."""
    return [score(c, a).total for c, a in zip(completions, _answers(completions, columns))]
