"""The sweep results table: shared overrides stated once, varied ones per row, key metrics only."""

import csv
import json

from alignkit.sweep import summarize_metrics, write_report


def _job(sweep, name, overrides, accuracy, status="ok"):
    job = sweep / name
    job.mkdir(parents=True)
    row = {"overrides": overrides, "job": name, "status": status, "wall_s": 1.0,
           "final eval/rewards/accuracy": accuracy, "final eval/logps/chosen": -3.0}
    (job / "job_result.json").write_text(json.dumps(row))


def test_table_states_common_overrides_once_and_shortens_floats(tmp_path):
    _job(tmp_path, "0", "recipe=dpo_tiny loss=ipo ++loss.beta=0.32124351923223976 trainer.max_steps=2", 0.875)
    _job(tmp_path, "1", "recipe=dpo_tiny loss=dpo ++loss.beta=0.1 trainer.max_steps=2", 0.75)
    _job(tmp_path, "10", "recipe=dpo_tiny loss=dpo ++loss.beta=2e-05 trainer.max_steps=2", 0.5, status="failed")
    rows = write_report(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "10"]  # numeric order, not "0, 1, 10" by accident of names
    assert [r["varied"] for r in rows] == ["loss=ipo ++loss.beta=0.3212", "loss=dpo ++loss.beta=0.1",
                                            "loss=dpo ++loss.beta=2e-05"]
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "Overrides of every job: `recipe=dpo_tiny trainer.max_steps=2`"
    header = md[2]
    assert "final eval/rewards/accuracy" in header and "logps" not in header
    assert "| 10 | loss=dpo ++loss.beta=2e-05 | failed |" in md[-1]
    with open(tmp_path / "results.csv") as handle:
        full = list(csv.DictReader(handle))
    assert full[0]["final eval/logps/chosen"] == "-3.0"  # the CSV keeps every column
    assert full[0]["overrides"].startswith("recipe=dpo_tiny loss=ipo")


def test_summary_takes_final_and_best_in_each_metrics_direction(tmp_path):
    lines = [{"step": 1, "split": "train", "loss": 0.9},
             {"step": 1, "split": "eval", "loss": 0.5, "rewards/accuracy": 0.8, "cpu_time_s": 3.0},
             {"step": 2, "split": "eval", "loss": 0.6, "rewards/accuracy": 0.7, "cpu_time_s": 6.0},
             {"step": 2, "split": "train", "loss": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = summarize_metrics(tmp_path / "metrics.jsonl")
    assert out["final eval/loss"] == 0.6 and out["best eval/loss"] == 0.5
    assert out["final eval/rewards/accuracy"] == 0.7 and out["best eval/rewards/accuracy"] == 0.8
    assert out["final train/loss"] == 0.4
    assert not any("cpu_time_s" in k for k in out)


def test_sweep_report_labels_jobs_by_what_varies(tmp_path):
    from alignkit.report import write_report as write_plots

    for job, beta, accuracies in (("0", "0.1", (0.5, 0.7)), ("1", "0.3", (0.5, 0.9)), ("2", "0.5", (0.5, 0.6))):
        (tmp_path / job).mkdir()
        (tmp_path / job / "overrides.txt").write_text(f"recipe=dpo_tiny\nloss.beta={beta}\n")
        rows = [{"step": s, "split": "eval", "rewards/accuracy": a, "loss": 1 - a} for s, a in zip((0, 2), accuracies)]
        rows.append({"step": 2, "split": "train", "loss": 0.3})
        (tmp_path / job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = write_plots(str(tmp_path))
    png = out / "comparison.png"
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "Overrides of every job: `recipe=dpo_tiny`" in md
    assert "## job 1: `loss.beta=0.3`" in md
