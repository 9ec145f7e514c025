"""The tiny random Llama of the tests that need a bare transformers model (no alignkit loading).

One builder, imported as ``from tiny_llama import tiny_llama`` (``tests/`` is on ``sys.path``
under pytest through ``tests/conftest.py``; worker scripts started in a fresh process get it on
``PYTHONPATH`` from the test that starts them). Weights depend only on ``seed`` and the config;
the global RNG is left alone. Defaults: 2 layers, hidden 32, 4 heads (2 KV), vocabulary 100,
SDPA attention; keyword arguments override them or set any other ``LlamaConfig`` field.

Left out: the alignkit tiny model with its tokenizer (``alignkit.models.tiny``; tests that train
through alignkit load ``model.name_or_path=tiny`` instead).
"""

from __future__ import annotations

import torch

DEFAULTS = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def tiny_llama(*, seed: int = 0, attn_implementation: str = "sdpa", **config):
    """A ``LlamaForCausalLM`` initialised from ``seed`` (left in training mode, as built)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(**{**DEFAULTS, **config})
    llama_config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config)
