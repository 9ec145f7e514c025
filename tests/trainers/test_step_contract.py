"""The step contract (``alignkit.trainers.loop``) holds in every runner: ``trainer.on_nonfinite`` is
honoured alike, and every runner logs (and shows in the progress bar) the same throughput name."""

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.run import train_from_overrides

# one recipe per runner (sft and dpo both run the preference runner: without and with a reference)
RUNNERS = {"sft_tiny": "preference", "dpo_tiny": "preference", "rm_tiny": "reward", "pm_tiny": "pm", "grpo_tiny": "grpo",
           "ppo_tiny": "ppo", "online_dpo_tiny": "online_dpo", "raft_tiny": "raft", "xpo_tiny": "xpo",
           "nash_md_tiny": "nash_md", "dro_tiny": "dro", "gkd_tiny": "gkd", "sppo_tiny": "sppo",
           "prm_tiny": "prm"}
# 2 micro-batches per step, one update pass: the 3rd training loss is the first micro-batch of step 2
FAST = ["trainer.batch_size=4", "trainer.micro_batch_size=2", "rl.ppo_epochs=1", "generation.max_new_tokens=4",
        "trainer.eval_every=0", "trainer.max_eval_groups=2", "trainer.export=false", "logger.backends=[jsonl]"]


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _poison_third_training_loss(monkeypatch, runner: str) -> None:
    """The runner's loss is NaN on its 3rd call with gradients on (evaluation runs without)."""
    import importlib

    module = importlib.import_module(f"alignkit.trainers.{runner}")
    calls = []

    def poison(loss):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                return loss * float("nan")
        return loss

    if runner == "gkd":  # its loss is the token mean of the in-head JSD
        real_mean = module.token_mean
        monkeypatch.setattr(module, "token_mean", lambda values, mask: poison(real_mean(values, mask)))
    elif hasattr(module, "objective_from_cfg"):  # preference, reward, online DPO, XPO: an objective object
        real = module.objective_from_cfg

        class Poisoned:
            def __init__(self, objective):
                self._objective = objective

            def __getattr__(self, name):
                return getattr(self._objective, name)

            def __call__(self, *args, **kwargs):
                loss, metrics = self._objective(*args, **kwargs)
                return poison(loss), metrics

        monkeypatch.setattr(module, "objective_from_cfg", lambda loss_cfg: Poisoned(real(loss_cfg)))
    else:  # GRPO, PPO, Nash-MD, SPPO: the policy loss term
        real_terms = module.loss_terms

        def terms(loss_cfg):
            (spec, weight, hparams), *rest = real_terms(loss_cfg)

            class Spec:
                reference_needed = staticmethod(spec.reference_needed)  # the registry's needs, unpoisoned (GRPO, Nash-MD ask whether to load a reference)

                @staticmethod
                def fn(inputs, **hp):
                    loss, metrics = spec.fn(inputs, **hp)
                    return poison(loss), metrics

            return [(Spec, weight, hparams), *rest]

        monkeypatch.setattr(module, "loss_terms", terms)


@pytest.mark.parametrize("recipe", list(RUNNERS))
def test_nonfinite_loss_stop_and_skip_in_every_runner(tmp_path, recipe, monkeypatch, capsys):
    _poison_third_training_loss(monkeypatch, RUNNERS[recipe])
    common = [f"recipe={recipe}", "trainer.max_steps=3", *FAST, f"output_dir={tmp_path}",
              f"trainer.reference_cache_dir={tmp_path / 'ref'}"]

    code = train_from_overrides([*common, "trainer.on_nonfinite=stop", "run_name=stop"])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "non-finite loss at step 2" in " ".join(err.split())
    assert [r["step"] for r in _train_rows(tmp_path / "stop")] == [1]  # nothing of step 2 is logged

    _poison_third_training_loss(monkeypatch, RUNNERS[recipe])  # a fresh call count
    code = train_from_overrides([*common, "trainer.on_nonfinite=skip", "run_name=skip"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    rows = _train_rows(tmp_path / "skip")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows), rows  # the skipped micro-batch's loss is left out
    assert [r.get("nonfinite_skipped") for r in rows] == [0.0, 1.0, 0.0]


def test_every_runner_logs_and_shows_the_same_throughput_name(tmp_path, monkeypatch):
    from alignkit.engine.progress import TrainProgress

    shown = []
    real_update = TrainProgress.update

    def update(self, step, **kwargs):
        shown.append(kwargs)
        return real_update(self, step, **kwargs)

    monkeypatch.setattr(TrainProgress, "update", update)
    names, bar = {}, {}
    for recipe in RUNNERS:
        shown.clear()
        assert train_from_overrides([f"recipe={recipe}", "trainer.max_steps=2", *FAST, f"output_dir={tmp_path}",
                                     f"run_name={recipe}", f"trainer.reference_cache_dir={tmp_path / 'ref'}"]) == 0
        rows = _train_rows(tmp_path / recipe)
        assert len(rows) == 2
        # throughput and timing names: the same in every runner (online ones add gen_seconds, a time)
        names[recipe] = {k for r in rows for k in r if k.endswith(("_per_s", "_seconds"))} - {"gen_seconds"}
        bar[recipe] = [s.get("tokens_per_s") for s in shown]  # what the progress bar was given
        assert all(r.get("tokens_per_s", 0) > 0 for r in rows), (recipe, rows)
    assert all(found == {"tokens_per_s", "step_seconds"} for found in names.values()), names
    assert all(len(values) == 2 and all(v and v > 0 for v in values) for values in bar.values()), bar
