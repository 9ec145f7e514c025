"""Shared fixtures of the engine tests: a tiny Llama and fixed, step-indexed training data.

Imported both by the pytest files and by ``ds_worker.py`` (run under the DeepSpeed launcher), so
the 1-process and N-process runs see exactly the same model and global batches. The model is the
shared ``tests/tiny_llama.py`` builder at a smaller size (hidden 16, tied embeddings, eager attention).
"""

from __future__ import annotations

import torch
from tiny_llama import tiny_llama

VOCAB = 64
SEQ_LEN = 12


def tiny_model(*, dropout: float = 0.0, seed: int = 0):
    return tiny_llama(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
                      attention_dropout=dropout, attn_implementation="eager", seed=seed)


def global_batch(step: int, rows: int) -> torch.Tensor:
    """The ``rows`` token sequences of optimizer step ``step`` (same on every rank)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=generator)


def micro_batch(step: int, micro_index: int, micro_size: int, n_micro: int) -> torch.Tensor:
    """Rows ``[micro_index * micro_size, (micro_index + 1) * micro_size)`` of step ``step``'s global batch."""
    rows = global_batch(step, micro_size * n_micro)
    return rows[micro_index * micro_size : (micro_index + 1) * micro_size]
