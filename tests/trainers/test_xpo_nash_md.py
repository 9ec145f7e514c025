"""XPO (``runner=xpo``) and Nash-MD (``runner=nash_md``) end to end on the tiny model: their compose-time
rules, the pairing of policy and reference samples, and that training moves the policy the way the
preferences say."""

import json
from pathlib import Path

import pytest
import torch

from alignkit.config.compose import compose
from alignkit.config.validate import validate
from alignkit.data.batch import TokenizedGroup
from alignkit.errors import ConfigError
from alignkit.run import train_from_overrides
from alignkit.trainers import nash_md, rollout, xpo
from alignkit.trainers.rollout import SampledBatch

FAST = ["generation.max_new_tokens=8", "trainer.eval_every=0"]


def _metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r.get("split", "train") == split]


@pytest.mark.parametrize("overrides, match", [
    (["recipe=online_dpo_tiny", "loss=xpo"], "trained by runner=xpo only"),
    (["recipe=xpo_tiny", "runner=online_dpo"], "trained by runner=xpo only"),
    (["recipe=grpo_tiny", "loss=nash_md"], "trained by runner=nash_md only"),
    (["recipe=xpo_tiny", "loss=sft"], "runner=xpo trains a pairwise loss"),
    (["recipe=nash_md_tiny", "loss=grpo"], "runner=nash_md trains loss=nash_md alone"),
    (["recipe=xpo_tiny", "rl.num_generations=3"], "must be even"),
    (["recipe=nash_md_tiny", "rl.num_generations=1"], "must be even"),
    (["recipe=nash_md_tiny", "generation.engine=vllm"], "generation.engine=vllm"),
    (["recipe=xpo_tiny", "generation.engine=vllm"], "generation.engine=vllm"),
    (["recipe=xpo_tiny", "rl.rounds=2"], "no rounds"),
    (["recipe=nash_md_tiny", "rl.mixture_coef=1.5"], r"rl.mixture_coef=1.5 must lie in \[0, 1\]"),
    (["recipe=nash_md_tiny", "rl.preference=soft"], "rl.preference='soft' is not valid"),
    (["recipe=xpo_tiny", "rl.mixture_coef=0.2"], "read by runner=nash_md only"),
    (["recipe=online_dpo_tiny", "rl.preference=hard"], "read by runner=nash_md only"),
    (["recipe=nash_md_tiny", "generation.temperature=0"], "temperature=0"),
    (["recipe=xpo_tiny", "loss.loss_type=hinge"], "loss_type='hinge' is not valid; valid choices: sigmoid, ipo"),
    (["recipe=xpo_tiny", "loss.alpha=-1"], "alpha=-1"),
])
def test_bad_configs_fail_at_compose_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose(overrides))


def test_good_configs_compose():
    for overrides in (["recipe=xpo_tiny"], ["recipe=xpo_tiny", "loss.name=[xpo,sft]"], ["recipe=xpo_tiny", "loss=dpo"],
                      ["recipe=nash_md_tiny", "rl.mixture_coef=0", "loss.beta=0"], ["recipe=xpo_smollm2"],
                      ["recipe=nash_md_smollm2", "rl.preference=hard", "rl.mixture_coef=1"]):
        validate(compose(overrides))


def _sampled(rewards: list[list[float]], base: int) -> SampledBatch:
    groups = [TokenizedGroup(prompt_ids=[1, 2], completion_ids=[[base + 10 * p + k, 7] for k in range(len(r))],
                             completion_train_mask=[[True, True] for _ in r], example_id=f"p{p}")
              for p, r in enumerate(rewards)]
    flat = torch.tensor([x for r in rewards for x in r])
    return SampledBatch(groups, flat, {}, torch.zeros(len(flat), dtype=torch.bool), 1.0, 0)


def test_policy_vs_reference_pairs_the_j_th_samples_and_ties_go_to_the_policy():
    own = _sampled([[0.5, 0.1], [0.3, 0.3]], base=100)
    ref = _sampled([[0.2, 0.9], [0.3, 0.0]], base=200)
    pairs = xpo.policy_vs_reference(own, ref)
    assert [own_chosen for _, own_chosen in pairs] == [True, False, True, True]  # 0.3 vs 0.3: a tie, policy's
    assert [g.completion_ids for g, _ in pairs] == [[[100, 7], [200, 7]], [[201, 7], [101, 7]],
                                                   [[110, 7], [210, 7]], [[111, 7], [211, 7]]]
    assert [g.scores for g, _ in pairs] == [pytest.approx(s) for s in ([0.5, 0.2], [0.9, 0.1], [0.3, 0.3], [0.3, 0.0])]
    assert len({g.example_id for g, _ in pairs}) == 4
    assert xpo.reference_slots(pairs).tolist() == [[False, True], [True, False], [False, True], [False, True]]
    metrics = xpo.pair_metrics(own, ref, pairs)
    assert metrics["chosen_from_policy"] == 0.75 and metrics["ties"] == 0.25
    assert metrics["reward/reference"] == pytest.approx(0.35)


def test_a_judge_decides_xpo_pairs_instead_of_the_rewards():
    own = _sampled([[0.5, 0.1], [0.3, 0.3]], base=100)
    ref = _sampled([[0.2, 0.9], [0.3, 0.0]], base=200)
    wins = torch.tensor([0.2, 0.5, 0.9, 0.0])  # against the rewards on pairs 0 and 3; a judge's tie on pair 1
    pairs = xpo.policy_vs_reference(own, ref, wins)
    assert [own_chosen for _, own_chosen in pairs] == [False, True, True, False]
    assert [g.completion_ids for g, _ in pairs] == [[[200, 7], [100, 7]], [[101, 7], [201, 7]],
                                                   [[110, 7], [210, 7]], [[211, 7], [111, 7]]]
    metrics = xpo.pair_metrics(own, ref, pairs, wins)
    assert metrics["chosen_from_policy"] == 0.5 and metrics["ties"] == 0.25
    assert metrics["judge/policy_wins"] == pytest.approx(0.4)


class _Decode:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_pair_preference_compares_the_j_th_samples_of_each_prompt_with_their_columns():
    from alignkit.rl import judges

    own, other = _sampled([[1, 2], [3, 4]], base=100), _sampled([[0, 0], [0, 0]], base=200)
    for i, g in enumerate(own.groups):
        g.extra["answer"] = str(i)
    seen = {}

    class Judge:
        def compare(self, prompts, a, b, **columns):
            seen.update(prompts=prompts, a=a, b=b, **columns)
            return torch.tensor([0.0, 0.25, 0.5, 1.0])

    p = judges.pair_preference(Judge(), own, other, _Decode())
    assert p.tolist() == [0.0, 0.25, 0.5, 1.0]
    assert seen["a"] == ["100 7", "101 7", "110 7", "111 7"] and seen["b"] == ["200 7", "201 7", "210 7", "211 7"]
    assert seen["answer"] == ["0", "0", "1", "1"] and len(seen["prompts"]) == 4

    class Short:
        def compare(self, prompts, a, b, **columns):
            return torch.tensor([0.5])

    with pytest.raises(ValueError, match=r"judge returned \(1,\) values .* for 4 comparisons"):
        judges.pair_preference(Short(), own, other, _Decode())
    with pytest.raises(ValueError, match="same prompts"):
        judges.pair_preference(Judge(), own, _sampled([[0, 0]], base=200), _Decode())


def test_judge_settings_on_xpo_and_nash_md_compose_and_conflicts_fail():
    for recipe in ("xpo_tiny", "nash_md_tiny", "xpo_smollm2", "nash_md_smollm2"):
        validate(compose([f"recipe={recipe}", "judge.kind=rule", "judge.fns=[reply_length]"]))
    with pytest.raises(ConfigError, match="rl.preference=hard is not read with judge.kind=rule"):
        validate(compose(["recipe=nash_md_tiny", "judge.kind=rule", "rl.preference=hard"]))


@pytest.mark.parametrize("recipe, verdict", [("xpo_tiny", 0.0), ("nash_md_tiny", 1.0)])
def test_xpo_and_nash_md_train_on_the_judges_verdict(tmp_path, monkeypatch, recipe, verdict):
    """A judge that always says the reference's (xpo) / the policy's (nash_md) sample wins, whatever the
    rewards: every pair's chosen is the reference's, every preference is 1. A runner that kept ranking by the
    rewards fails."""
    from alignkit.rl import judges

    class Constant:
        def compare(self, prompts, a, b, **columns):
            return torch.full((len(prompts),), verdict)

    built = []
    monkeypatch.setattr(judges, "build_judge", lambda run, tokenizer=None: built.append(run.judge.kind) or Constant())
    assert train_from_overrides([f"recipe={recipe}", "trainer.max_steps=2", *FAST, "judge.kind=rule",
                                 f"output_dir={tmp_path}", "run_name=run"]) == 0
    rows = _metrics(tmp_path / "run")
    assert built == ["rule"] and len(rows) == 2
    if recipe == "xpo_tiny":
        assert all(r["chosen_from_policy"] == 0.0 and r["judge/policy_wins"] == 0.0 for r in rows), rows
    else:
        assert all(r["preference"] == 1.0 for r in rows), rows


@pytest.mark.parametrize("recipe", ["xpo_tiny", "nash_md_tiny"])
def test_a_rule_judge_runs_in_xpo_and_nash_md(tmp_path, recipe):
    assert train_from_overrides([f"recipe={recipe}", "trainer.max_steps=1", *FAST, "judge.kind=rule",
                                 "judge.fns=[reply_length]", f"output_dir={tmp_path}", "run_name=run"]) == 0
    (row,) = _metrics(tmp_path / "run")
    key = "judge/policy_wins" if recipe == "xpo_tiny" else "preference"
    assert 0.0 <= row[key] <= 1.0  # the mean of per-pair verdicts 1 / 0.5 / 0


@pytest.mark.parametrize("recipe", ["xpo_tiny", "nash_md_tiny"])
def test_tiny_presets_train_log_and_export(tmp_path, recipe):
    assert train_from_overrides([f"recipe={recipe}", "trainer.max_steps=2", "generation.max_new_tokens=8",
                                 f"output_dir={tmp_path}", "run_name=run"]) == 0
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all({"reward/judge", "reward/reply_length", "gen_seconds", "tokens_per_s"} <= r.keys() for r in rows)
    if recipe == "xpo_tiny":
        keys = {"loss/xpo", "loss/preference", "loss/exploration", "logps/reference_sample", "rewards/margin",
                "reward/reference", "chosen_from_policy", "ties"}
        assert all(keys <= r.keys() for r in rows), rows[0].keys()
        assert rows[0]["rewards/margin"] == 0.0  # step 1: the policy is the reference
        assert all(r["loss/exploration"] < 0 for r in rows)  # alpha * a (negative) log-prob
        # the reference samples are not the policy's (another seed): their rewards differ somewhere
        assert any(r["reward/reference"] != r["reward/mean"] for r in rows), rows
    else:
        assert all({"preference", "reward/mixture", "kl", "loss/score", "entropy"} <= r.keys() for r in rows)
        assert rows[0]["kl"] == 0.0 and rows[1]["kl"] != 0.0  # the KL to the reference opens after one step
        assert any(r["reward/mixture"] != r["reward/mean"] for r in rows), rows
    assert _metrics(tmp_path / "run", "eval") and (tmp_path / "run" / "final").is_dir()


def test_xpo_raises_the_chosen_samples_over_the_rejected(tmp_path, monkeypatch):
    """3 XPO steps: the log-likelihood of each recorded pair's chosen sample (the higher reward, from
    whichever sampler) rises more than its rejected sample's. A runner that swapped the slots fails."""
    recorded = []
    pair_up = xpo.policy_vs_reference
    monkeypatch.setattr(xpo, "policy_vs_reference", lambda *a: recorded.append(pair_up(*a)) or recorded[-1])
    assert train_from_overrides(["recipe=xpo_tiny", "trainer.max_steps=3", *FAST, "loss.beta=0.5",
                                 f"output_dir={tmp_path}", "run_name=run"]) == 0
    decided = [g for step in recorded for g, _ in step if g.scores[0] > g.scores[1]]  # ties left out
    chosen = _gains(tmp_path / "run", [(g.prompt_ids, g.completion_ids[0]) for g in decided])
    rejected = _gains(tmp_path / "run", [(g.prompt_ids, g.completion_ids[1]) for g in decided])
    assert len(chosen) >= 6 and _mean(chosen) > _mean(rejected) + 1.0, (_mean(chosen), _mean(rejected))


def test_nash_md_raises_the_samples_that_beat_the_mixture(tmp_path, monkeypatch):
    """3 Nash-MD steps with the hard preference: the policy samples that beat their mixture sample
    gain log-likelihood over those that lost. A runner with the advantage's sign flipped fails."""
    samples, verdicts = [], []
    sample_groups, prefer = rollout.sample_groups, nash_md.preference

    def record_samples(*args, **kwargs):
        out = sample_groups(*args, **kwargs)
        if not kwargs.get("greedy"):
            samples.append(out)
        return out

    monkeypatch.setattr(rollout, "sample_groups", record_samples)
    monkeypatch.setattr(nash_md, "preference", lambda a, b, kind: verdicts.append(prefer(a, b, kind)) or verdicts[-1])
    assert train_from_overrides(["recipe=nash_md_tiny", "trainer.max_steps=3", *FAST, "rl.preference=hard",
                                 f"output_dir={tmp_path}", "run_name=run"]) == 0
    own = samples[0::2]  # per step: the policy's samples, then the mixture's
    assert len(own) == len(verdicts) == 3
    won, lost = [], []
    for sampled, p in zip(own, verdicts):
        flat = [(g.prompt_ids, ids) for g in sampled.groups for ids in g.completion_ids]
        for (prompt, reply), verdict in zip(flat, p.tolist()):
            if verdict != 0.5:
                (won if verdict == 1.0 else lost).append((prompt, reply))
    gain_won, gain_lost = _gains(tmp_path / "run", won), _gains(tmp_path / "run", lost)
    assert len(gain_won) >= 2 and len(gain_lost) >= 2
    assert _mean(gain_won) > _mean(gain_lost) + 0.5, (_mean(gain_won), _mean(gain_lost))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _gains(run_dir: Path, replies: list[tuple[list[int], list[int]]]) -> list[float]:
    """Log-likelihood gain (final - start) of each (prompt, reply)."""
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import load_causal_lm

    start = load_causal_lm({"name_or_path": "tiny"})[0].eval()
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    return [_logp(final, prompt, reply) - _logp(start, prompt, reply) for prompt, reply in replies]


@torch.no_grad()
def _logp(model, prompt: list[int], reply: list[int]) -> float:
    ids = torch.tensor([prompt + reply])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    return float(logps.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :].sum())
