"""``scripts/prm_kinds.py``'s classification of quoted facts and replies, on hand-made text (no model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import prm_kinds  # noqa: E402

PROMPT = "The ticket costs 71 dollars. The scarf costs 84 dollars. How many dollars does the ticket cost?"


def test_fact_and_reply_kinds():
    assert prm_kinds.fact_kind(PROMPT, "The ticket costs 71 dollars.", True) == "right"
    assert prm_kinds.fact_kind(PROMPT, "The scarf costs 84 dollars.", False) == "other_fact"
    assert prm_kinds.fact_kind(PROMPT, "The ticket costs 84 dollars.", False) == "wrong_number"
    assert prm_kinds.reply_kind(PROMPT, "The ticket costs 71 dollars.", "71") == "right"
    assert prm_kinds.reply_kind(PROMPT, "The scarf costs 84 dollars.", "71") == "other_fact"
    assert prm_kinds.reply_kind(PROMPT, "The ticket costs 84 dollars.", "71") == "wrong_number"
    assert prm_kinds.reply_kind(PROMPT, "  ", "71") == "empty"


def test_summary_per_kind():
    s = prm_kinds.summarise(["right", "right", "wrong_number"], [0.9, 0.4, 0.7], [True, True, False])
    assert s["right"] == {"n": 2, "mean_p": pytest.approx(0.65), "accuracy": 0.5}
    assert s["wrong_number"] == {"n": 1, "mean_p": pytest.approx(0.7), "accuracy": 0.0}
    assert "accuracy" not in prm_kinds.summarise(["right"], [0.2])["right"]
