"""Reward functions users already have: TRL's keyword convention, verl's compute_score, the dry call,
errors that name the function, the built-in correctness reward on gsm8k's references."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest

from alignkit.errors import ConfigError, DataError
from alignkit.rewards import RewardFunctionError, RewardMix, reward_style, resolve_reward
from alignkit.rewards.math import correctness_reward

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                "altogether in April and May.\n#### 72")


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """A user's module of reward functions written for TRL and for verl, as those docs show them."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        import re

        def reward_len(completions, **kwargs):                      # TRL docs: standard format
            return [-abs(20 - len(completion)) for completion in completions]

        def think_format(completions, **kwargs):                    # TRL docs: conversational format
            pattern = r"^<think>.*?</think>"
            contents = [completion[0]["content"] for completion in completions]
            return [1.0 if re.match(pattern, c) else 0.0 for c in contents]

        def gsm8k_correct(completions, answer, **kwargs):           # the issue's gsm8k function
            gold = [a.split("####")[-1].strip() for a in answer]
            return [1.0 if g in c else 0.0 for c, g in zip(completions, gold)]

        def only_named(prompts, completions, answer):               # no **kwargs: only what it names
            return [float(len(p) > 0) for p in prompts]

        def seen(prompts, completions, completion_ids, **kwargs):
            seen.calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                               "kwargs": sorted(kwargs)})
            return [0.0] * len(completions)
        seen.calls = []

        def maybe(completions, **kwargs):                           # None = not applicable
            return [None if "skip" in c else 1.0 for c in completions]

        def never(completions, **kwargs):
            return [None] * len(completions)

        def needs_state(completions, trainer_state, **kwargs):
            return [float(trainer_state.global_step)] * len(completions)

        def needs_solution(completions, solution):
            return [0.0] * len(completions)

        def crashes_later(completions, **kwargs):
            return [1.0 / (len(c) - 5) for c in completions]       # ZeroDivisionError on a 5-character reply

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):   # verl custom reward
            compute_score.calls.append((data_source, solution_str, ground_truth, extra_info))
            return {"score": 1.0 if ground_truth in solution_str else 0.0, "acc": ground_truth in solution_str}
        compute_score.calls = []

        def gsm8k_compute_score(solution_str, ground_truth, method="strict", format_score=0.0, score=1.0):
            match = re.search("#### (\\\\-?[0-9\\\\.\\\\,]+)", solution_str)     # verl's gsm8k.py, strict
            if match is None:
                return 0.0
            return score if match.group(1).replace(",", "") == ground_truth else format_score

        def verl_bad_dict(data_source, solution_str, ground_truth, extra_info=None):
            return {"acc": 1.0}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def mix(user_rewards, *names, weights=None):
    return RewardMix([f"{user_rewards}:{n}" if n[0].islower() and ":" not in n and n not in
                      ("judge", "accuracy", "format", "concise", "correctness") else n for n in names], weights)


def test_styles(user_rewards):
    assert reward_style(resolve_reward("judge")) == "alignkit"
    assert reward_style(resolve_reward("correctness")) == "alignkit"
    assert reward_style(resolve_reward(f"{user_rewards}:reward_len")) == "trl"
    assert reward_style(resolve_reward(f"{user_rewards}:compute_score")) == "verl"
    assert reward_style(resolve_reward(f"{user_rewards}:gsm8k_compute_score")) == "verl"


def test_trl_standard_format_gets_strings(user_rewards):
    total, parts = mix(user_rewards, "reward_len")(["q", "q"], ["x" * 20, "x" * 25])
    assert total == [0.0, -5.0] and parts == {"reward_len": [0.0, -5.0]}


def test_trl_conversational_format_gets_message_lists(user_rewards):
    raw = [[{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"}]] * 2
    total, _ = mix(user_rewards, "think_format")(["rendered", "rendered"], ["<think>4</think> 4", "4"], prompt=raw)
    assert total == [1.0, 0.0]


def test_trl_gets_the_record_columns_by_keyword(user_rewards):
    total, _ = mix(user_rewards, "gsm8k_correct")(["q", "q"], ["so 72", "so 71"], answer=[GSM8K_ANSWER] * 2)
    assert total == [1.0, 0.0]


def test_trl_without_kwargs_gets_only_what_it_names(user_rewards):
    total, _ = mix(user_rewards, "only_named")(["q"], ["a"], answer=["1"], id=["row-7"], prompt=["raw q"])
    assert total == [1.0]


def test_trl_sees_raw_prompts_completion_ids_and_columns(user_rewards):
    import my_rewards

    mix(user_rewards, "seen")(["<|user|>q"], ["a"], prompt=["q"], answer=["1"], completion_ids=[[5, 6]])
    call = my_rewards.seen.calls[-1]
    assert call == {"prompts": ["q"], "completions": ["a"], "completion_ids": [[5, 6]], "kwargs": ["answer"]}
    mix(user_rewards, "seen")(["<|user|>q"], ["a"], completion_ids=[[5]])  # no raw prompt: the rendered text
    assert my_rewards.seen.calls[-1]["prompts"] == ["<|user|>q"]


def test_none_is_nan_and_skipped_in_the_sum(user_rewards):
    m = mix(user_rewards, "maybe", "reward_len", weights=[2.0, 1.0])
    total, parts = m(["q", "q"], ["x" * 20, "skip" + "x" * 16])
    assert parts["maybe"][0] == 1.0 and math.isnan(parts["maybe"][1])
    assert total == [2.0, 0.0]  # nansum: the None is skipped, reward_len still counts
    assert m.unscored == 0


def test_all_none_scores_zero_and_is_counted(user_rewards, capsys):
    m = mix(user_rewards, "never")
    total, parts = m(["q", "q"], ["a", "b"])
    assert total == [0.0, 0.0] and all(math.isnan(v) for v in parts["never"])
    assert m.unscored == 2 and "2 of 2 completions got None" in capsys.readouterr().err


def test_verl_compute_score_reads_a_verl_parquet_row(user_rewards):
    import my_rewards

    row = {"data_source": "openai/gsm8k", "ability": "math",
           "reward_model": {"style": "rule", "ground_truth": "72"},
           "extra_info": {"split": "train", "index": 0}}
    total, _ = mix(user_rewards, "compute_score")(["q", "q"], ["It is 72", "It is 7"],
                                                 **{k: [v, v] for k, v in row.items()})
    assert total == [1.0, 0.0]
    assert my_rewards.compute_score.calls[-2] == ("openai/gsm8k", "It is 72", "72", {"split": "train", "index": 0})


def test_verl_gsm8k_style_signature_and_fallback_ground_truth(user_rewards):
    # no data_source parameter; the ground truth read from gsm8k's own answer column when there is no reward_model
    total, _ = mix(user_rewards, "gsm8k_compute_score")(["q", "q"], ["... #### 72", "72"], answer=[GSM8K_ANSWER] * 2)
    assert total == [1.0, 0.0]


def test_verl_without_ground_truth_fails_naming_the_columns(user_rewards):
    with pytest.raises(RewardFunctionError) as info:
        mix(user_rewards, "compute_score").dry_run("q", {"question": "2+2?"})
    message = str(info.value)
    assert "compute_score" in message and "reward_model" in message and "question" in message


def test_verl_dict_without_score(user_rewards):
    with pytest.raises(RewardFunctionError, match="'score'"):
        mix(user_rewards, "verl_bad_dict")(["q"], ["a"], ground_truth=["1"])


def test_dry_run_rejects_what_alignkit_cannot_pass(user_rewards):
    with pytest.raises(RewardFunctionError) as info:
        mix(user_rewards, "needs_state").dry_run("q", {"answer": "1"})
    message = str(info.value)
    assert "needs_state" in message and "trainer_state" in message and "my_rewards.py:" in message
    assert "dry call" in message
    with pytest.raises(RewardFunctionError) as info:
        mix(user_rewards, "needs_solution").dry_run("q", {"answer": "1"})
    message = str(info.value)
    assert "'solution'" in message and "'answer'" in message  # what it needs, what it can be given


def test_dry_run_error_names_function_call_and_exception(user_rewards):
    with pytest.raises(RewardFunctionError) as info:
        mix(user_rewards, "gsm8k_correct").dry_run("q", {"question_id": 3})
    message = str(info.value)
    assert "gsm8k_correct" in message and "answer" in message


def test_error_mid_run_names_the_function_and_the_line(user_rewards):
    m = mix(user_rewards, "crashes_later")
    m.dry_run("q", {})  # 'The answer is 0.' is fine
    with pytest.raises(RewardFunctionError) as info:
        m(["q", "q"], ["long reply", "short"])
    message = str(info.value)
    assert "crashes_later" in message and "ZeroDivisionError" in message
    assert "my_rewards.py:" in message  # where it is defined and where it raised
    assert isinstance(info.value, ConfigError)  # a UserError: printed without a traceback


def test_builtins_keep_their_convention(user_rewards):
    from alignkit.rewards import register_reward

    @register_reward("test_text_only")
    def text_only(prompts, completions, **columns):
        return [1.0 if isinstance(p, str) and isinstance(c, str) else 0.0 for p, c in zip(prompts, completions)]

    messages = [[{"role": "user", "content": "q"}]]
    both = RewardMix(["test_text_only", f"{user_rewards}:think_format"])
    total, parts = both(["q"], ["<think>x</think>"], prompt=messages)
    assert parts == {"test_text_only": [1.0], "think_format": [1.0]}  # text for alignkit's, messages for TRL's


def test_a_builtins_data_error_passes_unchanged():
    with pytest.raises(DataError, match="answer"):
        RewardMix(["accuracy"]).dry_run("q", {"question": "2+2?"})


# ---------------------------------------------------------------- the built-in correctness reward


@pytest.mark.parametrize("reply, expected", [
    ("Natalia sold 24 clips in May, so 48 + 24 = 72 altogether.\n#### 72", 1.0),
    ("The answer is $\\boxed{72}$.", 1.0),
    ("Answer: 72", 1.0),
    ("48 + 24 = 72", 1.0),
    ("72 is too many; she sold 48 + 24 = 71", 0.0),
])
def test_correctness_reads_gsm8k_references(reply, expected):
    assert correctness_reward(["q"], [reply], answer=[GSM8K_ANSWER]) == [expected]


def test_correctness_reference_columns():
    assert correctness_reward(["q"], ["\\boxed{72}"], reward_model=[{"style": "rule", "ground_truth": "72"}]) == [1.0]
    assert correctness_reward(["q"], ["x = 1/2"], solution=["\\boxed{\\frac{1}{2}}"]) == [1.0]
    with pytest.raises(DataError, match="question"):
        correctness_reward(["q"], ["72"], question=["how many?"])


def test_correctness_without_math_verify_says_so_once(monkeypatch, capsys):
    from alignkit.rewards import answer, math as correctness

    monkeypatch.setattr(answer, "MATH_VERIFY_AVAILABLE", False)
    monkeypatch.setattr(correctness, "_WARNED", False)
    assert correctness_reward(["q", "q"], ["Answer: 72", "\\boxed{\\sqrt{2}/2}"],
                              answer=["72", "\\frac{\\sqrt{2}}{2}"]) == [1.0, 0.0]
    correctness_reward(["q"], ["72"], answer=["72"])
    assert capsys.readouterr().err.count("math-verify is not installed") == 1


# ---------------------------------------------------------------- wired into a run


def _gsm8k_prompts(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Natalia sold {n} clips. How many?"}], "answer": f"so\n#### {n}"}
            for n in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_bad_function_fails_before_any_model_loads(tmp_path, user_rewards, monkeypatch):
    import alignkit.models.load as load

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the reward functions were checked")

    monkeypatch.setattr(load, "load_causal_lm", no_model)
    from alignkit.run import train_from_overrides

    path = _gsm8k_prompts(tmp_path)
    with pytest.raises(RewardFunctionError) as info:
        train_from_overrides(["recipe=grpo_tiny", f"data.train=[{{path:{path}}}]", "data.eval=[]",
                              f"reward.fns=[{user_rewards}:needs_solution]", f"output_dir={tmp_path}", "run_name=r"])
    assert "needs_solution" in str(info.value) and "'solution'" in str(info.value)


def test_grpo_trains_with_a_trl_function_on_conversational_gsm8k(tmp_path, user_rewards):
    from alignkit.run import train_from_overrides

    import my_rewards

    path = _gsm8k_prompts(tmp_path)
    code = train_from_overrides(["recipe=grpo_tiny", f"data.train=[{{path:{path}}}]", "data.eval=[]",
                                 f"reward.fns=[{user_rewards}:seen,correctness]", "trainer.max_steps=1",
                                 "generation.max_new_tokens=4", "trainer.export=false",
                                 f"output_dir={tmp_path}", "run_name=r"])
    assert code == 0
    call = my_rewards.seen.calls[-1]  # a training step's call, after the dry call
    assert isinstance(call["prompts"][0], list) and call["prompts"][0][0]["content"].startswith("Natalia")
    assert isinstance(call["completions"][0], list) and call["completions"][0][0]["role"] == "assistant"
    assert len(call["completion_ids"]) == len(call["completions"]) and "answer" in call["kwargs"]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/correctness" in rows[0] and "reward/seen" in rows[0]


def test_grpo_trains_with_verl_compute_score_on_verl_parquet(tmp_path, user_rewards):
    """verl's gsm8k preprocessing layout: data_source, prompt messages, ability, reward_model, extra_info."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import my_rewards

    from alignkit.run import train_from_overrides

    rows = [{"data_source": "openai/gsm8k",
             "prompt": [{"role": "user", "content": f"Tom has {n} apples. Let's think step by step and output the "
                         "final answer after \"####\"."}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(n)},
             "extra_info": {"split": "train", "index": n, "answer": f"so\n#### {n}", "question": f"Tom has {n}"}}
            for n in range(6)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    my_rewards.compute_score.calls.clear()
    code = train_from_overrides(["recipe=grpo_tiny", f"data.train=[{{path:{path}}}]", "data.eval=[]",
                                 f"reward.fns=[{user_rewards}:compute_score]", "trainer.max_steps=1",
                                 "generation.max_new_tokens=4", "trainer.export=false",
                                 f"output_dir={tmp_path}", "run_name=r"])
    assert code == 0
    data_source, solution, truth, extra = my_rewards.compute_score.calls[-1]
    assert data_source == "openai/gsm8k" and truth in {str(n) for n in range(6)}
    assert isinstance(solution, str) and extra["split"] == "train" and "index" in extra


def test_a_python_file_and_a_module_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards.py").write_text("def short(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file_rewards.py").write_text("def compute_score(solution_str, ground_truth):\n"
                                                       "    return float(solution_str == ground_truth)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert RewardMix(["cwd_rewards:short"])(["q"], ["a"]).total == [1.0]
        mix = RewardMix([f"{tmp_path / 'sub' / 'file_rewards.py'}:compute_score"])
        assert mix.names == ["compute_score"]
        assert mix(["q", "q"], ["7", "8"], ground_truth=["7", "7"]).total == [1.0, 0.0]
        with pytest.raises(ConfigError, match="no such file"):
            RewardMix(["sub/nope.py:fn"])
    finally:
        sys.modules.pop("cwd_rewards", None)


def test_reward_file_path_through_compose(tmp_path):
    from alignkit.config.compose import compose

    path = tmp_path / "r.py"
    path.write_text("def f(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    cfg = compose(["recipe=grpo_tiny", f"reward.fns=['{path}:f']"])
    assert list(cfg.reward.fns) == [f"{path}:f"]


def test_a_function_failing_mid_run_stops_it_with_its_name_and_no_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "flaky_rewards.py").write_text(
        "calls = []\n"
        "def flaky(completions, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:  # the dry call passes; the first training step's call fails\n"
        "        raise KeyError('score_me')\n"
        "    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _gsm8k_prompts(tmp_path)
    from alignkit import cli

    monkeypatch.setattr(sys, "argv", ["alignkit", "train", "recipe=grpo_tiny", f"data.train=[{{path:{path}}}]",
                                      "data.eval=[]", "reward.fns=[flaky_rewards:flaky]", "trainer.max_steps=1",
                                      "generation.max_new_tokens=4", "trainer.export=false",
                                      f"output_dir={tmp_path}", "run_name=r"])
    monkeypatch.delenv("ALIGNKIT_DEBUG", raising=False)
    try:
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "reward function 'flaky'" in err and "KeyError" in err and "flaky_rewards.py:" in err
        assert "Traceback" not in err and "dry call" not in err
    finally:
        sys.modules.pop("flaky_rewards", None)
