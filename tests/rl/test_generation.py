"""HFGenerationEngine on a tiny random Llama: agreement with transformers' generate, seeding, EOS,
log-probs against a fresh forward pass, shared vs per-sample prefill."""

import pytest
import torch
from omegaconf import OmegaConf
from tiny_llama import tiny_llama

from alignkit.config.schema import AlignkitConfig
from alignkit.errors import ConfigError
from alignkit.rl.generation import HFGenerationEngine, check_engine, engine_for_run, sample_next_token

torch.set_num_threads(1)

UNUSED_EOS = (
    99  # an id the random model practically never picks greedily in these tests; tests that need EOS pick one
)
PAD = 0
PROMPTS = [[5, 17, 33, 2], [8, 9], [40, 41, 42, 43, 44, 45, 46], [12]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(eos_token_id=UNUSED_EOS, pad_token_id=PAD, bos_token_id=1).eval()


def hf_greedy(model, prompts, max_new_tokens, eos):
    """transformers' own greedy decoding, one prompt at a time (no padding involved), cut after EOS."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=PAD,
        )[0, len(p) :].tolist()
        out.append(gen[: gen.index(eos) + 1] if eos in gen else gen)
    return out


def test_greedy_equals_transformers_generate(model):
    engine = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD)
    rollouts = engine.generate(PROMPTS, num_samples=1, max_new_tokens=12, temperature=0.0)
    assert [r.completion_ids for r in rollouts] == hf_greedy(model, PROMPTS, 12, UNUSED_EOS)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, 0) for i in range(len(PROMPTS))]


def test_eos_stops_each_sequence(model):
    free = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD).generate(
        PROMPTS, max_new_tokens=10, temperature=0.0
    )
    assert all(not r.finished and len(r.completion_ids) == 10 for r in free)
    eos = free[0].completion_ids[3]  # make the 4th greedy token of prompt 0 the EOS
    stopped = HFGenerationEngine(model, eos_token_id=eos, pad_token_id=PAD).generate(
        PROMPTS, max_new_tokens=10, temperature=0.0
    )
    assert (
        stopped[0].finished
        and stopped[0].completion_ids == free[0].completion_ids[: free[0].completion_ids.index(eos) + 1]
    )
    for before, after in zip(free, stopped):
        if eos in before.completion_ids:
            cut = before.completion_ids.index(eos) + 1
            assert after.finished and after.completion_ids == before.completion_ids[:cut]
        else:
            assert not after.finished and after.completion_ids == before.completion_ids
    assert stopped == HFGenerationEngine(model, eos_token_id=[UNUSED_EOS, eos], pad_token_id=PAD).generate(
        PROMPTS, max_new_tokens=10, temperature=0.0
    )
    assert [r.completion_ids for r in stopped] == hf_greedy(model, PROMPTS, 10, eos)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    engine = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD)
    kwargs = {"num_samples": 3, "max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 20}
    a = engine.generate(PROMPTS, seed=123, **kwargs)
    b = engine.generate(PROMPTS, seed=123, **kwargs)
    c = engine.generate(PROMPTS, seed=124, **kwargs)
    assert a == b
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    assert len({tuple(r.completion_ids) for r in a if r.prompt_index == 0}) > 1  # samples of a group differ


def fresh_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_policy_logprobs_of_a_fresh_forward(model, temperature):
    rollouts = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD).generate(
        PROMPTS, num_samples=2, max_new_tokens=6, temperature=temperature, top_k=10, seed=0
    )
    for r in rollouts:
        want = fresh_logprobs(model, PROMPTS[r.prompt_index], r.completion_ids)
        # temperature 1, untruncated log-probs, whatever the sampling settings; observed max difference 5e-7 (fp32, CPU)
        torch.testing.assert_close(torch.tensor(r.logprobs), want, atol=1e-4, rtol=0)


def test_shared_prefill_equals_per_sample_prefill(model):
    kwargs = {"num_samples": 3, "max_new_tokens": 8, "temperature": 0.0}
    shared = HFGenerationEngine(model, eos_token_id=UNUSED_EOS, pad_token_id=PAD).generate(PROMPTS, **kwargs)
    separate = HFGenerationEngine(
        model, eos_token_id=UNUSED_EOS, pad_token_id=PAD, share_prompt_prefill=False
    ).generate(PROMPTS, **kwargs)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in separate]
    for a, b in zip(shared, separate):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # and the samples of one prompt in greedy mode are identical
    assert shared[0].completion_ids == shared[1].completion_ids == shared[2].completion_ids


def test_training_mode_is_restored_and_no_grad_is_recorded(model):
    model.train()
    try:
        HFGenerationEngine(model, eos_token_id=UNUSED_EOS).generate(
            [[3, 4]], max_new_tokens=2, temperature=0.0
        )
        assert model.training
    finally:
        model.eval()


def test_peft_model_generates_like_its_base(model):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4)
    )
    try:
        got = HFGenerationEngine(wrapped, eos_token_id=UNUSED_EOS, pad_token_id=PAD).generate(
            PROMPTS, max_new_tokens=5, temperature=0.0
        )
        # LoRA B starts at zero, so the adapted model equals the base
        assert [r.completion_ids for r in got] == hf_greedy(model, PROMPTS, 5, UNUSED_EOS)
    finally:
        wrapped.unload()


def test_top_k_and_top_p_truncate():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample_next_token(logits, generator=gen, **kw).item() for _ in range(300)}  # noqa: E731
    assert draws(temperature=1.0, top_k=2, top_p=1.0) == {0, 1}
    assert draws(temperature=1.0, top_k=0, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draws(temperature=1.0, top_k=0, top_p=0.5) == {0}
    assert draws(temperature=0.0, top_k=0, top_p=1.0) == {0}


def test_settings_are_validated(model):
    engine = HFGenerationEngine(model, eos_token_id=UNUSED_EOS)
    with pytest.raises(ConfigError, match="top_p"):
        engine.generate(PROMPTS, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ConfigError, match="Valid choices: hf, vllm"):
        check_engine(OmegaConf.create({"generation": {"engine": "sglang"}, "launcher": {"nnodes": 1}}))
    cfg = OmegaConf.structured(AlignkitConfig)  # the one GenerationConfig: the schema's
    assert isinstance(engine_for_run(cfg.generation, model, None, max_prompt_length=8, seed=0), HFGenerationEngine)
