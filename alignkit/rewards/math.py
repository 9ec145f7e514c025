"""The built-in correctness reward: 1.0 when a reply's final answer equals the record's reference.

``correctness`` reads the final answer with ``alignkit.rewards.answer.extract_answer`` (tagged
``Answer: N`` / ``The answer is N`` / ``\\boxed{}`` / ``#### N`` / ``<answer>``, a trailing
equation, else the last number) and the reference with ``gold_answer`` (gsm8k's ``"...#### 72"``,
a bare ``72``, ``\\boxed{72}``). Numbers compare exactly; symbolic answers (``\\frac{\\sqrt{3}}{2}``)
go through the maintained ``math-verify`` package. Without ``math-verify`` installed the numeric
parser alone decides, and this module says so once on stderr when the reward is first used.

The reference comes from the record's ``answer`` column (gsm8k, the demo task), else
``reward_model["ground_truth"]`` (verl parquet rows), else ``ground_truth`` or ``solution``
(MATH-style), else ``label`` (OpenRLHF's ``--label_key`` under ``data.columns=openrlhf``). A record
with none of them is a data mistake: ``DataError`` naming the columns found.
A reference that holds no answer at all (``""``) scores 0.

Left out: partial credit, units and number words (see ``answer.py``), code execution.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from alignkit.errors import DataError
from alignkit.rewards import answer
from alignkit.rewards.registry import register_reward

REFERENCE_COLUMNS = ("answer", "reward_model", "ground_truth", "solution", "label")  # label: OpenRLHF's --label_key
_WARNED = False


def _warn_once() -> None:
    global _WARNED
    if not _WARNED and not answer.MATH_VERIFY_AVAILABLE:
        print("alignkit: math-verify is not installed; the correctness reward compares numbers only and symbolic "
              "answers as exact text (pip install math-verify)", file=sys.stderr)
    _WARNED = True


def reference_of(columns: dict[str, Sequence[Any]], i: int) -> Any:
    """The reference answer of completion ``i`` from the first reference column the record has."""
    for key in REFERENCE_COLUMNS:
        if key in columns:
            value = columns[key][i]
            if key == "reward_model":
                if isinstance(value, dict) and "ground_truth" in value:
                    return value["ground_truth"]
                continue
            return value
    raise DataError(
        "the correctness reward needs each prompt record's reference answer: an 'answer' column (gsm8k, the demo "
        "task), a verl-style 'reward_model: {ground_truth: ...}', a 'ground_truth'/'solution' column, or OpenRLHF's "
        "label_key ('label') (columns "
        f"received: {', '.join(sorted(columns)) or 'none'}).",
        field="answer",
    )


def correctness_score(reply: Any, reference: Any) -> float:
    """1.0 when the reply's final answer equals the reference, else 0.0."""
    _warn_once()
    return 1.0 if answer.is_correct(reply, reference) else 0.0


@register_reward("correctness")
def correctness_reward(prompts: list[str], completions: list[Any], **columns: list) -> list[float]:
    """1.0 where the completion's final answer equals the record's reference answer (math-verify for symbolic ones)."""
    return [correctness_score(c, reference_of(columns, i)) for i, c in enumerate(completions)]
