"""metrics.jsonl, console / TensorBoard / wandb backends, the progress bar and its quiet mode."""

import io
import json
import math
import sys

import pytest
import torch

from alignkit.engine import progress
from alignkit.engine.metrics import LoggerConfig, MetricsLogger, read_metrics
from alignkit.errors import ConfigError


def test_jsonl_one_flushed_line_per_call(tmp_path):
    logger = MetricsLogger(tmp_path, backends=["console"], rank=0)
    logger.log({"loss": torch.tensor(0.5), "rewards/accuracy": 1}, step=1)
    # flushed before close: another reader sees the line already
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: first[k] for k in ("step", "split", "loss", "rewards/accuracy")} == {
        "step": 1, "split": "train", "loss": 0.5, "rewards/accuracy": 1.0,
    }  # fmt: skip
    logger.log({"loss": float("nan")}, step=2, split="eval")
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "eval")]
    assert math.isnan(records[1]["loss"])


def test_other_ranks_write_nothing(tmp_path):
    with MetricsLogger(tmp_path, rank=1) as logger:
        logger.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_truncates_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, backends=["jsonl"]) as logger:
        for step in range(1, 6):
            logger.log({"loss": float(step)}, step=step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "spl')  # a line torn by SIGKILL
    with MetricsLogger(tmp_path, backends=["jsonl"], truncate_after=3) as logger:
        logger.log({"loss": 40.0}, step=4)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0),
    ]  # fmt: skip


def test_bad_split_and_backend(tmp_path):
    with pytest.raises(ConfigError, match="console, jsonl, tensorboard, wandb"):
        MetricsLogger(tmp_path, backends=["mlflow"])
    with MetricsLogger(tmp_path, backends=["jsonl"]) as logger, pytest.raises(ValueError):
        logger.log({"loss": 1.0}, step=1, split="test")
    with pytest.raises(ConfigError, match="mlflow"):
        LoggerConfig(backends=["console", "mlflow"]).validate()
    with pytest.raises(ConfigError, match="offline, online, disabled"):
        LoggerConfig(wandb_mode="sometimes").validate()
    LoggerConfig().validate()


def test_missing_backend_package_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(progress, "_CONSOLE", None)
    with MetricsLogger(tmp_path, backends=["tensorboard", "wandb"]) as logger:
        logger.log({"loss": 1.0}, step=1)
    err = capsys.readouterr().err
    assert "skipping the tensorboard backend" in err and "pip install tensorboard" in err
    assert "skipping the wandb backend" in err
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


def test_tensorboard_backend_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, backends=["tensorboard"]) as logger:
        logger.log({"loss": 0.25}, step=3)
        logger.log({"loss": 0.125}, step=4, split="eval")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(4, 0.125)]


def test_wandb_offline_backend(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path, backends=["wandb"], wandb_mode="offline") as logger:
        logger.log({"loss": 0.5}, step=1)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_progress_bar_is_quiet_off_tty_and_off_rank0():
    assert not progress.bar_enabled(0, stream=io.StringIO())
    tty = io.StringIO()
    tty.isatty = lambda: True
    assert progress.bar_enabled(0, stream=tty)
    assert not progress.bar_enabled(1, stream=tty)
    with progress.TrainProgress(10, rank=0, enabled=False) as bar:
        bar.update(3, loss=0.5, tokens_per_s=100.0)  # no-op, no error


def test_progress_bar_renders_step_loss_and_throughput(monkeypatch):
    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr(progress, "_CONSOLE", Console(file=out, force_terminal=True, width=120))
    with progress.TrainProgress(10, enabled=True) as bar:
        bar.update(4, loss=0.6931, tokens_per_s=12345.0)
    text = out.getvalue()
    assert "4/10" in text and "loss 0.6931" in text and "12,345 tok/s" in text and "eta" in text
