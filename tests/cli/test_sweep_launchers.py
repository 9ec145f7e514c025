"""Sweeps through Hydra's joblib and submitit_local launcher plugins (``alignkit[sweep]``).

The jobs run in other processes (joblib's workers, submitit's local job processes), so the results
table must come from the parent (the ``ResultsTable`` callback's ``on_multirun_end``), not from
state collected inside the jobs. A sweep with a failed job still writes its table and exits 1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
JOBS = ["recipe=sft_tiny", "trainer.lr=1e-4,3e-4", "trainer.max_steps=2", "trainer.eval_every=0",
        "trainer.export=false"]


def _sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    proc = subprocess.run([sys.executable, "-m", "alignkit", "train", "-m", *overrides, f"output_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    sweeps = list((tmp_path / "sweeps").iterdir()) if (tmp_path / "sweeps").is_dir() else []
    assert len(sweeps) == 1, proc.stderr[-3000:]
    return proc, sweeps[0]


def _rows(sweep: Path) -> list[dict]:
    lines = (sweep / "results.csv").read_text().splitlines()
    import csv

    return list(csv.DictReader(lines))


@pytest.mark.slow
def test_joblib_launcher_sweep_writes_the_results_table(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc, sweep = _sweep(tmp_path, *JOBS, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(sweep)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {r["varied"] for r in rows} == {"trainer.lr=0.0001", "trainer.lr=0.0003"}
    assert (sweep / "results.md").is_file()


@pytest.mark.slow
def test_submitit_local_launcher_sweep_writes_the_results_table(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc, sweep = _sweep(tmp_path, *JOBS, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(sweep)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "job_result.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_joblib_sweep_with_a_failed_job_writes_the_table_and_exits_nonzero(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    # the lora reference without LoRA fails in its job (ConfigError); the other job trains
    proc, sweep = _sweep(tmp_path, "recipe=dpo_tiny", "trainer.reference=separate,lora", "trainer.max_steps=1",
                         "trainer.eval_every=0", "trainer.export=false", "hydra/launcher=joblib",
                         "hydra.launcher.n_jobs=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 sweep job(s) failed" in proc.stderr and "model.lora.r" in proc.stderr
    assert [r["status"] for r in _rows(sweep)] == ["ok", "failed"]


def test_failed_jobs_counts_a_job_folder_without_a_result(tmp_path):
    from alignkit.sweep import failed_jobs

    for name, result in (("0", {"status": "ok"}), ("1", {"status": "exit 3"}), ("2", None)):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        if result is not None:
            (tmp_path / name / "job_result.json").write_text(json.dumps(result))
    assert failed_jobs(tmp_path) == ["1: exit 3", "2: no result (the job's process died)"]
