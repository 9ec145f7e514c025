"""The lean decoder (``generation.decode_dtype=bf16``) against transformers' forward.

In fp32 (the decoder's arithmetic without the bf16 casts) every decode step's logits must equal a
fresh transformers forward of the unpadded sequence to 1e-5, for Llama (GQA, tied and untied head,
Llama 3 RoPE scaling), Qwen2 (q/k/v biases) and Mistral, left-padded prompts of different lengths
and rows dropped mid-way; in bf16 the engine's log-probs must stay within a stated tolerance of
transformers' forward under ``torch.autocast(bf16)`` and its greedy tokens mostly agree. Models the
decoder cannot run are refused with the reason, and asking bf16 decoding of one is a ConfigError.
"""

import pytest
import torch
from omegaconf import OmegaConf
from tiny_llama import tiny_llama

from alignkit.config.schema import AlignkitConfig
from alignkit.errors import ConfigError
from alignkit.rl.generation import HFGenerationEngine, check_engine, decode_dtype_for, engine_for_run
from alignkit.rl.lean_decode import LeanDecoder, lean_decoder_for

torch.set_num_threads(1)

PAD, UNUSED_EOS = 0, 99
PROMPTS = [[5, 17, 33, 2], [8, 9], [40, 41, 42, 43, 44, 45, 46]]
QWEN_MISTRAL = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**QWEN_MISTRAL, use_sliding_window=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        for layer in model.model.layers:  # non-zero biases, so a dropped bias shows
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.eval()


def mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MistralForCausalLM(MistralConfig(**QWEN_MISTRAL, sliding_window=None)).eval()


MODELS = {
    "llama": lambda: tiny_llama().eval(),
    "llama_tied": lambda: tiny_llama(tie_word_embeddings=True, seed=1).eval(),
    "llama3_rope": lambda: tiny_llama(seed=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 16}).eval(),
    "mha": lambda: tiny_llama(seed=3, num_key_value_heads=4).eval(),
    "qwen2": qwen2,
    "mistral": mistral,
}


def reference_logits(model, sequence):
    with torch.no_grad():
        return model(input_ids=torch.tensor([sequence])).logits[0].float()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_steps_equal_transformers_forward(name):
    """Teacher-forced decoding: prefill (each prompt once, repeated x2) then 6 steps, a row dropped
    after step 3; each step's logits against a fresh forward of that row's unpadded sequence."""
    model = MODELS[name]()
    assert lean_decoder_for(model) == (True, "")
    decoder = LeanDecoder(model, pad_token_id=PAD, max_new_tokens=6, compute_dtype=torch.float32)
    rows = [p for p in PROMPTS for _ in range(2)]
    continuation = [[(7 * r + 3 * j) % 97 + 1 for j in range(6)] for r in range(len(rows))]
    live = list(range(len(rows)))
    with torch.no_grad():
        logits = decoder.prefill(PROMPTS, 2, torch.device("cpu"))
        for j in range(6):
            for k, row in enumerate(live):
                expected = reference_logits(model, rows[row] + continuation[row][:j])[-1]
                torch.testing.assert_close(logits[k], expected, atol=1e-5, rtol=1e-5)
            if j == 3:  # drop rows 1 and 4, as the engine does when they finish
                keep = torch.tensor([k for k, row in enumerate(live) if row not in (1, 4)])
                decoder.select(keep)
                live = [live[k] for k in keep.tolist()]
            if j < 5:
                logits = decoder.step(torch.tensor([continuation[row][j] for row in live]))


def test_fp32_engine_path_equals_transformers_with_eos():
    """The engine's loop with the lean decoder (forced to fp32 here) gives transformers' greedy tokens,
    rows stopping at EOS at different steps, and the same log-probs to 1e-5."""
    model = tiny_llama().eval()
    plain = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD)
    free = plain.generate(PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.0)
    eos = free[0].completion_ids[2]  # a token row 0 emits: it stops there, others later or never
    expected = HFGenerationEngine(model, eos_token_id=eos, pad_token_id=PAD).generate(
        PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.0)
    lean = HFGenerationEngine(model, eos_token_id=eos, pad_token_id=PAD)
    lean.decode_dtype = torch.float32  # the lean path in fp32: its arithmetic without the casts
    got = lean.generate(PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.0)
    assert [r.completion_ids for r in got] == [r.completion_ids for r in expected]
    assert len({len(r.completion_ids) for r in got}) > 1  # rows really stopped at different steps
    for a, b in zip(got, expected):
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) < 1e-5


def test_bf16_engine_close_to_transformers_under_autocast():
    """bf16 decoding vs transformers' forward under torch.autocast(bf16): log-probs of the same
    tokens within 0.05 (bf16 has 8 mantissa bits), and greedy tokens agree for most positions."""
    model = tiny_llama(hidden_size=64, intermediate_size=128).eval()
    engine = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD, decode_dtype=torch.bfloat16)
    assert engine.decoder.startswith("lean static-cache decoder, bf16")
    out = engine.generate(PROMPTS, num_samples=1, max_new_tokens=10, temperature=0.0)
    agree = total = 0
    for prompt, rollout in zip(PROMPTS, out):
        sequence = prompt + rollout.completion_ids
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
        logps = logits.log_softmax(-1)[len(prompt) - 1 : -1]
        ours = torch.tensor(rollout.logprobs)
        theirs = logps.gather(-1, torch.tensor(rollout.completion_ids)[:, None]).squeeze(-1)
        assert (ours - theirs).abs().max() < 0.05
        agree += int((logps.argmax(-1) == torch.tensor(rollout.completion_ids)).sum())
        total += len(rollout.completion_ids)
    assert agree / total >= 0.8
    # and it is not fp32 in disguise: its log-probs differ from the fp32 forward's somewhere
    fp32 = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD).generate(
        PROMPTS, num_samples=1, max_new_tokens=10, temperature=0.0)
    assert any(abs(x - y) > 1e-6 for a, b in zip(out, fp32) for x, y in zip(a.logprobs, b.logprobs))


def test_bf16_weight_copy_is_freed_and_weights_follow_updates():
    """Each call decodes with the weights as they are then (a changed parameter changes the output)."""
    model = tiny_llama().eval()
    engine = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD, decode_dtype=torch.bfloat16)
    before = engine.generate(PROMPTS, num_samples=1, max_new_tokens=4, temperature=0.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # flips every logit: greedy picks change
    after = engine.generate(PROMPTS, num_samples=1, max_new_tokens=4, temperature=0.0)
    assert [r.completion_ids for r in before] != [r.completion_ids for r in after]


def test_refused_models_say_why():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ok, why = lean_decoder_for(lora.base_model.model)
    assert not ok and "q_proj" in why
    ok, why = lean_decoder_for(mistral_with_window())
    assert not ok and "sliding" in why
    ok, why = lean_decoder_for(torch.nn.Linear(2, 2))
    assert not ok and "model type" in why
    with pytest.raises(ConfigError, match="decode_dtype=bf16.*q_proj"):
        HFGenerationEngine(lora.base_model.model, eos_token_id=UNUSED_EOS, pad_token_id=PAD,
                           decode_dtype=torch.bfloat16)
    # the default (weights' precision) needs no lean decoder and takes any model
    assert HFGenerationEngine(lora.base_model.model, eos_token_id=UNUSED_EOS, pad_token_id=PAD).decoder.startswith(
        "transformers forward")


def mistral_with_window():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**QWEN_MISTRAL, sliding_window=4))


def test_decode_dtype_choice():
    class Autocast:
        def __init__(self, on, dtype=torch.bfloat16):
            self.on, self.dtype = on, dtype

        def torch_autocast_enabled(self):
            return self.on

        def torch_autocast_dtype(self):
            return self.dtype

    assert decode_dtype_for("auto", Autocast(True)) is torch.bfloat16  # bf16_autocast runs sample in bf16
    assert decode_dtype_for("auto", Autocast(False)) is None
    assert decode_dtype_for("auto", Autocast(True, torch.float16)) is None
    assert decode_dtype_for("auto", object()) is None
    assert decode_dtype_for("fp32", Autocast(True)) is None
    assert decode_dtype_for("bf16", object()) is torch.bfloat16
    with pytest.raises(ConfigError, match="decode_dtype"):
        decode_dtype_for("int8", object())


def test_compose_time_checks():
    cfg = OmegaConf.structured(AlignkitConfig)
    assert cfg.generation.decode_dtype == "auto"
    cfg.generation.decode_dtype = "fp16"
    with pytest.raises(ConfigError, match="decode_dtype='fp16' is not valid"):
        check_engine(cfg)


def test_auto_falls_back_for_a_model_the_decoder_cannot_run_and_bf16_fails(capsys):
    """Under bf16 autocast ``auto`` asks bf16 decoding; for a LoRA policy it decodes with transformers
    instead and prints why; an explicit ``bf16`` fails with the reason."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).base_model.model

    class AutocastEngine(torch.nn.Module):  # what engine_for_run sees of a bf16_autocast DeepSpeed engine
        def __init__(self, model):  # .module is the TargetLogProbs-style wrapper, .module.model the LM
            super().__init__()
            self.module = torch.nn.Module()
            self.module.model = model

        def torch_autocast_enabled(self):
            return True

        def torch_autocast_dtype(self):
            return torch.bfloat16

    gen = OmegaConf.structured(AlignkitConfig).generation
    engine = engine_for_run(gen, AutocastEngine(lora), None, max_prompt_length=8, seed=0)
    assert engine.decode_dtype is None and engine.decoder.startswith("transformers forward")
    printed = " ".join(capsys.readouterr().err.split())
    assert "decode_dtype=auto: no bf16 lean decoder for layer 0 q_proj is not a plain Linear" in printed
    plain = engine_for_run(gen, AutocastEngine(tiny_llama().eval()), None, max_prompt_length=8, seed=0)
    assert plain.decode_dtype is torch.bfloat16
    gen.decode_dtype = "bf16"
    with pytest.raises(ConfigError, match="q_proj"):
        engine_for_run(gen, AutocastEngine(lora), None, max_prompt_length=8, seed=0)
