"""The pairwise preference model's input: the prompt and both responses in one sequence (PairRM-style).

PairRM (LLM-Blender, Jiang et al. 2023) reads ``<|source|> x <|candidate1|> y_a <|candidate2|> y_b``.
Here, for a decoder with a scalar head on the last token, the sequence is
``prompt_ids + ids("<|candidate1|>") + a + ids("<|candidate2|>") + b`` with the markers tokenized as
plain text (no tokens are added to the vocabulary, so the exported model keeps its tokenizer); the
head's logit at the last token of ``b`` is ``logit P(a > b | x)``.

``pair_group`` lays one pair out as a ``TokenizedGroup`` with K=2 slots sharing the prompt: slot 0
lists (a, b), slot 1 lists (b, a), so one collated forward scores both orders (any ``data.layout``).
The pm runner trains on it and the pairwise judge (``alignkit/rl/judges.py``) scores with it, so both
read one format. Left out: separate length budgets per response (``data.max_length`` applies to the
prompt plus one response in the data pipeline; the pair sequence is up to prompt + 2 responses).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from alignkit.data.batch import TokenizedGroup

MARKER_A = "<|candidate1|>"
MARKER_B = "<|candidate2|>"


def marker_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The two markers' token ids in ``tokenizer`` (plain text, no special tokens)."""
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return encode(MARKER_A), encode(MARKER_B)


def pair_group(group: TokenizedGroup, a: int, b: int, markers: tuple[list[int], list[int]]) -> TokenizedGroup:
    """Completions ``a`` and ``b`` of ``group`` as a K=2 group: slot 0 = (a, b), slot 1 = (b, a)."""
    first, second = markers
    ids_a, ids_b = group.completion_ids[a], group.completion_ids[b]
    both = [first + ids_a + second + ids_b, first + ids_b + second + ids_a]
    return replace(group, completion_ids=both, completion_train_mask=[[True] * len(ids) for ids in both],
                   scores=None, labels=None, example_id=f"{group.example_id}/pair{a}{b}")
