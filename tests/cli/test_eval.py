"""`alignkit eval`: a run is scored on its own held-out data with its reward functions, N and 95% intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.evaluate import format_table, resolve_target, run_eval
from alignkit.run import train_from_overrides

CAPITALS = [("France", "Paris"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Japan", "Tokyo"), ("Chile", "Santiago"),
            ("Egypt", "Cairo"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Ghana", "Accra"), ("Nepal", "Kathmandu")]


def _own_prompts(tmp_path: Path) -> Path:
    """Prompt-only records on a task that is not the demo's, each with a numeric reference answer."""
    path = tmp_path / "own_prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Planet survey {i}: how many moons does body {i} have?"}],
             "answer": f"Count them.\n#### {i % 7}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _own_pairs(tmp_path: Path) -> Path:
    path = tmp_path / "own_pairs.jsonl"
    rows = [{"prompt": f"What is the capital of {country}?", "chosen": f"{city}.", "rejected": "I am not sure."}
            for country, city in CAPITALS * 2]
    rows = [dict(r, prompt=f"{r['prompt']} (variant {i})") for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(tmp_path: Path, name: str, *overrides: str) -> Path:
    assert train_from_overrides([*overrides, "trainer.max_steps=2", "trainer.eval_every=0",
                                 f"output_dir={tmp_path}", f"run_name={name}"]) == 0
    return tmp_path / name


def _demo_prompts() -> set[str]:
    from alignkit.config.compose import demo_data_dir

    texts = set()
    for line in (demo_data_dir() / "prompts_eval.jsonl").read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        texts.add(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    return texts


def test_grpo_run_is_scored_on_its_own_held_out_prompts(tmp_path):
    data = _own_prompts(tmp_path)
    run = _train(tmp_path, "grpo", "recipe=grpo_tiny", f"data.train={data}", "data.eval_fraction=0.25",
                 "reward.fns=[correctness]", "generation.max_new_tokens=4")
    result = run_eval(str(run), ["generation.max_new_tokens=6"], baseline=None, limit=0, out_dir=None)
    eval_json = json.loads((run / "eval" / "eval.json").read_text())
    assert "held-out 0.25 of data.train" in eval_json["data"]
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    # the run's held-out share of its own file (10 of 40 by prompt), never the demo task
    assert len(samples) == 10 and all("Planet survey" in s["prompt"] for s in samples)
    demo = _demo_prompts()
    assert not any(any(d in s["prompt"] for d in demo) for s in samples)
    # its references as gsm8k writes them, read with the same parser on both sides
    assert {s["reference"] for s in samples} <= {str(i) for i in range(7)} and "####" in samples[0]["answer"]
    metrics = eval_json["metrics"]
    for key in ("answer_accuracy", "baseline_answer_accuracy", "answer_accuracy_diff", "reward/correctness",
                "baseline_reward/correctness", "win_rate"):
        assert set(metrics[key]) >= {"n", "rate", "ci_low", "ci_high"}, key
        assert metrics[key]["n"] == 10, key
        assert metrics[key]["ci_low"] <= metrics[key]["rate"] <= metrics[key]["ci_high"], key
    # the correctness reward and answer accuracy agree: same parser, same replies
    assert metrics["reward/correctness"]["rate"] == pytest.approx(metrics["answer_accuracy"]["rate"])
    assert metrics["answer_accuracy_diff"]["method"].startswith("Newcombe")
    from alignkit.report import write_report

    report = (write_report(str(run)) / "report.md").read_text()
    assert "| answer_accuracy |" in report and report.index("| answer_accuracy |") < report.index("![metrics]")
    lines = format_table(result)
    table = [line for line in lines if line.split() and line.split()[0] in metrics]
    assert table[0].startswith("answer_accuracy ") and "10" in table[0].split()[-1]


def test_preference_run_on_own_pairs_without_answers(tmp_path):
    data = _own_pairs(tmp_path)
    run = _train(tmp_path, "dpo", "recipe=dpo_tiny", f"data.train={data}", "data.eval_fraction=0.2")
    result = run_eval(str(run), ["generation.max_new_tokens=4"], baseline=None, limit=0, out_dir=None)
    metrics = json.loads((run / "eval" / "eval.json").read_text())["metrics"]
    assert metrics["preference_accuracy"]["n"] == 4 and metrics["likelihood_accuracy"]["n"] == 4
    assert "answer_accuracy" not in metrics  # no reference column: not measured, and said so
    notes = " ".join(result["notes"])
    assert "answer accuracy not measured" in notes
    assert "rewards 'judge', 'format', 'concise' left out" in notes  # the default judge cannot score capitals
    assert sum("left out" in n for n in result["notes"]) == 1  # one note for the judge and its parts
    samples = [json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all("capital of" in s["prompt"] for s in samples)


def test_data_override_and_reward_override(tmp_path):
    data = _own_prompts(tmp_path)
    run = _train(tmp_path, "grpo", "recipe=grpo_tiny", f"data.train={data}", "data.eval_fraction=0.25",
                 "reward.fns=[correctness]", "generation.max_new_tokens=4")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(5)))
    run_eval(str(run), [f"data={other}", "reward.fns=[concise]", "generation.max_new_tokens=4"], baseline=None,
             limit=0, out_dir=str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["metrics"]["answer_accuracy"]["n"] == 5 and "other.jsonl" in result["data"]
    assert "reward/concise" in result["metrics"] and "reward/correctness" not in result["metrics"]
    # Hydra's syntax for a source list, as in training (the shorthand too), and a clear error for a bad key
    for form in (f"data.eval=[{{path: '{other}'}}]", f"data.eval={other}"):
        target = resolve_target(str(run), [form])
        assert [s.path for s in target.cfg.data.eval] == [str(other)] and not target.use_train_split
    with pytest.raises(UserError, match="Key 'nope'"):
        resolve_target(str(run), ["trainer.nope=3"])


def test_a_run_without_held_out_data_is_refused(tmp_path):
    data = _own_prompts(tmp_path)
    run = _train(tmp_path, "all", "recipe=grpo_tiny", f"data.train={data}", "data.eval_fraction=0",
                 "reward.fns=[correctness]", "generation.max_new_tokens=4")
    with pytest.raises(UserError, match="no held-out data"):
        resolve_target(str(run), [])


def test_a_model_folder_needs_data_and_says_so(tmp_path):
    with pytest.raises(UserError, match="data=FILE"):
        resolve_target("tiny", [])
    data = _own_prompts(tmp_path)
    result = run_eval("tiny", [f"data={data}", "generation.max_new_tokens=4"], baseline=None, limit=8,
                      out_dir=str(tmp_path / "ev"))
    assert result["metrics"]["answer_accuracy"]["n"] == 8 and result["baseline"] is None
    assert "answer_accuracy_diff" not in result["metrics"]


def test_cli_prints_n_and_intervals(tmp_path):
    from typer.testing import CliRunner

    from alignkit.cli import app

    data = _own_prompts(tmp_path)
    out = CliRunner().invoke(app, ["eval", "tiny", "--baseline", "tiny", "--n", "6", "--out", str(tmp_path / "ev"),
                                   f"data={data}", "generation.max_new_tokens=4"])
    assert out.exit_code == 0, out.output
    rows = [line for line in out.output.splitlines() if line.startswith(("answer_accuracy", "baseline_answer"))]
    assert rows[0].startswith("answer_accuracy ") and rows[0].split()[-1] == "6"
    assert "95% interval" in out.output and "Newcombe" in out.output
    # the same model against itself: no difference, an interval around 0
    diff = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]["answer_accuracy_diff"]
    assert diff["rate"] == 0.0 and diff["ci_low"] <= 0.0 <= diff["ci_high"]


def test_reward_options_reach_the_eval_scoring(tmp_path):
    """``reward.options`` reach eval's scoring as they reach the trainers' (``RewardMix.from_config``), and
    ``generation.max_new_tokens`` is ``overlong``'s default L_max. Without options (L_max 6, L_cache 1) a
    6-token reply scores -1 and a shorter one 0; with max_len=2, cache=1, penalty_factor=0.5 a reply of
    >= 2 tokens scores -0.5. Options of a function eval does not score are left out with a note."""
    data = _own_prompts(tmp_path)
    common = [f"data={data}", "generation.max_new_tokens=6", "reward.fns=[overlong]"]
    options = ["++reward.options.overlong.max_len=2", "++reward.options.overlong.cache=1",
               "++reward.options.overlong.penalty_factor=0.5"]
    run_eval("tiny", common, baseline=None, limit=6, out_dir=str(tmp_path / "plain"))
    with_options = run_eval("tiny", [*common, *options], baseline=None, limit=6, out_dir=str(tmp_path / "options"))
    plain, scored = _scores(tmp_path / "plain"), _scores(tmp_path / "options")
    assert set(plain) <= {0.0, -1.0} and -1.0 in plain, plain  # greedy replies of the random tiny model: the limit
    assert set(scored) <= {0.0, -0.5}, scored
    assert all(b == -0.5 for a, b in zip(plain, scored) if a == -1.0), (plain, scored)  # same replies, new knobs
    assert with_options["metrics"]["reward/overlong"]["n"] == 6
    other = run_eval("tiny", [f"data={data}", "generation.max_new_tokens=4", "reward.fns=[concise]", *options],
                     baseline=None, limit=2, out_dir=str(tmp_path / "other"))
    assert any("reward.options for overlong not used" in n for n in other["notes"]), other["notes"]


def _scores(out: Path) -> list[float]:
    return [json.loads(line)["model_score"] for line in (out / "samples.jsonl").read_text().splitlines()]
