"""Shared fixtures of the data tests: the shipped tiny tokenizer, the real SmolLM2 one, file writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from alignkit.models.load import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from alignkit.models.load import load_tokenizer

    return load_tokenizer("smollm2")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def write_jsonl():
    """``write_jsonl(path, rows) -> path``."""
    return _write_jsonl
