"""The tiny model: the shipped tokenizer plus a small Llama built from a config, for tests and demos.

The tokenizer (``alignkit/assets/tiny_tokenizer``, built by ``scripts/build_tiny_tokenizer.py``)
is a ~1k-token byte-level BPE with ChatML special tokens and chat template; the model is a
``LlamaForCausalLM`` whose vocabulary matches it, initialised from ``TinyModelConfig.seed`` without
disturbing the global RNG, so two builds with the same config have identical weights.

Deliberately left out: pretrained tiny weights (the model is random; tests that need a model that
"knows" something use SmolLM2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.models.config import TinyModelConfig

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"


def tiny_tokenizer_dir() -> Path:
    """Folder of the shipped tiny tokenizer (``AutoTokenizer.from_pretrained`` loads it)."""
    return TINY_TOKENIZER_DIR


def load_tiny_tokenizer(**kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), **kwargs)


def tiny_llama_config(cfg: TinyModelConfig, tokenizer, *, attn_implementation: str = "sdpa"):
    """The ``LlamaConfig`` of the tiny model for ``tokenizer`` (vocabulary and special ids)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    return config


def build_tiny_model(
    cfg: TinyModelConfig,
    tokenizer=None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    model_class=None,
    **config_overrides,
):
    """A randomly initialised tiny Llama, deterministic in ``cfg.seed``.

    ``model_class`` defaults to ``LlamaForCausalLM``; ``LlamaForSequenceClassification`` (with
    ``num_labels=1`` in ``config_overrides``) gives the tiny reward model.
    """
    from transformers import LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else load_tiny_tokenizer()
    config = tiny_llama_config(cfg, tokenizer, attn_implementation=attn_implementation)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model_class = model_class or LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_class(config)
    return model.to(dtype).eval()  # like from_pretrained: trainers call .train() themselves
