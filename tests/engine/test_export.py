"""HF export from a live engine: loads with transformers, LoRA merged, prepare hook on a copy, run continues."""

import pytest
import torch
from engine_tiny import micro_batch, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.engine.config import DeepSpeedConfig, build_train_ds_config
from alignkit.engine.engine import init_train_engine, setup_distributed
from alignkit.engine.export import export_hf_model, gathered_cpu_copy


@pytest.fixture(scope="module", autouse=True)
def dist():
    torch.set_num_threads(1)
    return setup_distributed()


def lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def trained_engine(model, stage):
    ds = build_train_ds_config(
        DeepSpeedConfig(zero_stage=stage, dtype="fp32"), micro_batch_size=2, grad_accum_steps=1, world_size=1
    )
    engine = init_train_engine(model, ds, lr=5e-2, warmup_steps=0, total_steps=10, scheduler="constant")
    for step in range(2):
        ids = micro_batch(step, 0, 2, 1)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return engine


def engine_logits(engine, ids):
    with torch.no_grad():
        return engine(input_ids=ids).logits


@pytest.mark.parametrize("stage", [0, 3])
def test_lora_engine_exports_a_merged_loadable_model(tmp_path, stage):
    from alignkit.models.tiny import load_tiny_tokenizer

    engine = trained_engine(lora_model(), stage)
    ids = micro_batch(7, 0, 2, 1)
    expected = engine_logits(engine, ids)
    with torch.no_grad():
        base_logits = tiny_model()(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapters changed the model

    out = export_hf_model(engine, load_tiny_tokenizer(), tmp_path / "final")
    assert out == tmp_path / "final"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)

    # the live engine keeps its adapters and keeps training after the export
    assert any("lora_A" in name for name, _ in engine.module.named_parameters())
    torch.testing.assert_close(engine_logits(engine, ids), expected, atol=0, rtol=0)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def test_prepare_hook_runs_on_a_cpu_copy(tmp_path):
    engine = trained_engine(tiny_model(), 3)
    seen = []

    def prepare(model):
        seen.append(model)
        with torch.no_grad():
            model.model.norm.weight.fill_(2.0)
        return model

    export_hf_model(engine, None, tmp_path / "out", prepare=prepare)
    assert seen and seen[0] is not engine.module
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.all(exported.model.norm.weight == 2.0)
    live = gathered_cpu_copy(engine.module).model.norm.weight
    assert not torch.all(live == 2.0)  # the engine's model was not touched


def test_export_replaces_an_existing_folder(tmp_path):
    engine = trained_engine(tiny_model(), 0)
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    export_hf_model(engine, None, out)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "final"]  # no temp folders left behind


def test_lora_adapter_alone_when_not_merging(tmp_path):
    engine = trained_engine(lora_model(), 0)
    out = export_hf_model(engine, None, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("stage", [0, 3])
def test_critic_exports_as_a_token_classifier_with_its_values(tmp_path, stage):
    """PPO's critic export: the same gathered path with ``ValueModel.as_token_classifier``; the folder
    loads with transformers and with ``load_value_model`` and gives the live engine's values."""
    from transformers import AutoModelForTokenClassification

    from alignkit.models.config import LoraConfig, ModelConfig
    from alignkit.models.value import ValueModel, load_value_model

    critic, tokenizer = load_value_model(ModelConfig(lora=LoraConfig(r=2)))
    ds = build_train_ds_config(DeepSpeedConfig(zero_stage=stage, dtype="fp32"), micro_batch_size=2,
                               grad_accum_steps=1, world_size=1)
    engine = init_train_engine(critic, ds, lr=5e-2, warmup_steps=0, total_steps=10, scheduler="constant")
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    for _ in range(2):
        engine.backward((engine(ids, mask) - 1.0).pow(2).mean())
        engine.step()
    with torch.no_grad():
        expected = engine(ids, mask)
        untrained = load_value_model(ModelConfig(lora=LoraConfig(r=2)))[0](ids, mask)
    assert (expected - untrained).abs().max() > 1e-3  # adapters and head moved

    out = export_hf_model(engine, tokenizer, tmp_path / "final_critic", prepare=ValueModel.as_token_classifier)
    loaded, _ = load_value_model(ModelConfig(name_or_path=str(out)))
    exported = AutoModelForTokenClassification.from_pretrained(out)
    assert not any("lora" in name for name in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), expected, atol=1e-5, rtol=1e-4)
        logits = exported(input_ids=ids, attention_mask=mask).logits[..., 0]
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)
    assert any("lora_A" in name for name, _ in engine.module.named_parameters())  # the live critic is intact
