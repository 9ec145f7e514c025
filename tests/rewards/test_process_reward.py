"""``ProcessReward``'s scoring layouts: consecutive completions of one prompt share one prefix-shared unit (the prompt
encoded once) and get the same step probabilities as scoring each alone; completions without steps score 0."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def scorer_and_tokenizer():
    from alignkit.models.config import ModelConfig
    from alignkit.models.load import load_reward_model

    torch.manual_seed(0)
    return load_reward_model(ModelConfig(name_or_path="tiny"), per_token=True, num_labels=2)


def _reward(scorer_and_tokenizer, layout, batch_size=8):
    from alignkit.data.config import DataConfig
    from alignkit.rewards.process import ProcessReward

    scorer, tokenizer = scorer_and_tokenizer
    return ProcessReward(scorer, tokenizer, DataConfig(), separator="\n", layout=layout, batch_size=batch_size)


P1 = [{"role": "user", "content": "Tom is 55 years old. Mia is 30 years old. How old is Tom?"}]
P2 = [{"role": "user", "content": "The red key opens door 4. Which door does the red key open?"}]
PROMPTS = [P1, P1, P1, P2, P2, P1, P2]
TEXTS = ["Tom is 55 years old.\nAnswer: 55", "Mia is 30 years old.\nAnswer: 30", "", "The red key opens door 4.",
         "Answer: 4\nAnswer: 4\nAnswer: 4", "Answer: 55", "\n\n"]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_prefix_shared_scores_equal_scoring_each_completion_alone(scorer_and_tokenizer, batch_size):
    shared = _reward(scorer_and_tokenizer, "prefix_shared", batch_size).step_probs(PROMPTS, TEXTS)
    alone = _reward(scorer_and_tokenizer, "padded").step_probs(PROMPTS, TEXTS)
    assert [len(p) for p in alone] == [2, 2, 0, 1, 3, 1, 0]  # steps per completion; no step -> []
    for a, b in zip(shared, alone):
        assert a == pytest.approx(b, abs=1e-5)
    # the steps' probabilities differ (a random head): a mix-up of completions would show
    assert len({round(p, 6) for probs in alone for p in probs}) > 3


def test_one_prompt_is_encoded_once_for_its_consecutive_completions(scorer_and_tokenizer, monkeypatch):
    reward = _reward(scorer_and_tokenizer, "prefix_shared")
    groups, members = reward.groups(PROMPTS, TEXTS)
    assert members == [[0, 1], [3, 4], [5]]  # "" and "\n\n" have no step; P1 again after P2 is a new group
    assert reward.empty == 2
    assert [g.group_size for g in groups] == [2, 2, 1]
    forwards = []
    inner = reward.scorer.forward
    monkeypatch.setattr(reward.scorer, "forward", lambda input_ids, **kw: forwards.append(input_ids.shape)
                        or inner(input_ids=input_ids, **kw))
    scores = reward(PROMPTS, TEXTS)
    assert scores[2] == 0.0 and scores[6] == 0.0 and len(forwards) == 1  # 5 completions <= batch_size 8
    # the prompt once per group: fewer tokens than the padded layout's prompt per completion
    shared = sum(len(g.prompt_ids) + sum(map(len, g.completion_ids)) for g in groups)
    padded, _ = _reward(scorer_and_tokenizer, "padded").groups(PROMPTS, TEXTS)
    assert shared == sum(len(g.prompt_ids) + sum(map(len, g.completion_ids)) for g in padded) \
        - len(groups[0].prompt_ids) - len(groups[1].prompt_ids)


def test_an_unknown_layout_is_refused(scorer_and_tokenizer):
    with pytest.raises(ValueError, match="prefix_shared, padded"):
        _reward(scorer_and_tokenizer, "packed")


def test_bf16_autocast_scores_under_autocast_and_close_to_fp32(scorer_and_tokenizer, monkeypatch):
    """deepspeed.dtype=bf16_autocast: the PRM's forward runs under torch.autocast(bf16) (as the policy's), the
    probabilities stay within bf16 rounding of fp32's; load_process_reward turns it on only for that dtype."""
    reward = _reward(scorer_and_tokenizer, "prefix_shared")
    fp32 = reward.step_probs(PROMPTS, TEXTS)
    reward.autocast = torch.bfloat16
    active = []
    inner = reward.scorer.forward
    monkeypatch.setattr(reward.scorer, "forward", lambda **kw: active.append(torch.is_autocast_enabled("cpu"))
                        or inner(**kw))
    bf16 = reward.step_probs(PROMPTS, TEXTS)
    assert active and all(active)
    for a, b in zip(bf16, fp32):
        assert a == pytest.approx(b, abs=0.02)
    assert any(x != y for a, b in zip(bf16, fp32) for x, y in zip(a, b))  # bf16 really ran

    from alignkit.models.config import ModelConfig
    from alignkit.rewards import process
    from alignkit.data.config import DataConfig
    from alignkit.engine.config import DeepSpeedConfig

    scorer, tokenizer = scorer_and_tokenizer
    monkeypatch.setattr("alignkit.models.load.load_reward_model", lambda *a, **k: (scorer, tokenizer))
    for dtype, expected in (("bf16_autocast", torch.bfloat16), ("fp32", None)):
        loaded = process.load_process_reward("some/prm", ModelConfig(name_or_path="tiny"), DataConfig(),
                                             DeepSpeedConfig(dtype=dtype))
        assert loaded.autocast == expected
