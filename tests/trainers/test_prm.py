"""The prm runner end to end on the tiny model: it learns the demo task's step labels, its export loads back
with transformers and scores as in training, bad data stops it before the model loads, and a GRPO run takes
the trained PRM as its reward (``reward.prm``), with the steps split, scored and aggregated."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.errors import ConfigError, DataError
from alignkit.rewards.process import aggregate
from alignkit.run import train_from_overrides

torch.set_num_threads(1)


def _metrics(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prm")
    demo = Path(__file__).parents[2] / "data" / "demo" / "stepwise_train.jsonl"
    # the same 4 demo replies every step and as the eval set: a fixed batch the loss must fall on
    assert train_from_overrides(["recipe=prm_tiny", "trainer.max_steps=6", "trainer.eval_every=3",
                                 "data.max_records=4", f"data.eval=[{{path: {demo}}}]",
                                 f"output_dir={root}", "run_name=prm"]) == 0
    return root / "prm"


def test_prm_tiny_learns_and_its_export_loads_back(prm_run):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    held_out = _metrics(prm_run, "eval")
    assert [r["step"] for r in held_out] == [0, 3, 6]
    assert held_out[-1]["loss"] < 0.5 * held_out[0]["loss"], held_out  # lr 1e-3, 6 steps on 4 replies
    assert all(0.0 <= r["prm/step_accuracy"] <= 1.0 and 0.0 <= r["prm/first_error_accuracy"] <= 1.0
               for r in held_out)
    train = _metrics(prm_run, "train")
    assert all(math.isfinite(r["loss"]) and "tokens_per_s" in r for r in train)

    final = prm_run / "final"
    assert json.loads((final / "alignkit_prm.json").read_text()) == {"step_separator": "\n"}
    model = AutoModelForTokenClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 2 and model.config.id2label == {0: "incorrect", 1: "correct"}
    tokenizer = AutoTokenizer.from_pretrained(final)

    # the exported model's own forward (dropout off in eval) gives the probabilities the reward reads
    from alignkit.models.load import load_reward_model
    from alignkit.models.config import ModelConfig
    from alignkit.rewards.process import ProcessReward

    prompt = [{"role": "user", "content": "Tom is 55 years old. Mia is 30 years old. How old is Tom? "}]
    steps = ["Tom is 55 years old.", "Answer: 55"]
    scorer, tok = load_reward_model(ModelConfig(name_or_path=str(final)), per_token=True, num_labels=2)
    reward = ProcessReward(scorer, tok, _data_cfg(), separator="\n")
    probs = reward.step_probs([prompt], ["\n".join(steps)])[0]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = []
    for step in steps:
        ids += tokenizer(step, add_special_tokens=False)["input_ids"] + tokenizer("\n", add_special_tokens=False)["input_ids"]
        ends.append(len(ids) - 1)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.softmax(logits[ends], -1)[:, 1].tolist()
    assert probs == pytest.approx(expected, abs=1e-5)
    assert reward([prompt], ["\n".join(steps)]) == pytest.approx([min(expected)], abs=1e-5)


def _data_cfg():
    from alignkit.data.config import DataConfig

    return DataConfig()


def test_aggregates():
    assert aggregate([0.9, 0.2, 0.7], "min") == pytest.approx(0.2)
    assert aggregate([0.9, 0.2, 0.7], "prod") == pytest.approx(0.9 * 0.2 * 0.7)
    assert aggregate([0.9, 0.2, 0.7], "last") == pytest.approx(0.7)
    assert aggregate([], "min") == 0.0
    with pytest.raises(ValueError, match="valid: min, prod, last"):
        aggregate([0.5], "mean")


def test_grpo_takes_the_trained_prm_as_its_reward(prm_run, tmp_path, monkeypatch):
    from alignkit.rewards import process

    seen = []
    real = process.ProcessReward.__call__

    def spy(self, prompts, completions):
        scores = real(self, prompts, completions)
        seen.append((list(completions), self.step_probs(prompts, completions), scores, self.how))
        return scores

    monkeypatch.setattr(process.ProcessReward, "__call__", spy)
    assert train_from_overrides(["recipe=grpo_tiny", "trainer.max_steps=1", "generation.max_new_tokens=6",
                                 f"reward.prm={prm_run / 'final'}", "reward.prm_aggregate=prod", "reward.fns=[judge]",
                                 "trainer.export=false", "trainer.eval_every=0", f"output_dir={tmp_path}",
                                 "run_name=grpo"]) == 0
    row = _metrics(tmp_path / "grpo", "train")[0]
    assert "reward/prm" in row and "reward/judge" in row
    completions, probs, scores, how = seen[0]
    assert how == "prod" and len(scores) == len(completions)
    for p, s in zip(probs, scores):
        assert s == pytest.approx(math.prod(p) if p else 0.0)
    assert row["reward/prm"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)


def test_bad_step_data_stops_before_the_model_loads(tmp_path, monkeypatch):
    import alignkit.models.load as load

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(load, "load_reward_model", no_model)
    bad = Path(__file__).parents[1] / "data" / "bad" / "step_labels_long.jsonl"
    with pytest.raises(DataError, match="labels: expected 1 label"):
        train_from_overrides(["recipe=prm_tiny", f"data.train=[{{path: {bad}}}]", "data.eval=[]",
                              f"output_dir={tmp_path}", "run_name=bad"])


def test_compose_time_rules(tmp_path):
    from alignkit.config.compose import compose
    from alignkit.config.validate import validate

    with pytest.raises(ConfigError, match="runner=prm trains a process reward model with loss=prm alone"):
        validate(compose(["recipe=prm_tiny", "loss=dpo"]))
    with pytest.raises(ConfigError, match="loss prm reads a process reward model's step logits"):
        validate(compose(["recipe=dpo_tiny", "loss=prm", "runner=preference"]))
    with pytest.raises(ConfigError, match="reward.prm_aggregate"):
        validate(compose(["recipe=grpo_tiny", "reward.prm_aggregate=mean"]))
    with pytest.raises(ConfigError, match="is not a model folder"):
        validate(compose(["recipe=grpo_tiny", f"reward.prm={tmp_path}"]))
    with pytest.raises(ConfigError, match="only the online runners"):
        validate(compose(["recipe=dpo_tiny", f"reward.prm={tmp_path}"]))
    with pytest.raises(ConfigError, match="data.train_on_last_step_only=true is read by runner=prm only"):
        validate(compose(["recipe=dpo_tiny", "data.train_on_last_step_only=true"]))


def test_train_on_last_step_only_trains_the_last_step(tmp_path, monkeypatch):
    from alignkit.trainers import prm

    sizes = []
    real = prm.last_steps

    def spy(inputs):
        kept = real(inputs)
        sizes.append((inputs.labels.numel(), kept.labels.numel(), int(torch.unique(inputs.solution).numel())))
        return kept

    monkeypatch.setattr(prm, "last_steps", spy)
    assert train_from_overrides(["recipe=prm_tiny", "trainer.max_steps=1", "data.train_on_last_step_only=true",
                                 "trainer.export=false", "trainer.eval_every=0", f"output_dir={tmp_path}",
                                 "run_name=last"]) == 0
    assert sizes and all(kept == solutions < steps for steps, kept, solutions in sizes)  # 2 steps per demo reply
