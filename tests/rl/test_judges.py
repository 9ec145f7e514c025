"""The judge interface (``alignkit/rl/judges.py``): each kind's values against a hand computation on the
tiny model, symmetry, the llm judge's order averaging, the config checks, and online DPO ranking its
samples with a pm_tiny checkpoint trained here (``judge.kind=pairwise``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alignkit.config.compose import compose
from alignkit.errors import ConfigError
from alignkit.rl import judges
from alignkit.run import train_from_overrides

torch.set_num_threads(1)
PROMPT = [{"role": "user", "content": "Leo is 58 years old. Eva is 30 years old. How old is Leo?"}]
RIGHT, WRONG, OTHER = "Leo is 58 years old. Answer: 58", "Answer: 30", "He is 58."


def _train(tmp_path: Path, name: str, *overrides: str) -> Path:
    assert train_from_overrides([*overrides, f"output_dir={tmp_path}", f"run_name={name}"]) == 0
    return tmp_path / name


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judge_models")
    return {"pm": _train(root, "pm", "recipe=pm_tiny", "trainer.max_steps=3") / "final",
            "rm": _train(root, "rm", "recipe=rm_tiny", "trainer.max_steps=1", "trainer.eval_every=0") / "final"}


def _judge_cfg(*overrides: str):
    return compose(["recipe=online_dpo_tiny", *overrides])


def _run(cfg):
    """``cfg``'s typed sections on a one-process Run (what build_judge and build_reward_mix take)."""
    from alignkit.trainers.common import typed_run

    return typed_run(cfg)


def _compare(judge, pairs, **columns):
    prompts = ["prompt text"] * len(pairs)
    return judge.compare(prompts, [a for a, _ in pairs], [b for _, b in pairs],
                         prompt=[PROMPT] * len(pairs), answer=["58"] * len(pairs), **columns)


def test_rule_judge_compares_the_rewards_and_ties_at_one_half():
    judge = judges.build_judge(_run(_judge_cfg("judge.kind=rule", "judge.fns=[accuracy]")))
    p = _compare(judge, [(RIGHT, WRONG), (WRONG, RIGHT), (RIGHT, OTHER), (WRONG, "Answer: 12")])
    assert p.tolist() == [1.0, 0.0, 0.5, 0.5]  # accuracy: RIGHT and OTHER both right, both wrong ones 0


def test_rule_judge_win_rates_pick_the_same_pairs_as_the_rewards():
    """judge.kind=rule over the run's reward functions picks exactly the default's best/worst pairs."""
    from alignkit.data.batch import TokenizedGroup
    from alignkit.models.load import load_tokenizer_for
    from alignkit.trainers.online_dpo import best_vs_worst
    from alignkit.trainers.rollout import SampledBatch, build_reward_mix

    cfg = _judge_cfg("judge.kind=rule", "reward.fns=[judge]")
    tokenizer = load_tokenizer_for(cfg.model)
    texts = [[RIGHT, WRONG, OTHER + " That is all I know about Leo and his age here.", "Answer: 12"],
             ["Answer: 12", "Answer: 30", "Answer: 1", "Answer: 2"], [WRONG, RIGHT, RIGHT, "Answer: 58."]]
    groups = [TokenizedGroup(prompt_ids=[1, 5, 6], completion_ids=[tokenizer.encode(t, add_special_tokens=False)
                                                                   for t in row],
                             completion_train_mask=[[True]] * 4, example_id=f"g{i}",
                             extra={"prompt": PROMPT, "answer": "58"}) for i, row in enumerate(texts)]
    groups = [replace(g, completion_train_mask=[[True] * len(ids) for ids in g.completion_ids]) for g in groups]
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for g in groups for ids in g.completion_ids]
    columns = {"prompt": [PROMPT] * 12, "answer": ["58"] * 12}
    rewards, _ = build_reward_mix(_run(cfg))(groups, ["p"] * 12, decoded, columns)
    sampled = SampledBatch(groups=groups, rewards=torch.tensor(rewards), reward_parts={},
                           finished=torch.ones(12, dtype=torch.bool), gen_seconds=0.0, gen_tokens=0)
    ranking = judges.win_rates(judges.build_judge(_run(cfg)), sampled, tokenizer)
    default, judged = best_vs_worst(sampled), best_vs_worst(sampled, ranking)
    assert [p.completion_ids for p in judged] == [p.completion_ids for p in default]
    assert len(default) == 2  # the second prompt's samples all score 0 (a tie): no pair either way
    rates = ranking.view(3, 4)
    assert torch.allclose(rates.sum(dim=1), torch.full((3,), 2.0))  # K/2: every comparison's P sums to 1


def test_reward_model_judge_is_the_sigmoid_of_the_score_difference(checkpoints):
    judge = judges.build_judge(_run(_judge_cfg("judge.kind=reward_model", f"judge.path={checkpoints['rm']}")))
    pairs = [(RIGHT, WRONG), (WRONG, RIGHT), (OTHER, OTHER)]
    p = _compare(judge, pairs)
    groups = judge.groups(["x"] * 3, [a for a, _ in pairs], [b for _, b in pairs], {"prompt": [PROMPT] * 3})
    with torch.no_grad():  # the head at each sequence's last token, one sequence at a time (no padding)
        for k, group in enumerate(groups):
            r = []
            for ids in group.completion_ids:
                seq = torch.tensor([group.prompt_ids + ids])
                r.append(float(judge.scorer.model(input_ids=seq).logits[0, 0]))
            assert p[k].item() == pytest.approx(torch.sigmoid(torch.tensor(r[0] - r[1])).item(), abs=1e-5)
    assert p[0].item() + p[1].item() == pytest.approx(1.0, abs=1e-6) and p[2].item() == pytest.approx(0.5)


def test_pairwise_judge_averages_both_orders_of_the_trained_pm(checkpoints):
    from transformers import AutoModelForSequenceClassification

    from alignkit.models.pair_input import marker_ids

    exported = AutoModelForSequenceClassification.from_pretrained(checkpoints["pm"])  # loads with transformers
    assert exported.config.num_labels == 1
    judge = judges.build_judge(_run(_judge_cfg("judge.kind=pairwise", f"judge.path={checkpoints['pm']}")))
    pairs = [(RIGHT, WRONG), (WRONG, RIGHT), (OTHER, OTHER)]
    p = _compare(judge, pairs)
    first, second = marker_ids(judge.tokenizer)
    group = judge.groups(["x"], [RIGHT], [WRONG], {"prompt": [PROMPT]})[0]
    a, b = group.completion_ids
    with torch.no_grad():
        logit = lambda x, y: float(exported(input_ids=torch.tensor([group.prompt_ids + first + x + second + y]))  # noqa: E731
                                   .logits[0, 0])
        s_ab, s_ba = logit(a, b), logit(b, a)
    sig = lambda v: 1.0 / (1.0 + torch.exp(-torch.tensor(v)).item())  # noqa: E731
    assert p[0].item() == pytest.approx((sig(s_ab) + 1.0 - sig(s_ba)) / 2.0, abs=1e-5)
    assert p[0].item() + p[1].item() == pytest.approx(1.0, abs=1e-6)  # antisymmetric by construction
    assert p[2].item() == pytest.approx(0.5, abs=1e-6)


def test_llm_judge_reads_a_vs_b_in_both_orders_and_averages():
    judge = judges.build_judge(_run(_judge_cfg("judge.kind=llm")))  # the run's (tiny) model, frozen
    pairs = [(RIGHT, WRONG), (WRONG, RIGHT), (OTHER, OTHER), ("Answer: 58", OTHER + " Or maybe not.")]
    p = _compare(judge, pairs)
    question = PROMPT[0]["content"]
    a_id, b_id = judge.answer_ids

    def q(first: str, second: str) -> float:  # one unpadded forward of the whole question
        ids = judge.prompt_ids(judge.template.format(prompt=question, a=first, b=second))
        with torch.no_grad():
            logits = judge.engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        return torch.softmax(logits[[a_id, b_id]], dim=-1)[0].item()

    for k, (a, b) in enumerate(pairs):
        assert p[k].item() == pytest.approx((q(a, b) + 1.0 - q(b, a)) / 2.0, abs=1e-5), k
    assert q(RIGHT, WRONG) != pytest.approx(1.0 - q(WRONG, RIGHT), abs=1e-6)  # the raw model has a position bias
    assert p[0].item() + p[1].item() == pytest.approx(1.0, abs=1e-6) and p[2].item() == pytest.approx(0.5)
    assert torch.equal(_compare(judge, pairs), p)  # deterministic: no sampling


@pytest.mark.parametrize("overrides, message", [
    (["judge.kind=oracle"], "judge.kind='oracle' is not valid. Valid choices: rule, reward_model, pairwise, llm"),
    (["judge.kind=pairwise"], "judge.kind=pairwise needs judge.path"),
    (["judge.kind=reward_model", "judge.path=/nonexistent"], "is not a model folder"),
    (["judge.kind=llm", "judge.prompt_template='Better: {a} or {b}?'"], "exactly the fields {prompt}, {a} and {b}"),
    (["judge.kind=rule", "judge.fns=[no_such_reward]"], "no_such_reward"),
    (["judge.path=/tmp"], "judge.kind is not"),
    (["judge.kind=llm", "judge.fns=[accuracy]"], "judge.fns is read by judge.kind=rule only"),
    (["judge.kind=llm", "judge.batch_size=0"], "judge.batch_size=0 must be positive"),
])
def test_bad_judge_settings_fail_at_compose_time(overrides, message):
    from alignkit.config.validate import validate

    with pytest.raises(ConfigError) as err:
        validate(_judge_cfg(*overrides))
    assert message in str(err.value)


def test_a_judge_path_of_the_wrong_model_class_is_refused(checkpoints):
    from alignkit.config.validate import validate

    with pytest.raises(ConfigError, match="judge.kind=llm needs a causal LM"):
        validate(_judge_cfg("judge.kind=llm", f"judge.path={checkpoints['pm']}"))
    validate(_judge_cfg("judge.kind=reward_model", f"judge.path={checkpoints['pm']}"))  # same class: accepted


def test_a_judge_on_another_runner_is_refused():
    from alignkit.config.validate import validate

    with pytest.raises(ConfigError, match="read by runner=online_dpo / xpo / nash_md / sppo only; this run's runner is grpo"):
        validate(compose(["recipe=grpo_tiny", "judge.kind=llm"]))


@pytest.mark.slow
def test_online_dpo_with_a_pairwise_judge_trains(tmp_path, checkpoints):
    run = _train(tmp_path, "oaif", "recipe=online_dpo_tiny", "judge.kind=pairwise", f"judge.path={checkpoints['pm']}",
                 "trainer.max_steps=2", "generation.max_new_tokens=8", "trainer.eval_every=0")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 2 and all(r["pairs"] > 0 and "loss" in r and "reward/mean" in r for r in train), train
    assert (run / "final").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("recipe, key", [("xpo_tiny", "judge/policy_wins"), ("nash_md_tiny", "preference")])
def test_xpo_and_nash_md_with_a_pairwise_judge_train(tmp_path, checkpoints, recipe, key):
    run = _train(tmp_path, recipe, f"recipe={recipe}", "judge.kind=pairwise", f"judge.path={checkpoints['pm']}",
                 "trainer.max_steps=2", "generation.max_new_tokens=8", "trainer.eval_every=0")
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    # a trained pm gives soft probabilities: not the 1 / 0.5 / 0 of ranking by rewards
    assert len(train) == 2 and all(0.0 < r[key] < 1.0 and r[key] not in (0.25, 0.5, 0.75) for r in train), train
    assert (run / "final").is_dir()
