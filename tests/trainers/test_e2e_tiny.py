"""Every runner end to end on the tiny model: a run directory with config, metrics, checkpoint and a
final model that transformers loads back."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.run import train_from_overrides


def _run(tmp_path: Path, *overrides: str) -> Path:
    code = train_from_overrides([*overrides, f"output_dir={tmp_path}", "run_name=run"])
    assert code == 0
    return tmp_path / "run"


def _metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split", "train") == split]


def test_sft_tiny_leaves_a_complete_run_dir(tmp_path):
    run_dir = _run(tmp_path, "recipe=sft_tiny", "trainer.max_steps=6", "trainer.eval_every=3")
    assert (run_dir / "config.yaml").is_file() and (run_dir / "overrides.txt").is_file()
    train = _metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]  # lr 1e-3 on a tiny model learns within 6 steps
    assert "tokens_per_s" in train[0]
    assert _metrics(run_dir, "eval")
    assert any((run_dir / "checkpoints").iterdir())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids).logits.shape[-1] == len(tokenizer)


@pytest.mark.parametrize("recipe", ["dpo_tiny", "ipo_tiny", "simpo_tiny", "orpo_tiny", "kto_tiny", "lipo_tiny", "tdpo_tiny"])
def test_preference_presets_train(tmp_path, recipe):
    run_dir = _run(tmp_path, f"recipe={recipe}", "trainer.max_steps=3", "trainer.export=false",
                   f"trainer.reference_cache_dir={tmp_path / 'ref'}")
    rows = _metrics(run_dir)
    assert len(rows) == 3
    keys = ("loss", "rewards/margin", "logps/chosen") + (() if recipe == "kto_tiny" else ("rewards/accuracy",))
    for key in keys:
        assert key in rows[0], rows[0].keys()
    evals = _metrics(run_dir, "eval")
    assert evals and "rewards/margin" in evals[-1]


@pytest.mark.parametrize("lora, strategy", [(False, "separate (auto"), (True, "lora")])
def test_tdpo_tiny_trains_against_a_live_reference_and_logs_the_kl(tmp_path, capsys, lora, strategy):
    """auto picks a live reference for the per-token KL and says so; at step 0 (policy == reference) the
    KL is 0 and the loss ln 2; then the policy moves and the KL grows."""
    extra = ["model.lora.r=4", "trainer.lr=0.01"] if lora else []
    run_dir = _run(tmp_path, "recipe=tdpo_tiny", "trainer.max_steps=3", "trainer.export=false", *extra)
    assert f"reference: {strategy}" in capsys.readouterr().err
    first = _metrics(run_dir, "eval")[0]
    assert first["step"] == 0 and first["loss"] == pytest.approx(math.log(2.0), abs=1e-5), first
    assert abs(first["kl/chosen"]) < 1e-5 and abs(first["kl/rejected"]) < 1e-5
    rows = _metrics(run_dir)
    assert len(rows) == 3 and rows[-1]["kl/chosen"] > 1e-4 and rows[-1]["kl/rejected"] > 1e-4, rows[-1]


def test_precomputed_reference_is_cached_and_reused(tmp_path):
    cache = tmp_path / "ref"
    for name in ("a", "b"):
        assert train_from_overrides(["recipe=dpo_tiny", "trainer.max_steps=1", "trainer.export=false",
                                     f"trainer.reference_cache_dir={cache}", f"output_dir={tmp_path}",
                                     f"run_name={name}"]) == 0
    assert len(list(cache.glob("ref-*.safetensors"))) == 1
    first = _metrics(tmp_path / "a")[0]["loss"]
    second = _metrics(tmp_path / "b")[0]["loss"]
    assert first == pytest.approx(second, rel=1e-6)


def test_separate_and_precomputed_reference_agree(tmp_path):
    losses = {}
    for strategy in ("separate", "precomputed"):
        train_from_overrides(["recipe=dpo_tiny", "trainer.max_steps=2", "trainer.export=false",
                              f"trainer.reference={strategy}", f"trainer.reference_cache_dir={tmp_path / 'ref'}",
                              f"output_dir={tmp_path}", f"run_name={strategy}"])
        losses[strategy] = [r["loss"] for r in _metrics(tmp_path / strategy)]
    assert losses["separate"] == pytest.approx(losses["precomputed"], abs=1e-5)


@pytest.mark.parametrize("recipe", ["grpo_tiny", "ppo_tiny", "online_dpo_tiny", "raft_tiny", "rm_tiny"])
def test_other_runners_train(tmp_path, recipe):
    run_dir = _run(tmp_path, f"recipe={recipe}", "trainer.max_steps=2", "generation.max_new_tokens=8")
    rows = _metrics(run_dir)
    assert len(rows) == 2 and all("loss" in r for r in rows)
    assert (run_dir / "final").is_dir()
    if recipe != "rm_tiny":  # a real learning signal: the samples' rewards differ (reply_length shaping)
        assert all(r["reward/std"] > 0 and "reward/reply_length" in r and "reward/judge" in r for r in rows), rows
    if recipe == "raft_tiny":
        assert all(r["kept_fraction"] == 1.0 and r["reward/winners"] > r["reward/mean"] for r in rows), rows
    if recipe == "online_dpo_tiny":
        assert all(r["pairs"] > 0 and "rewards/margin" in r for r in rows), rows
    if recipe == "grpo_tiny":
        assert all(r["frac_zero_std_groups"] < 1.0 for r in rows), rows  # some group has non-zero advantages
    if recipe == "ppo_tiny":
        check_exported_critic(run_dir)
        assert {"value_loss", "value/mean", "value/clip_fraction", "kl", "clip_fraction"} <= rows[0].keys()
        assert not any(key.startswith("value/value/") for key in rows[0])


def test_online_dpo_step_without_pairs_is_reported_not_silent(tmp_path, capsys):
    """Every sample of every prompt ties (a constant reward, as the demo judge alone gives a random
    model that never answers right): no pair, no update, no loss logged, and the step says so
    (metric pairs=0 and a printed line)."""
    rewards = tmp_path / "constant_reward.py"
    rewards.write_text("def zero(prompts, completions, **kwargs):\n    return [0.0 for _ in completions]\n")
    run_dir = _run(tmp_path, "recipe=online_dpo_tiny", f"reward.fns=[{rewards}:zero]",
                   "trainer.max_steps=2", "generation.max_new_tokens=4", "trainer.export=false", "trainer.eval_every=0")
    rows = _metrics(run_dir)
    assert [r["pairs"] for r in rows] == [0.0, 0.0] and not any("loss" in r for r in rows), rows
    assert all(r["reward/std"] == 0.0 for r in rows)
    out = capsys.readouterr().err  # the run's console is stderr
    assert "step 1: no pair" in out and "step 2: no pair" in out, out[-2000:]


def check_exported_critic(run_dir: Path) -> None:
    """PPO's trained critic is exported next to the actor and loads back as a value model."""
    from alignkit.models.value import load_value_model

    critic, tokenizer = load_value_model({"name_or_path": str(run_dir / "final_critic")})
    assert not any("lora" in name for name, _ in critic.named_parameters())
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.")])
    with torch.no_grad():
        values = critic(ids, torch.ones_like(ids))
    assert values.shape == ids.shape and torch.isfinite(values).all()
    assert critic.value_head.bias.item() != 0.0  # the trained head, not a fresh zero-bias one


def test_pm_tiny_trains_both_orders_and_exports_a_one_label_classifier(tmp_path, capsys):
    """The pairwise preference model: held-out accuracy and antisymmetry logged, ties counted (the demo
    pairs have none), and the export loads with transformers as a 1-label sequence classifier whose
    logit on the (prompt, a, b) sequence is what the pairwise judge reads."""
    from transformers import AutoModelForSequenceClassification

    run_dir = _run(tmp_path, "recipe=pm_tiny", "trainer.max_steps=4")
    train, held_out = _metrics(run_dir), _metrics(run_dir, "eval")
    assert len(train) == 4 and all("pm/antisymmetry" in r and "rewards/accuracy" in r for r in train)
    assert [r["step"] for r in held_out] == [0, 2, 4]
    assert all(0.0 <= r["rewards/accuracy"] <= 1.0 and 0.0 <= r["pm/antisymmetry"] < 1.0 for r in held_out)
    assert held_out[-1]["loss"] < held_out[0]["loss"], held_out  # it learns (lr 1e-3, 4 steps)
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "final")
    assert model.config.num_labels == 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 11, 4]])).logits
    assert logits.shape == (1, 1) and torch.isfinite(logits).all()


def test_two_runs_never_share_a_run_dir(tmp_path):
    from alignkit.errors import UserError

    _run(tmp_path, "recipe=sft_tiny", "trainer.max_steps=1", "trainer.export=false")
    with pytest.raises(UserError, match="already holds a run"):
        _run(tmp_path, "recipe=sft_tiny", "trainer.max_steps=1", "trainer.export=false")


def test_reward_model_run_serves_as_reward_source(tmp_path):
    rm_dir = _run(tmp_path, "recipe=rm_tiny", "trainer.max_steps=2")
    assert train_from_overrides(["recipe=grpo_tiny", "trainer.max_steps=1", "generation.max_new_tokens=6",
                                 f"reward.model={rm_dir / 'final'}", "reward.fns=[judge]", "trainer.export=false",
                                 f"output_dir={tmp_path}", "run_name=grpo"]) == 0
    row = _metrics(tmp_path / "grpo")[0]
    assert "reward/model" in row and "reward/judge" in row


RL_GEN = "generation.max_new_tokens=6"


@pytest.mark.parametrize("recipe, extra", [("dpo_tiny", ["trainer.reference=lora"]),
                                           ("grpo_tiny", ["loss.beta=0.1", RL_GEN]),
                                           ("sft_tiny", []),
                                           ("ppo_tiny", [RL_GEN]),
                                           ("online_dpo_tiny", [RL_GEN]),
                                           ("raft_tiny", [RL_GEN]),
                                           ("xpo_tiny", [RL_GEN]),
                                           ("nash_md_tiny", [RL_GEN]),
                                           ("rm_tiny", [])])
def test_lora_training_exports_a_merged_model(tmp_path, recipe, extra):
    """Only the adapters (and the reward head) train: in the merged export the weights LoRA does not
    target (embeddings, norms) equal the starting model's, the targeted ones moved, no 'lora' names.
    The reference is the adapter-disabled base: equal to the policy at step 1 (LoRA B starts at zero),
    apart from it at step 2 (a policy serving as its own reference would stay at 0)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.models.load import load_causal_lm, load_reward_model

    run_dir = _run(tmp_path, f"recipe={recipe}", "trainer.max_steps=2", "model.lora.r=4", *extra)
    rows = _metrics(run_dir)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    gap = {"dpo_tiny": "rewards/margin", "online_dpo_tiny": "rewards/margin", "grpo_tiny": "kl", "ppo_tiny": "kl",
           "xpo_tiny": "rewards/margin", "nash_md_tiny": "kl"}
    if recipe in gap:
        assert rows[0][gap[recipe]] == 0.0 and abs(rows[1][gap[recipe]]) > 1e-7, rows
    if recipe == "ppo_tiny":
        check_exported_critic(run_dir)  # LoRA critic merged on export
    reward = recipe == "rm_tiny"
    auto_class, loader = ((AutoModelForSequenceClassification, load_reward_model) if reward
                          else (AutoModelForCausalLM, load_causal_lm))
    exported = dict(auto_class.from_pretrained(run_dir / "final").named_parameters())
    assert not any("lora" in name for name in exported)
    start = dict(loader({"name_or_path": "tiny"})[0].named_parameters())
    assert exported.keys() == start.keys()
    for frozen in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(exported[frozen], start[frozen]), frozen
    trained = ["model.layers.0.self_attn.q_proj.weight"] + (["score.weight"] if reward else [])
    for name in trained:
        assert not torch.allclose(exported[name], start[name]), name


def test_dro_tiny_learns_a_fixed_batch_and_exports_policy_and_value(tmp_path):
    """DRO on one fixed batch (4 records, batch 4): the objective falls; the policy loads as a causal LM
    and the value network as a one-label token classifier whose value at the last prompt token is what
    the runner trained (its head moved off its zero bias)."""
    run_dir = _run(tmp_path, "recipe=dro_tiny", "data.max_records=4", "trainer.batch_size=4", "trainer.max_steps=8",
                   "trainer.eval_every=0", f"trainer.reference_cache_dir={tmp_path / 'ref'}")
    rows = _metrics(run_dir)
    assert len(rows) == 8
    assert {"loss", "dro/value", "dro/residual", "reward/mean", "rewards/mean"} <= rows[0].keys()
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert rows[0]["rewards/mean"] == pytest.approx(0.0, abs=1e-5)  # step 1: the policy is its own reference
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    policy = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    value = AutoModelForTokenClassification.from_pretrained(run_dir / "final_value")
    ids = torch.tensor([[1, 5, 7, 9]])
    assert policy(ids).logits.shape[-1] == policy.config.vocab_size
    values = value(ids).logits
    assert values.shape == (1, 4, 1) and torch.isfinite(values).all()
    assert value.score.bias.item() != 0.0
    assert any((run_dir / "checkpoints").iterdir())


def test_dro_refuses_data_without_rewards_before_any_model_loads(tmp_path, monkeypatch):
    import alignkit.models.load as load
    from alignkit.errors import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data error")

    monkeypatch.setattr(load, "load_causal_lm", no_model)
    with pytest.raises(ConfigError, match="sft data .* cannot feed a loss that consumes scalar data"):
        train_from_overrides(["recipe=dro_tiny", "data=demo_sft", f"output_dir={tmp_path}", "run_name=run"])


def test_dro_stop_and_resume_continues_policy_and_value_exactly(tmp_path, monkeypatch):
    """A DRO run stopped after step 2 (as by SIGTERM: checkpoint saved) and resumed ends with the same
    losses and the same policy and value weights as an uninterrupted run: both engines are checkpointed."""
    from safetensors.torch import load_file

    from alignkit.trainers.common import Run

    common = ["recipe=dro_tiny", "trainer.max_steps=4", "trainer.eval_every=0", f"output_dir={tmp_path}",
              f"trainer.reference_cache_dir={tmp_path / 'ref'}"]
    assert train_from_overrides([*common, "run_name=full"]) == 0
    calls = []
    real = Run.stop_requested

    def stop_after_two(self):
        calls.append(1)
        return len(calls) == 2 or real(self)

    monkeypatch.setattr(Run, "stop_requested", stop_after_two)
    from alignkit.engine import faults

    monkeypatch.setattr(faults, "_LAST_SIGNAL", [])  # no real signal in this process: the stop reads as SIGTERM
    # (a signal an earlier test delivered in the same process would otherwise set the code: 130 after a SIGINT)
    assert train_from_overrides([*common, "run_name=cut"]) == 143  # 128 + SIGTERM, as a signalled stop exits
    assert [r["step"] for r in _metrics(tmp_path / "cut")] == [1, 2] and not (tmp_path / "cut" / "final").exists()
    monkeypatch.setattr(Run, "stop_requested", real)
    assert train_from_overrides([*common, "run_name=cut", "resume=auto"]) == 0
    losses = lambda name: [r["loss"] for r in _metrics(tmp_path / name)]  # noqa: E731
    assert losses("cut") == pytest.approx(losses("full"), rel=1e-6)
    for folder in ("final", "final_value"):
        full, cut = (load_file(tmp_path / run / folder / "model.safetensors") for run in ("full", "cut"))
        assert full.keys() == cut.keys()
        for name in full:
            torch.testing.assert_close(cut[name], full[name], rtol=1e-6, atol=1e-7)
