"""The shipped tiny tokenizer and the tiny Llama built from config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from alignkit.models.config import TinyModelConfig
from alignkit.models.tiny import build_tiny_model, tiny_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]


def test_autotokenizer_loads_the_shipped_folder_with_special_tokens():
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    assert 256 < len(tokenizer) <= 2048
    assert tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id, tokenizer.eos_token_id]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    size = sum(f.stat().st_size for f in tiny_tokenizer_dir().iterdir())
    assert size < 300_000


def test_chat_template_renders_chatml():
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and text.startswith(prompt)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens stay single tokens


def test_encode_decode_round_trip():
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    for text in ["The capital of France is Paris.", "  12345 + 678 = 13023\n\tdone", "naïve café — 東京 🙂", ""]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # the trained merges make ordinary English much shorter than its bytes
    sentence = "The quick brown fox jumps over the lazy dog."
    assert len(tokenizer.encode(sentence, add_special_tokens=False)) < len(sentence) / 2


def test_build_script_reproduces_the_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_tokenizer.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (tiny_tokenizer_dir() / name).read_text(), name


def test_tiny_model_is_deterministic_in_its_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_tiny_model(TinyModelConfig(seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    second = build_tiny_model(TinyModelConfig(seed=7))
    other = build_tiny_model(TinyModelConfig(seed=8))
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_tiny_model_matches_config_and_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))
    cfg = TinyModelConfig(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=1, intermediate_size=48)
    model = build_tiny_model(cfg, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert len(model.model.layers) == 3 and model.config.num_key_value_heads == 1
    ids = torch.tensor([tokenizer.encode("Hello there")])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
