"""Planted symlinks where a run, eval, report or sweep writes a file: refused or replaced, never followed.

An attacker with write access to a shared ``output_dir`` plants ``metrics.jsonl``, the temp file
of its rewrite on resume, ``eval/``, ``report/`` or a sweep's ``results.csv`` as links to a file
of the victim's; the victim's file must stay as it was. (``.lock``, ``overrides.txt``,
``config.yaml`` are in test_bad_input.py; the checkpoints folder in
tests/engine/test_checkpoint_safety.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.engine.metrics import MetricsLogger, truncate_metrics
from alignkit.errors import UserError


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


def test_metrics_log_is_not_appended_through_a_link(tmp_path):
    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.jsonl .*symbolic link"):
        MetricsLogger(run, backends=("jsonl",))
    assert victim.read_text() == "precious\n"


def test_tensorboard_folder_link_is_refused(tmp_path):
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").symlink_to(victim_dir)
    with pytest.raises(UserError, match="tensorboard .*symbolic link"):
        MetricsLogger(run, backends=("jsonl", "tensorboard"))
    assert list(victim_dir.iterdir()) == []


def test_metrics_rewrite_on_resume_ignores_a_planted_temp_link(tmp_path):
    victim = _victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in (1, 2, 3)))
    (run / "metrics.jsonl.tmp").symlink_to(victim)  # the old temp name
    truncate_metrics(run / "metrics.jsonl", 2)
    assert victim.read_text() == "precious\n"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _run_with_metrics(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_report_folder_link_is_refused(tmp_path):
    from alignkit.report import write_report

    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    run = _run_with_metrics(tmp_path)
    (run / "report").symlink_to(victim_dir)
    with pytest.raises(UserError, match="symbolic link"):
        write_report(str(run))
    assert list(victim_dir.iterdir()) == []


def test_report_files_are_replaced_not_followed(tmp_path):
    from alignkit.report import write_report

    victim = _victim(tmp_path)
    run = _run_with_metrics(tmp_path)
    (run / "report").mkdir()
    (run / "report" / "metrics.png").symlink_to(victim)
    with pytest.raises(UserError, match="metrics.png .*symbolic link"):
        write_report(str(run))
    assert victim.read_text() == "precious\n"


def test_sweep_results_table_is_not_written_through_a_link(tmp_path):
    from alignkit.sweep import write_report

    victim = _victim(tmp_path)
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "job_result.json").write_text(json.dumps({"job": "0", "overrides": "trainer.lr=1", "status": "ok"}))
    (tmp_path / "sweep" / "results.csv").symlink_to(victim)
    with pytest.raises(UserError, match="results.csv .*symbolic link"):
        write_report(tmp_path / "sweep")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_converted_data_file_follows_the_umask(tmp_path, umask, mode):
    """``alignkit data convert``'s output was always 0600 (mkstemp), whatever the umask."""
    import os

    from alignkit.data.doctor import write_jsonl_atomically

    old = os.umask(umask)
    try:
        write_jsonl_atomically(tmp_path / "out.jsonl", [{"prompt": "a", "completion": "b", "label": True}])
    finally:
        os.umask(old)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == mode
