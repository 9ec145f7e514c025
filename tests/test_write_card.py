"""``scripts/write_card.py``'s precision line: read from the run's precision.json, never guessed from ``auto``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import write_card  # noqa: E402


def test_the_card_says_the_precision_the_run_trained_in(tmp_path):
    auto = {"deepspeed": {"dtype": "auto"}}
    assert "not recorded" in write_card._dtype(auto, tmp_path)  # an old run: said, not guessed as fp32
    assert write_card._dtype({"deepspeed": {"dtype": "fp32"}}, tmp_path) == "fp32"
    entry = {"requested": "auto", "resolved": "bf16_autocast", "cpu": "AMD EPYC"}
    (tmp_path / "precision.json").write_text(json.dumps({**entry, "history": [entry]}))
    assert write_card._dtype(auto, tmp_path) == "bf16_autocast (deepspeed.dtype=auto)"
    later = {**entry, "resolved": "fp32", "cpu": "Intel Xeon"}
    (tmp_path / "precision.json").write_text(json.dumps({**later, "history": [entry, later]}))
    assert write_card._dtype(auto, tmp_path) == "bf16_autocast then fp32 (deepspeed.dtype=auto)"
