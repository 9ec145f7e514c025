"""SPPO (``runner=sppo``): win rates against pi_t, the trained samples, rounds with a refreshed reference,
compose-time checks, end to end on the tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.config.compose import compose
from alignkit.config.validate import validate
from alignkit.data.batch import TokenizedGroup
from alignkit.errors import ConfigError
from alignkit.rl import judges
from alignkit.run import train_from_overrides
from alignkit.trainers import sppo
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


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_reward_win_rates_are_the_mean_over_the_other_samples():
    rewards = [[0.3, 1.2, -0.4, 0.3], [2.0, 2.0]]
    win = sppo.reward_win_rates(_sampled(rewards))
    expected = [sum(_sigmoid(r[i] - r[j]) for j in range(len(r)) if j != i) / (len(r) - 1)
                for r in rewards for i in range(len(r))]
    assert win.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(win[:4].mean()) == pytest.approx(0.5)  # P(a > b) + P(b > a) = 1: a group's mean is 1/2
    with pytest.raises(ValueError, match="not finite"):
        sppo.reward_win_rates(_sampled([[0.1, float("nan")]]))


def test_rule_judge_win_rates_are_one_half_or_zero_per_comparison():
    """The rule judge's P(a > b) is 1, 1/2 (tie) or 0; a sample's win rate is its mean over the others."""
    class Scorer:
        def __call__(self, prompts, completions, **columns):
            return [float(c.count("x")) for c in completions], {}

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "x" * (ids[0] % 10)

    sampled = _sampled([[0, 0, 0], [0, 0, 0]])  # completion k of prompt p decodes to k x's (p*10 + k)
    sampled.groups[1].completion_ids[2] = [11, 7]  # prompt 1: one x, one x, none -> a tie at the top
    win = judges.win_rates(judges.RuleJudge(Scorer()), sampled, Tok())
    assert win.tolist() == pytest.approx([0.0, 0.5, 1.0, 0.25, 0.75, 0.5][:3] + [0.0, 0.75, 0.75])


def test_select_best_worst_and_all():
    sampled = _sampled([[0.0] * 4, [0.0] * 3, [0.0] * 2])
    win = torch.tensor([0.2, 0.7, 0.2, 0.9, 0.5, 0.5, 0.5, 0.6, 0.4])
    groups, targets = sppo.select(sampled, win, "best_worst")
    # prompt 0: best 3, worst the lowest index among the 0.2 ties (0); prompt 1 all tie: best 0, worst 1
    assert [g.completion_ids for g in groups] == [[[3, 7], [0, 7]], [[10, 7], [11, 7]], [[20, 7], [21, 7]]]
    assert targets.tolist() == pytest.approx([0.9, 0.2, 0.5, 0.5, 0.6, 0.4])
    assert [g.scores for g in groups] == [pytest.approx(t) for t in ([0.9, 0.2], [0.5, 0.5], [0.6, 0.4])]
    assert all(g.example_id.endswith("/sppo") for g in groups)
    groups, targets = sppo.select(sampled, win, "all")
    assert groups == sampled.groups and targets.tolist() == pytest.approx(win.tolist())
    metrics = sppo.win_rate_metrics(sppo.StepSamples(sampled, win, groups, targets))
    assert metrics == pytest.approx({"win_rate/best": (0.9 + 0.5 + 0.6) / 3, "win_rate/worst": (0.2 + 0.5 + 0.4) / 3,
                                     "ties": 1 / 3})


@pytest.mark.parametrize("extra", [[], ["rl.sppo_samples=all"], ["judge.kind=rule"]])
def test_sppo_tiny_trains_in_rounds_with_the_reference_moved_to_the_last_iterate(tmp_path, capsys, extra):
    """Two rounds of two steps: at each round start the policy is its own reference (kl exactly 0), one
    step later it has moved from it; the loss is the regression on the logged win rates."""
    assert train_from_overrides(["recipe=sppo_tiny", "generation.max_new_tokens=6", f"output_dir={tmp_path}",
                                 "run_name=run", *extra]) == 0
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["round"] for r in rows] == [1, 1, 2, 2]
    assert [r["kl"] for r in rows][::2] == [0.0, 0.0], rows  # steps 1 and 3: reference = policy
    assert all(abs(r["kl"]) > 1e-7 for r in rows[1::2]), rows
    for r in rows:
        assert math.isfinite(r["loss"]) and r["win_rate/worst"] <= r["win_rate"] <= r["win_rate/best"]
        assert {"reward/mean", "reward/judge", "ties", "sppo/residual", "gen_seconds"} <= r.keys()
        if extra == ["rl.sppo_samples=all"]:
            assert r["win_rate"] == pytest.approx(0.5, abs=1e-6)  # every sample: a group's win rates average 1/2
        if extra == ["judge.kind=rule"]:
            assert r["win_rate/best"] in (0.5, 2 / 3, 5 / 6, 1.0) or 0.5 <= r["win_rate/best"] <= 1.0
    assert _metrics(tmp_path / "run", "eval")
    err = " ".join(capsys.readouterr().err.split())
    assert "round at steps 1-2: reference = the current policy; 8 prompts x 4 samples judged" in err, err[-2000:]
    assert "round at steps 3-4" in err
    assert ("judge.kind=rule" if extra == ["judge.kind=rule"] else "sigmoid(r_a - r_b)") in err
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_lora_reference_is_the_saved_adapter_of_the_last_round(tmp_path):
    assert train_from_overrides(["recipe=sppo_tiny", "model.lora.r=4", "generation.max_new_tokens=6",
                                 "trainer.eval_every=0", "trainer.export=false", f"output_dir={tmp_path}",
                                 "run_name=run"]) == 0
    kl = [r["kl"] for r in _metrics(tmp_path / "run")]
    assert kl[0] == 0.0 and kl[2] == 0.0 and abs(kl[1]) > 1e-7 and abs(kl[3]) > 1e-7, kl


def test_training_raises_the_best_sample_over_the_worst(tmp_path, monkeypatch):
    """One round of 3 steps: the log-likelihood of each prompt's best sample (by the recorded win rates)
    rises more than that of its worst. A runner that swapped the targets' sign would fail this."""
    rounds = []
    real = sppo.sample_round

    def record(*args, **kwargs):
        rounds.append(real(*args, **kwargs))
        return rounds[-1]

    monkeypatch.setattr(sppo, "sample_round", record)
    assert train_from_overrides(["recipe=sppo_tiny", "rl.rounds=1", "trainer.max_steps=3", "trainer.eval_every=0",
                                 "generation.max_new_tokens=6", f"output_dir={tmp_path}", "run_name=run"]) == 0
    from transformers import AutoModelForCausalLM

    from alignkit.models.load import load_causal_lm

    start = load_causal_lm({"name_or_path": "tiny"})[0].eval()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    gains = {"best": [], "worst": []}
    for samples in rounds[0].steps.values():
        for group in samples.groups:
            for slot, reply in zip(("best", "worst"), group.completion_ids):
                gains[slot].append(_logp(final, group.prompt_ids, reply) - _logp(start, group.prompt_ids, reply))
    best, worst = (sum(v) / len(v) for v in (gains["best"], gains["worst"]))
    assert len(gains["best"]) == 12 and best > worst, (best, worst)


@torch.no_grad()
def _logp(model, prompt: list[int], reply: list[int]) -> float:
    ids = torch.tensor([prompt + reply])
    logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    return float(logps.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :].sum())


@pytest.mark.parametrize("overrides, message", [
    (["recipe=sppo_tiny", "loss=dpo"], "runner=sppo trains loss=sppo alone"),
    (["recipe=online_dpo_tiny", "loss=sppo"], "loss sppo is trained by runner=sppo only"),
    (["recipe=grpo_tiny", "rl.sppo_samples=all"], "read by runner=sppo only"),
    (["recipe=sppo_tiny", "rl.sppo_samples=some"], "rl.sppo_samples"),
    (["recipe=sppo_tiny", "rl.update_reference_each_round=false"], "last iterate"),
    (["recipe=sppo_tiny", "deepspeed=zero3"], "zero_stage=3"),
    (["recipe=sppo_tiny", "rl.num_generations=1"], "at least 2"),
    (["recipe=sppo_tiny", "generation.temperature=0"], "greedily"),
    (["recipe=sppo_tiny", "loss.beta=0"], "beta"),
    (["recipe=grpo_tiny", "judge.kind=rule"], "runner=online_dpo / xpo / nash_md / sppo only"),
])
def test_sppo_config_is_checked_at_compose_time(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_sppo_presets_compose():
    for recipe in ("sppo_tiny", "sppo_smollm2"):
        validate(compose([f"recipe={recipe}"]))
    cfg = compose(["recipe=sppo_smollm2"])
    assert cfg.judge.kind == "rule" and cfg.runner == "sppo" and cfg.rl.sppo_samples == "best_worst"


def test_stop_and_resume_at_a_round_boundary_is_exact_and_mid_round_starts_a_fresh_iteration(tmp_path, monkeypatch,
                                                                                             capsys):
    """Stopped after step 2 (the end of round 1, as by SIGTERM) and resumed: the same losses as an
    uninterrupted run. Stopped after step 1 (mid-round) and resumed: step 2 re-enters its round with the
    reference moved to the resumed policy (kl 0) and resamples it, as the module docstring says."""
    from alignkit.engine import faults
    from alignkit.trainers.common import Run

    common = ["recipe=sppo_tiny", "generation.max_new_tokens=6", "trainer.eval_every=0", f"output_dir={tmp_path}"]
    assert train_from_overrides([*common, "run_name=full"]) == 0
    real = Run.stop_requested
    for name, after in (("cut", 2), ("mid", 1)):
        calls = []

        def stop_after(self, calls=calls, after=after):
            calls.append(1)
            return len(calls) == after or real(self)

        monkeypatch.setattr(Run, "stop_requested", stop_after)
        monkeypatch.setattr(faults, "_LAST_SIGNAL", [])  # no real signal in this process: the stop reads as SIGTERM
        assert train_from_overrides([*common, f"run_name={name}"]) == 143
        assert [r["step"] for r in _metrics(tmp_path / name)] == list(range(1, after + 1))
        monkeypatch.setattr(Run, "stop_requested", real)
        capsys.readouterr()
        assert train_from_overrides([*common, f"run_name={name}", "resume=auto"]) == 0
        if name == "mid":
            assert "round at steps 2-2" in " ".join(capsys.readouterr().err.split())
    losses = lambda name: [r["loss"] for r in _metrics(tmp_path / name)]  # noqa: E731
    assert losses("cut") == pytest.approx(losses("full"), rel=1e-5)
    mid = _metrics(tmp_path / "mid")
    assert [r["step"] for r in mid] == [1, 2, 3, 4] and mid[1]["kl"] == 0.0 and mid[2]["kl"] == 0.0, mid
