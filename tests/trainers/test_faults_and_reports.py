"""Faults end runs cleanly and resumably; bad paths fail before training; eval and report produce files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.errors import UserError
from alignkit.run import train_from_overrides

ALIGNKIT = [sys.executable, "-m", "alignkit"]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
# in-process tests set these in this pytest process; a child must not inherit (and collide with) them
ENV = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_nonfinite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    proc = subprocess.run([*ALIGNKIT, "train", "recipe=sft_tiny", "trainer.lr=1e12", "trainer.max_steps=8",
                           "trainer.save_every=1", "trainer.keep_last=8", "deepspeed.gradient_clipping=0",
                           "trainer.eval_every=0", f"output_dir={tmp_path}", "run_name=nan"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss at step" in proc.stderr and "Traceback" not in proc.stderr
    step = int(proc.stderr.split("non-finite loss at step")[1].split()[0].rstrip(":"))
    kept = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("step-*"))
    assert kept and kept[-1] == f"step-{step - 1}"


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    args = [*ALIGNKIT, "train", "recipe=sft_tiny", "trainer.max_steps=400", "trainer.eval_every=0",
            "trainer.export=false", f"output_dir={tmp_path}", "run_name=term"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # stopped, resumable: not a finished run
    assert "stopped at step" in err
    stopped = len(_train_rows(tmp_path / "term"))
    assert (tmp_path / "term" / "checkpoints" / f"step-{stopped}").is_dir()
    assert stopped < 400


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocked = tmp_path / "ro"
    blocked.mkdir()
    blocked.chmod(0o500)
    if os.access(blocked, os.W_OK):  # root ignores permissions; use a path under a file instead
        blocked = tmp_path / "a_file"
        blocked.write_text("x")
    with pytest.raises(UserError, match="cannot write to the output directory"):
        train_from_overrides(["recipe=sft_tiny", f"output_dir={blocked}/runs"])


def test_bad_model_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([*ALIGNKIT, "train", "recipe=sft_tiny", f"model.name_or_path={tmp_path}/missing",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing" in proc.stderr


def test_eval_and_report_write_their_files(tmp_path):
    assert train_from_overrides(["recipe=dpo_tiny", "trainer.max_steps=2", f"output_dir={tmp_path}", "run_name=r",
                                 f"trainer.reference_cache_dir={tmp_path / 'ref'}"]) == 0
    from alignkit.evaluate import run_eval
    from alignkit.report import write_report

    result = run_eval(str(tmp_path / "r"), ["generation.max_new_tokens=6"], baseline=None, limit=8, out_dir=None)
    for key in ("preference_accuracy", "likelihood_accuracy", "judge_score", "baseline_judge_score", "win_rate",
                "answer_accuracy", "baseline_answer_accuracy", "format", "baseline_concise"):
        assert 0.0 <= result[key] <= 1.75
    samples = (tmp_path / "r" / "eval" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8 and "baseline" in json.loads(samples[0])
    out = write_report(str(tmp_path / "r"))
    assert (out / "metrics.png").stat().st_size > 10_000
    assert "rewards/accuracy" in (out / "report.md").read_text()


def test_answer_metrics_separate_correctness_from_format():
    from alignkit.evaluate import answer_metrics

    samples = [  # the model learned the format but not the arithmetic; the baseline rambles correctly
        {"answer": "14", "model": "Answer: 8", "baseline": "Mia has 8 + 6 = 14 pens."},
        {"answer": "5", "model": "Answer: 5", "baseline": "10 - 5 = 5, so Sam has 5 books left."},
        {"answer": None, "model": "Answer: 1", "baseline": "1"},  # no reference answer: left out
    ]
    out = answer_metrics(samples)
    assert out["answer_accuracy"] == 0.5 and out["baseline_answer_accuracy"] == 1.0
    from alignkit.rewards.judge import format_score  # format beside correctness, as the judge scores it

    assert out["format"] == (format_score("Answer: 8", "14") + format_score("Answer: 5", "5")) / 2
    assert out["baseline_format"] == (format_score(samples[0]["baseline"], "14") + format_score(samples[1]["baseline"], "5")) / 2
    assert answer_metrics([{"answer": None, "model": "x", "baseline": "y"}]) == {}


def test_cpu_time_counts_from_the_run_start_not_the_process_start():
    """Sweep jobs run one after another in one process: each job's cpu_time_s must start near 0."""
    import torch

    from alignkit.trainers.common import Run

    sum(i * i for i in range(2_000_000))  # spend CPU before the run starts
    run = Run(cfg=None, run_dir=Path("."), rank=0, world=1, device=torch.device("cpu"))
    assert time.process_time() > 0.05
    assert 0.0 <= run.cpu_time() < 0.05
