"""Loading from every source, LoRA, export, reward and value models, and the errors users see."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.errors import ConfigError, ModelLoadError
from alignkit.models.config import LoraConfig, ModelConfig, TinyModelConfig
from alignkit.models.load import (
    disabled_adapter,
    export_pretrained,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_source,
)
from gguf_writer import write_tiny_gguf

TEXT = "The capital of France is Paris."


def logits_of(model, tokenizer, text=TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_tiny(tmp_path: Path, **tiny) -> tuple[Path, torch.nn.Module]:
    model, tokenizer = load_causal_lm(ModelConfig(tiny=TinyModelConfig(**tiny)))
    folder = export_pretrained(model, tokenizer, tmp_path / "tiny_hf")
    return folder, model


def test_local_folder_round_trip_prefers_safetensors(tmp_path):
    folder, original = saved_tiny(tmp_path, seed=3)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(folder)))
    torch.testing.assert_close(logits_of(model, tokenizer), logits_of(original, tokenizer), rtol=0, atol=0)
    assert tokenizer.chat_template and tokenizer.pad_token == "<|pad|>"
    assert load_tokenizer(str(folder)).encode(TEXT) == tokenizer.encode(TEXT)


def test_gguf_file_and_folder_plus_gguf_file(tmp_path):
    original, tokenizer = load_causal_lm(ModelConfig(tiny=TinyModelConfig(seed=5)))
    gguf_path = write_tiny_gguf(original, tokenizer, tmp_path / "tiny.gguf")
    for cfg in (ModelConfig(name_or_path=str(gguf_path)), ModelConfig(name_or_path=str(tmp_path), gguf_file="tiny.gguf")):
        model, gguf_tokenizer = load_causal_lm(cfg)
        assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
        assert gguf_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
        torch.testing.assert_close(logits_of(model, tokenizer), logits_of(original, tokenizer), rtol=0, atol=1e-6)
    # a dequantised GGUF model exports as a plain folder that transformers loads without the GGUF
    folder = export_pretrained(model, gguf_tokenizer, tmp_path / "from_gguf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(original, tokenizer), rtol=0, atol=1e-6)


def test_folder_holding_only_gguf_files_names_them(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="weights.gguf"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))


def test_missing_path_and_hub_id_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source("./models/x.gguf")
    assert resolve_source("org/some-model").kind == "hub"
    # tests run with HF_HUB_OFFLINE=1 (tests/conftest.py), so this fails fast like a machine without network
    with pytest.raises(ModelLoadError, match="'alignkit-test/no-such-model'.*local-dir"):
        load_causal_lm(ModelConfig(name_or_path="alignkit-test/no-such-model"))


def _remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder, _ = saved_tiny(tmp_path)
    sentinel = tmp_path / "remote_code_ran"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return folder, sentinel


def test_trust_remote_code_is_off_by_default(tmp_path):
    folder, sentinel = _remote_code_folder(tmp_path)
    assert ModelConfig().trust_remote_code is False
    try:
        model, _ = load_causal_lm(ModelConfig(name_or_path=str(folder)))
    except ModelLoadError as error:  # refusing is fine as long as the message says what to do
        assert "trust_remote_code" in str(error)
    else:
        assert type(model).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()
    model, _ = load_causal_lm(ModelConfig(name_or_path=str(folder), trust_remote_code=True))
    assert sentinel.exists() and type(model).__name__ == "CustomModel"


def test_pad_token_is_set_when_missing(tmp_path):
    folder, _ = saved_tiny(tmp_path)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert AutoTokenizer.from_pretrained(str(folder)).pad_token is None
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=str(folder)))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_config_validation_and_dict_configs():
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        load_causal_lm(ModelConfig(), dtype="fp8")
    with pytest.raises(ConfigError, match="sdpa"):
        ModelConfig(attn_implementation="fast").validate()
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(tiny=TinyModelConfig(num_heads=3)).validate()
    model, _ = load_causal_lm({"tiny": {"num_layers": 1}}, dtype="bf16")
    assert len(model.model.layers) == 1 and model.dtype == torch.bfloat16


@pytest.mark.parametrize("precision, expected", [
    ("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
    ("bf16_autocast", torch.float32),  # fp32 weights, bf16 matmuls under autocast
])
def test_weights_load_in_the_precision_deepspeed_dtype_trains_in(precision, expected):
    """One precision knob: the model section has none; the loaders take the run's deepspeed.dtype."""
    assert load_causal_lm(ModelConfig(), dtype=precision)[0].dtype == expected
    assert load_causal_lm(ModelConfig())[0].dtype == torch.float32  # outside a run: fp32
    assert "dtype" not in {f.name for f in dataclasses.fields(ModelConfig)}


def test_lora_wraps_trains_adapters_only_and_rejects_unknown_targets():
    model, _ = load_causal_lm(ModelConfig(lora=LoraConfig(r=2)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("down_proj.lora_A" in n for n in trainable) and any("q_proj.lora_B" in n for n in trainable)
    with pytest.raises(ConfigError, match="q_proj"):
        load_causal_lm(ModelConfig(lora=LoraConfig(r=2, target_modules=["query_key_value"])))
    plain, _ = load_causal_lm(ModelConfig())
    with pytest.raises(ValueError):
        with disabled_adapter(plain):
            pass


def _checkpointed_layers(model) -> int:
    return sum(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules())


def test_gradient_checkpointing_is_enabled_when_asked():
    model, _ = load_causal_lm(ModelConfig(gradient_checkpointing=True, lora=LoraConfig(r=2)))
    assert _checkpointed_layers(model) > 0
    model, _ = load_causal_lm(ModelConfig())
    assert _checkpointed_layers(model) == 0


def _perturbed_lora_model():
    model, tokenizer = load_causal_lm(ModelConfig(lora=LoraConfig(r=4)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


def test_export_merges_lora_without_touching_the_live_model(tmp_path):
    model, tokenizer = _perturbed_lora_model()
    expected = logits_of(model, tokenizer)
    folder = export_pretrained(model, tokenizer, tmp_path / "merged", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(str(folder))
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits_of(merged, tokenizer), expected, rtol=0, atol=1e-5)
    assert any("lora_A" in n for n, _ in model.named_parameters())  # live model still has adapters
    torch.testing.assert_close(logits_of(model, tokenizer), expected, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(str(folder)).encode(TEXT) == tokenizer.encode(TEXT)


def test_export_adapter_only_loads_with_peft(tmp_path):
    from peft import PeftModel

    model, tokenizer = _perturbed_lora_model()
    folder = export_pretrained(model, tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    base, _ = load_causal_lm(ModelConfig())
    reloaded = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(logits_of(reloaded, tokenizer), logits_of(model, tokenizer), rtol=0, atol=1e-6)


def test_export_is_atomic(tmp_path, monkeypatch):
    model, tokenizer = load_causal_lm(ModelConfig())
    out = export_pretrained(model, tokenizer, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_pretrained(model, tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the previous export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind
    monkeypatch.undo()
    export_pretrained(model, tokenizer, out)  # replacing an existing export works
    assert sorted(p.name for p in out.iterdir()) == before


def test_reward_model_tiny_and_from_causal_folder(tmp_path):
    reward, tokenizer = load_reward_model(ModelConfig())
    batch = tokenizer([TEXT, "Hi"], padding=True, return_tensors="pt")
    assert reward(**batch).logits.shape == (2, 1)
    folder, causal = saved_tiny(tmp_path)
    reward, _ = load_reward_model(ModelConfig(name_or_path=str(folder)))
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(reward.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    # right padding does not change a sequence's score (read at its last real token)
    alone = reward(**tokenizer(["Hi"], return_tensors="pt")).logits
    torch.testing.assert_close(reward(**batch).logits[1], alone[0], rtol=0, atol=1e-5)


def test_reward_model_from_gguf_and_with_lora(tmp_path):
    causal, tokenizer = load_causal_lm(ModelConfig())
    gguf_path = write_tiny_gguf(causal, tokenizer, tmp_path / "tiny.gguf")
    reward, _ = load_reward_model(ModelConfig(name_or_path=str(gguf_path)))
    assert reward.config.num_labels == 1 and getattr(reward, "hf_quantizer", None) is None
    torch.testing.assert_close(reward.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    reward, _ = load_reward_model(ModelConfig(lora=LoraConfig(r=2)))
    trainable = [n for n, p in reward.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)  # the new head trains in full next to the adapters
    assert all("score" in n or "lora_" in n for n in trainable)
