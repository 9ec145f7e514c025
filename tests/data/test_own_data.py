"""Train on your own data: overriding data.train without data.eval drops the preset's demo eval set for a
held-out share of the user's own prompts (or says plainly there is none), in train, config show and multirun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from alignkit.config.compose import compose, demo_data_dir
from alignkit.data.config import OWN_DATA_EVAL_FRACTION
from alignkit.data.overrides import expand_shorthand, own_data_overrides

DROP = ["data.eval=[]", f"data.eval_fraction={OWN_DATA_EVAL_FRACTION}"]


def _own_pairs(path: Path, n: int = 20) -> Path:
    rows = [{"prompt": f"Name colour number {i}.", "chosen": f"Blue {i}.", "rejected": f"I refuse {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _demo_prompts() -> set[str]:
    rows = [json.loads(line) for line in (demo_data_dir() / "paired_eval.jsonl").read_text().splitlines()]
    return {json.dumps(r["prompt"]) for r in rows}


# ---------------------------------------------------------------- the override rule


@pytest.mark.parametrize("overrides,added", [
    (["recipe=dpo_tiny", "data.train=[{path:f.jsonl}]"], DROP),
    (["data.train.0.path=f.jsonl"], DROP),
    (["+data.train=[{path:f.jsonl}]"], DROP),
    (["data.train=[{path:f.jsonl}]", "data.eval_fraction=0"], ["data.eval=[]"]),
    (["data.train=[{path:f.jsonl}]", "data.eval=[{path:e.jsonl}]"], []),
    (["data.train=[{path:f.jsonl}]", "data.eval.0.path=e.jsonl"], []),
    (["data.train=[{path:f.jsonl}]", "~data.eval"], []),
    (["data=demo_sft"], []),  # a data group brings its own eval set
    (["data.eval_fraction=0.1", "data.max_length=64"], []),
])
def test_train_without_eval_drops_the_preset_eval(overrides, added):
    assert own_data_overrides(overrides) == overrides + added


@pytest.mark.parametrize("given,expanded", [
    ("data.train=my.jsonl", "data.train=[{path:'my.jsonl'}]"),
    ("data.train='my file.jsonl.gz'", "data.train=[{path:'my file.jsonl.gz'}]"),
    ("data.train=~/data/gsm8k", "data.train=[{path:'~/data/gsm8k'}]"),
    ("data.eval=data/*.jsonl", "data.eval=[{path:'data/*.jsonl'}]"),
    ("data.train=a.jsonl,b.jsonl", "data.train=[{path:'a.jsonl'}],[{path:'b.jsonl'}]"),  # a multirun sweep
    ("data.train=[{path:a.jsonl}]", "data.train=[{path:a.jsonl}]"),
    ("data.train=null", "data.train=null"),
    ("data.train_x=a", "data.train_x=a"),
    ("trainer.lr=1e-5", "trainer.lr=1e-5"),
])
def test_shorthand_expands_to_one_source(given, expanded):
    assert expand_shorthand(given) == expanded


def test_column_map_override_is_forced_so_hydra_takes_its_keys():
    assert own_data_overrides(["data.column_map={prompt: question}"]) == ["++data.column_map={prompt: question}"]
    cfg = compose(["recipe=sft_tiny", "data.column_map={prompt: question, completion: answer}"])
    assert dict(cfg.data.column_map) == {"prompt": "question", "completion": "answer"}


def test_compose_and_config_show_drop_the_demo_eval(tmp_path):
    own = _own_pairs(tmp_path / "own.jsonl")
    preset = compose(["recipe=dpo_tiny"])
    assert [s.path for s in preset.data.eval] == [str(demo_data_dir() / "paired_eval.jsonl")]
    cfg = compose(["recipe=dpo_tiny", f"data.train={own}"])
    assert [s.path for s in cfg.data.train] == [str(own)]
    assert list(cfg.data.eval) == [] and cfg.data.eval_fraction == OWN_DATA_EVAL_FRACTION
    kept = compose(["recipe=dpo_tiny", f"data.train={own}", f"data.eval=[{{path:'{own}'}}]"])
    assert [s.path for s in kept.data.eval] == [str(own)] and kept.data.eval_fraction == 0.0
    from typer.testing import CliRunner

    from alignkit.cli import app

    result = CliRunner().invoke(app, ["config", "show", "recipe=dpo_tiny", f"data.train={own}"])
    assert result.exit_code == 0, result.output
    data = OmegaConf.create(result.output).data
    assert list(data.eval) == [] and data.eval_fraction == OWN_DATA_EVAL_FRACTION


def test_multirun_jobs_get_the_same_rule(tmp_path, monkeypatch):
    """run_sweep hands Hydra the rewritten argv (the jobs themselves are not run here)."""
    import hydra

    import alignkit.sweep as sweep

    seen = {}

    def fake_main(**_):
        def wrap(job):
            def run():
                import sys

                seen["argv"] = list(sys.argv)
            return run
        return wrap

    monkeypatch.setattr(hydra, "main", fake_main)
    sweep.run_sweep(["recipe=dpo_tiny", "data.train=a.jsonl,b.jsonl", "loss.beta=0.1,0.2"])
    assert seen["argv"][2:] == ["recipe=dpo_tiny", "data.train=[{path:'a.jsonl'}],[{path:'b.jsonl'}]",
                                "++loss.beta=0.1,0.2", *DROP]


# ---------------------------------------------------------------- a tiny run on its own file


def test_tiny_run_on_own_file_is_evaluated_on_its_own_held_out_prompts(tmp_path, monkeypatch, capsys):
    import alignkit.data.pipeline as pipeline
    from alignkit.run import train_from_overrides

    own = _own_pairs(tmp_path / "own.jsonl")
    read = []
    real_iter_rows = pipeline.iter_rows

    def recording_iter_rows(path, *args):
        read.append(path)
        return real_iter_rows(path, *args)

    monkeypatch.setattr(pipeline, "iter_rows", recording_iter_rows)
    code = train_from_overrides(["recipe=dpo_tiny", f"data.train={own}", "trainer.max_steps=2", "trainer.export=false",
                                 f"trainer.reference_cache_dir={tmp_path / 'ref'}", f"output_dir={tmp_path}",
                                 "run_name=run"])
    assert code == 0
    assert read == [str(own)]  # the demo eval file is never opened
    out = " ".join(capsys.readouterr().err.split())  # the run prints its summary on stderr
    assert "19 train / 1 eval groups from own.jsonl (20)" in out
    assert "eval set: 1 record (1 prompt) held out of data.train by prompt (data.eval_fraction=0.05" in out
    frozen = OmegaConf.load(tmp_path / "run" / "config.yaml").data
    assert list(frozen.eval) == [] and frozen.eval_fraction == OWN_DATA_EVAL_FRACTION
    # the frozen config rebuilds the eval set: own prompts only, none trained on, none from the demo task
    data_cfg = OmegaConf.to_object(compose(["recipe=dpo_tiny", f"data.train={own}"]).data)
    train, held = pipeline.load_split_records(data_cfg, pipeline.DataStats())
    held_prompts = {json.dumps(r.prompt) for r in held}
    assert len(held) == 1 and not held_prompts & {json.dumps(r.prompt) for r in train}
    assert not held_prompts & _demo_prompts()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r.get("split") == "eval"] == [0, 2]


def test_tiny_run_without_eval_fraction_says_there_is_no_eval_set(tmp_path, capsys):
    from alignkit.run import train_from_overrides

    own = _own_pairs(tmp_path / "own.jsonl", n=8)
    code = train_from_overrides(["recipe=dpo_tiny", f"data.train={own}", "data.eval_fraction=0",
                                 "trainer.max_steps=1", "trainer.export=false",
                                 f"trainer.reference_cache_dir={tmp_path / 'ref'}", f"output_dir={tmp_path}",
                                 "run_name=run"])
    assert code == 0
    out = " ".join(capsys.readouterr().err.split())  # the run prints its summary on stderr
    assert "8 train / 0 eval groups" in out
    assert "no eval set (data.eval is empty and data.eval_fraction=0): the run is not evaluated" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("split") == "eval"]
