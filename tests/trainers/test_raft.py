"""RAFT (``runner=raft``): best-of-K selection by reward, SFT on the winners in rounds, end to end on the tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.data.batch import TokenizedGroup
from alignkit.run import train_from_overrides
from alignkit.trainers import raft
from alignkit.trainers.rollout import SampledBatch


def _metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r.get("split", "train") == split]


def _sampled(rewards: list[list[float]]) -> SampledBatch:
    groups = [TokenizedGroup(prompt_ids=[1, 2], completion_ids=[[10 * p + k, 7] for k in range(len(r))],
                             completion_train_mask=[[True, True] for _ in r], example_id=f"p{p}")
              for p, r in enumerate(rewards)]
    flat = torch.tensor([x for r in rewards for x in r])
    return SampledBatch(groups, flat, {}, torch.zeros(len(flat), dtype=torch.bool), 1.0, 0)


def test_select_best_of_k_ties_threshold_and_counts():
    rewards = [[0.1, 0.9, 0.3, 0.2],  # plain best: index 1
               [0.5, 0.2, 0.5, 0.5],  # a tie at the top: the lowest index, 0
               [-1.0, -3.0, -0.5, -2.0],  # negative rewards: -0.5 at index 2
               [float("nan"), 0.4, float("nan"), 0.6],  # NaN never wins: index 3
               [float("nan")] * 4]  # nothing scored: dropped
    assert raft.select_best(rewards) == [1, 0, 2, 3, None]
    assert raft.select_best(rewards, min_reward=0.5) == [1, 0, None, 3, None]  # >= keeps 0.5
    assert raft.select_best(rewards, min_reward=0.6) == [1, None, None, 3, None]
    assert raft.select_best(rewards, min_reward=10.0) == [None] * 5

    sampled = _sampled(rewards)
    assert raft.group_rewards(sampled)[0] == pytest.approx(rewards[0])
    winners = raft.winner_groups(sampled, raft.select_best(raft.group_rewards(sampled), 0.5))
    # one K=1 group per kept prompt, the winning reply with its train mask, prompts in order
    assert [w.completion_ids for w in winners] == [[[1, 7]], [[10, 7]], [[33, 7]]]
    assert [w.example_id for w in winners] == ["p0/raft", "p1/raft", "p3/raft"]
    assert all(w.group_size == 1 and w.completion_train_mask == [[True, True]] for w in winners)


def test_rounds_cut_the_steps_nearly_evenly():
    assert raft.round_starts(60, 4) == [1, 16, 31, 46]
    assert raft.round_starts(10, 3) == [1, 4, 7]
    assert raft.round_starts(2, 5) == [1, 2]  # at most one round per step
    assert [raft.round_end([1, 4, 7], s, 10) for s in (1, 3, 4, 7, 10)] == [3, 3, 6, 10, 10]


def test_raft_tiny_trains_logs_and_exports(tmp_path, capsys):
    assert train_from_overrides(["recipe=raft_tiny", "generation.max_new_tokens=8", f"output_dir={tmp_path}",
                                 "run_name=run"]) == 0
    run_dir = tmp_path / "run"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["round"] for r in rows] == [1, 1, 2, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["kept_fraction"] == 1.0  # no threshold: every prompt keeps its best
        assert r["reward/std"] > 0 and {"reward/judge", "reward/reply_length", "logps/chosen"} <= r.keys()
        assert r["reward/winners"] > r["reward/mean"], r  # the best of 4 untied samples beats their mean
    assert _metrics(run_dir, "eval")
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines
    assert "round at steps 1-2: 8 of 8 prompts kept, 0 dropped" in err and "round at steps 3-4" in err, err[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    ids = AutoTokenizer.from_pretrained(run_dir / "final")("hi", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_threshold_drops_are_counted_and_said(tmp_path, capsys):
    """The tiny model never answers right: the judge pays 0, reply_length < 1, so no best reply reaches
    1.5. Every prompt is dropped, nothing is learnt (no loss logged), and the run says so."""
    assert train_from_overrides(["recipe=raft_tiny", "rl.raft_min_reward=1.5", "rl.rounds=1", "trainer.max_steps=2",
                                 "generation.max_new_tokens=4", "trainer.eval_every=0", "trainer.export=false",
                                 f"output_dir={tmp_path}", "run_name=run"]) == 0
    rows = _metrics(tmp_path / "run")
    assert [r["kept_fraction"] for r in rows] == [0.0, 0.0] and not any("loss" in r or "reward/winners" in r
                                                                       for r in rows), rows
    err = " ".join(capsys.readouterr().err.split())
    assert "0 of 8 prompts kept, 8 dropped (best reward below rl.raft_min_reward=1.5)" in err, err[-2000:]
    assert "kept no prompt this round" in err


def test_raft_config_is_checked_at_compose_time():
    from alignkit.config.compose import compose
    from alignkit.config.validate import validate
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match="runner=raft"):
        validate(compose(["recipe=raft_tiny", "loss=dpo"]))
    with pytest.raises(ConfigError, match="read by runner=raft only"):
        validate(compose(["recipe=grpo_tiny", "rl.raft_min_reward=1.0"]))
    with pytest.raises(ConfigError, match="finite"):
        validate(compose(["recipe=raft_tiny", "rl.raft_min_reward=nan"]))
    validate(compose(["recipe=raft_tiny", "rl.raft_min_reward=-2"]))


def test_training_on_the_winners_raises_their_likelihood_over_the_other_samples(tmp_path, monkeypatch):
    """One round of 3 SFT steps: the log-likelihood of the best reply of each prompt (recomputed here from
    the recorded rewards, not with the runner's selection) rises under training more than that of the
    prompt's other replies. A runner that trained on the worst or on a random reply would fail this."""
    rounds = []
    sample_round = raft.sample_round

    def record(*args, **kwargs):
        rounds.append(sample_round(*args, **kwargs))
        return rounds[-1]

    monkeypatch.setattr(raft, "sample_round", record)
    assert train_from_overrides(["recipe=raft_tiny", "rl.rounds=1", "trainer.max_steps=3", "trainer.eval_every=0",
                                 "generation.max_new_tokens=8", f"output_dir={tmp_path}", "run_name=run"]) == 0
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import load_causal_lm

    start = load_causal_lm({"name_or_path": "tiny"})[0].eval()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    (round_,) = rounds
    best_gain, other_gain = [], []
    for sampled in round_.sampled.values():
        for group, rewards in zip(sampled.groups, raft.group_rewards(sampled)):
            best = max(range(len(rewards)), key=lambda k: rewards[k])
            for k, reply in enumerate(group.completion_ids):
                gain = _logp(final, group.prompt_ids, reply) - _logp(start, group.prompt_ids, reply)
                (best_gain if k == best else other_gain).append(gain)
    best_mean, other_mean = sum(best_gain) / len(best_gain), sum(other_gain) / len(other_gain)
    assert len(best_gain) == 12 and best_mean > other_mean + 1.0, (best_mean, other_mean)


@torch.no_grad()
def _logp(model, prompt: list[int], reply: list[int]) -> float:
    ids = torch.tensor([prompt + reply])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return float(logps.gather(-1, targets[:, None])[len(prompt) - 1 :].sum())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_raft_two_processes(tmp_path, stage):
    """2 DeepSpeed processes, each sampling its own prompts: the run finishes, every step logs the kept
    fraction over both ranks, and the model is exported from the sharded engine."""
    from test_distributed_and_sweep import _cli

    proc = _cli("train", "-g", "2", "recipe=raft_tiny", f"deepspeed={stage}", "trainer.max_steps=2",
                "rl.rounds=2", "trainer.eval_every=0", "generation.max_new_tokens=6", f"output_dir={tmp_path}",
                "run_name=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["kept_fraction"] == 1.0 for r in rows), rows
    assert "round at steps 2-2: 4 of 4 prompts kept" in " ".join(proc.stderr.split())  # 2 prompts on each of 2 ranks
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
