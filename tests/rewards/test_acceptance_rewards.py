"""Issue 15's acceptance pass on reward functions and `alignkit eval`: what a new user hit, each checked to
fail before its fix. The gsm8k rows are tests/data/published/gsm8k.jsonl (openai/gsm8k main)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from alignkit import evaluate
from alignkit.errors import DataError
from alignkit.rewards import RewardFunctionError, RewardMix

GSM8K = Path(__file__).parents[1] / "data" / "published" / "gsm8k.jsonl"


def test_a_trl_function_failing_later_is_shown_the_prompt_it_got(tmp_path, monkeypatch):
    """TRL passes standard-format prompts as the dataset's strings; the error must show that string, not the
    chat-templated text decoded from the prompt's tokens ('user\\nNatalia ...')."""
    (tmp_path / "late_rewards.py").write_text(textwrap.dedent('''
        calls = []
        def third_call_fails(completions, answer, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom on call 3")
            return [0.0] * len(completions)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    mix = RewardMix([f"{tmp_path / 'late_rewards.py'}:third_call_fails"])
    for _ in range(2):
        mix(["user\nNatalia sold clips"], ["#### 72"], prompt=["Natalia sold clips"], answer=["#### 72"])
    with pytest.raises(RewardFunctionError) as info:
        mix(["user\nNatalia sold clips"], ["#### 72"], prompt=["Natalia sold clips"], answer=["#### 72"])
    message = str(info.value)
    assert "third_call_fails" in message and "boom on call 3" in message and "late_rewards.py:" in message
    assert "prompts=['Natalia sold clips']" in message, message


# ---------------------------------------------------------------- alignkit eval MODEL data=...


def _no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was read")

    monkeypatch.setattr(evaluate.command, "_load", refuse)  # where run_eval looks it up


def test_eval_reads_the_data_before_any_model_loads(monkeypatch, tmp_path):
    """gsm8k rows without the column map are a data problem; it is reported before a model is loaded."""
    _no_model(monkeypatch)
    with pytest.raises(DataError) as info:
        evaluate.run_eval("tiny", [f"data={GSM8K}"], baseline=None, limit=0, out_dir=str(tmp_path))
    assert "column_map {prompt: question}" in str(info.value)


def test_eval_model_takes_a_source_entry_with_its_column_map(tmp_path):
    """`data=[{path: F, column_map: {..}}]` (Hydra's grammar, as for a run directory) on a model, not a glob;
    the default config's demo judge is not scored on the user's file: answer accuracy, with N and a Wilson
    interval, is."""
    result = evaluate.run_eval("tiny", [f"data=[{{path: {GSM8K}, column_map: {{prompt: question}}}}]",
                                        "generation.max_new_tokens=4"], baseline=None, limit=0, out_dir=str(tmp_path))
    accuracy = result["intervals"]["answer_accuracy"]
    assert accuracy.n == 2
    assert 0.0 <= accuracy.ci_low <= accuracy.rate <= accuracy.ci_high <= 1.0 and accuracy.ci_high > 0.5
    assert not any(name.startswith("reward/") for name in result["intervals"]), sorted(result["intervals"])
    assert any("demo task" in note for note in result["notes"]), result["notes"]
    lines = evaluate.format_table(result)
    assert any(line.startswith("answer_accuracy") and line.rstrip().endswith("2") for line in lines), lines


def test_eval_note_for_a_left_out_reward_is_not_cut_mid_word():
    exc = DataError("answer: the demo judge needs each prompt record's reference answer in an 'answer' column "
                    "(extra columns received: none). Use the demo prompts files (data/demo/prompts_train.jsonl, "
                    "...) or pass reward.fns=[...]")
    text = evaluate.scoring._first_sentence(exc)
    assert text.endswith("(extra columns received: none)"), text


# ---------------------------------------------------------------- OpenRLHF PPO prompts: --input_key question --label_key answer


def test_openrlhf_label_key_is_the_reference_of_correctness_and_verl(tmp_path):
    """OpenRLHF's PPO data names the reference with --label_key (passed to its reward functions as labels);
    under data.columns=openrlhf that column arrives as 'label', which the built-in correctness and verl's
    ground_truth must read."""
    from alignkit.data.pipeline import read_records
    from alignkit.rewards.math import correctness_reward
    from alignkit.rewards.registry import _ground_truth

    path = tmp_path / "ppo_prompts.jsonl"
    path.write_text('{"question": "Natalia sold 48 clips in April and half as many in May. How many?", '
                    '"answer": "72"}\n')
    (record,), errors = read_records(str(path), "auto", "openrlhf", {"input_key": "question", "label_key": "answer"})
    assert errors == [] and record.format == "prompt"
    columns = {k: [v] for k, v in record.extra.items()}
    assert correctness_reward(["q"], ["48 + 24 = 72. The answer is 72."], **columns) == [1.0]
    assert correctness_reward(["q"], ["The answer is 70."], **columns) == [0.0]
    assert _ground_truth(columns, 0) == "72"


def test_eval_table_says_why_a_single_value_has_no_interval():
    from alignkit.stats import mean_interval, wilson

    result = {"model": "m", "baseline": "b", "data": "d", "device": "cpu", "out_dir": "o", "notes": [],
              "intervals": {"answer_accuracy": wilson(0, 1), "win_rate": mean_interval([0.5])}}
    lines = evaluate.format_table(result)
    win = next(line for line in lines if line.startswith("win_rate"))
    assert "nan" not in win and "n/a (N < 2)" in win, win


def test_a_verl_function_returning_text_is_told_verls_convention(tmp_path, monkeypatch):
    (tmp_path / "verl_text.py").write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 'high'\n")
    mix = RewardMix([f"{tmp_path / 'verl_text.py'}:compute_score"])
    with pytest.raises(RewardFunctionError) as info:
        mix.dry_run("q", {"answer": "#### 1"})
    message = str(info.value)
    assert "a number or a dict with a numeric 'score'" in message and "'high'" in message, message
    assert "list of numbers" not in message
