"""Test helper: write a tiny Llama and its BPE tokenizer as an (unquantised, F32) GGUF file.

Follows the llama.cpp conventions that transformers' GGUF reader undoes: GGUF tensor names from
``gguf.get_tensor_name_map``, Q/K rows permuted for llama.cpp's rotary layout, tokenizer as
``gpt2`` BPE metadata. Lets the GGUF loading path be tested in seconds instead of converting SmolLM2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map

CONTROL, NORMAL = 3, 1


def _permute_for_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of transformers' ``_reverse_permute_weights`` (llama.cpp's ``permute``)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model, tokenizer, path: Path) -> Path:
    config = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    special = {t["content"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        weight = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            weight = _permute_for_llama_cpp(weight, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = _permute_for_llama_cpp(weight, config.num_key_value_heads)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        writer.add_tensor(gguf_name, np.ascontiguousarray(weight))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
