"""``alignkit plan`` offline: dpo_llama3's parameter count from the shipped config, ZeRO 0/1/2/3 apart,
an activation estimate, and the compose-time refusals it shares with ``train``."""

import pytest

from alignkit.config.compose import compose
from alignkit.errors import ConfigError
from alignkit.plan import activation_gib, count_parameters, model_config, print_plan, zero_stage_rows

LLAMA3_8B = 8_030_261_248  # Meta-Llama-3-8B(-Instruct): 32 layers, h 4096, GQA 8 kv heads, vocab 128256, untied


def test_dpo_llama3_parameter_count_is_known_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    total, largest = count_parameters(compose(["recipe=dpo_llama3"]))
    assert total == LLAMA3_8B
    assert largest == 128256 * 4096  # the embedding (and the untied LM head)


def test_zero_stages_are_four_rows():
    p = 1_000_000_000
    rows = dict(zero_stage_rows(p, 8, "bf16"))
    gib = 2**30
    zero0, zero1, zero2, zero3 = (rows[k] * gib / p for k in rows)
    assert zero0 == pytest.approx(16)  # 2 + 2 + 12 bytes per parameter, replicated
    assert zero1 == pytest.approx(4 + 12 / 8)  # ZeRO-1 shards the optimizer states only
    assert zero2 == pytest.approx(2 + 14 / 8)
    assert zero3 == pytest.approx(16 / 8)
    assert dict(zero_stage_rows(p, 1, "bf16"))["zero1 (optimizer states sharded)"] == pytest.approx(16 * p / gib)
    assert list(dict(zero_stage_rows(p, 2, "fp32")).values())[0] == pytest.approx(16 * p / gib)  # 4 + 4 + 8


def test_activation_estimate_scales_with_tokens_and_checkpointing():
    config = model_config(compose(["recipe=dpo_llama3"]))
    full = activation_gib(config, 8192, checkpointing=False)
    ckpt = activation_gib(config, 8192, checkpointing=True)
    # per token and layer 6h + 2kv + 4i = 83,968 bf16 values: 32 layers x 8192 tokens ~ 41 GiB, + the head chunk
    assert full == pytest.approx((32 * 83968 * 8192 * 2 + 3 * 256 * 128256 * 4) / 2**30)
    assert ckpt < full / 8
    assert activation_gib(config, 4096, checkpointing=False) < full


def test_plan_prints_every_zero_stage_and_activations(capsys):
    assert print_plan(["recipe=dpo_llama3", "launcher.nproc_per_node=8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "parameters: 8,030.3 M" in out
    for stage in ("zero0", "zero1", "zero2", "zero3"):
        assert stage in out
    assert "activations: ~" in out


@pytest.mark.parametrize("overrides, message", [
    (["recipe=dpo_tiny", "data.layout=packed", "model.attn_implementation=flash_attention_2"], "dense 4D"),
    (["recipe=dpo_tiny", "data.layout=prefix_shared", "model.attn_implementation=flash_attention_3"], "dense 4D"),
    (["recipe=dpo_tiny", "data.layout=packed", "model.attn_implementation=flex_attention"], "dense 4D"),
    (["recipe=kto_tiny", "trainer.batch_size=1", "trainer.micro_batch_size=1"], "batch_size >= 2"),
])
def test_plan_refuses_what_train_refuses(overrides, message):
    with pytest.raises(ConfigError, match=message):
        print_plan(overrides)


def test_padded_rows_with_flash_attention_and_packed_rows_with_eager_are_accepted():
    compose(["recipe=dpo_tiny", "model.attn_implementation=flash_attention_2"])
    compose(["recipe=dpo_tiny", "data.layout=packed", "model.attn_implementation=eager"])
