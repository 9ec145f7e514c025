"""``alignkit train -m ...``: Hydra multirun sweeps and their results table.

The sweep goes through a real ``@hydra.main`` function, so sweeper and launcher plugins work
unchanged (``hydra/launcher=joblib``, ``hydra/launcher=submitit_slurm``, ``hydra/sweeper=optuna``).
Each job validates its config, takes Hydra's job directory as its run directory, runs as a
single run would, and writes ``job_result.json``; a failed job is recorded and the sweep goes on.
The job returns its objective (``objective``, e.g. ``eval/rewards/accuracy``) so that Optuna
can search over it. At the end the table of all jobs is printed and written as ``results.csv``
and ``results.md`` in the sweep directory; ``alignkit sweep-report DIR`` rebuilds it.
Jobs with the same model and data share one reference log-prob cache (see trainers/reference).

The table is written by the parent process, from the job folders' ``job_result.json``, by the Hydra
callback ``ResultsTable`` (``hydra.callbacks.results_table`` in ``conf/config.yaml``): its
``on_multirun_end`` runs in the process that started the sweep whatever the launcher -- in-process
(basic), worker processes (``hydra/launcher=joblib``), local or SLURM jobs (``submitit_local``,
``submitit_slurm``; those need a filesystem the parent shares). The plugins come with
``pip install 'alignkit[sweep]'``. A sweep in which any job failed (an error, a non-zero exit, or a
job folder without a result) still writes its table, then exits 1.
"""

from __future__ import annotations

import csv
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from alignkit import runfiles

# sweep directories this (parent) process started / finished, filled by ``ResultsTable``
_STARTED: list[Path] = []
_FINISHED: list[Path] = []


class ResultsTable(Callback):
    """Hydra callback: the results table of a multirun, written by the parent when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STARTED.append(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _FINISHED.append(sweep_dir)
        print_table(write_report(sweep_dir), sweep_dir)


def run_sweep(overrides: list[str]) -> int:
    import hydra

    from alignkit.config.compose import conf_dir, loss_overrides_forced, register_schema
    from alignkit.data.overrides import own_data_overrides  # data.train without data.eval drops the preset's eval

    register_schema()
    stray = [o for o in overrides if o.startswith("-")]
    if stray:
        from alignkit.errors import ConfigError

        raise ConfigError(f"unknown option {stray[0]!r}. Sweep values are written key=a,b,c.")
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_job)
    saved = sys.argv
    started = len(_STARTED)
    sys.argv = ["alignkit", "--multirun", *loss_overrides_forced(own_data_overrides(overrides))]
    try:
        main()
    finally:
        sys.argv = saved
        for sweep_dir in dict.fromkeys(_STARTED[started:]):
            if sweep_dir not in _FINISHED:  # the launcher raised: the jobs that did finish are still tabulated
                print_table(write_report(sweep_dir), sweep_dir)
    failed = [problem for sweep_dir in dict.fromkeys(_STARTED[started:]) for problem in failed_jobs(sweep_dir)]
    if failed:
        print(f"{len(failed)} sweep job(s) failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def failed_jobs(sweep_dir: Path) -> list[str]:
    """``job: reason`` of every job of the sweep that did not end ``ok`` (a job folder Hydra created
    without a ``job_result.json`` counts: its process died)."""
    out = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()), key=lambda p: job_order(p.name))
    for job in jobs:
        result = job / "job_result.json"
        if not result.is_file():
            out.append(f"{job.name}: no result (the job's process died)")
            continue
        row = json.loads(result.read_text())
        if row.get("status") != "ok":
            out.append(f"{job.name}: {row.get('status')} {row.get('error', '')}".rstrip())
    return out


def _job(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    from alignkit.config.compose import finalize
    from alignkit.run import create_run_dir, start_run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    started = time.time()
    result: dict[str, Any] = {"overrides": " ".join(overrides), "job": run_dir.name}
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        cfg = finalize(OmegaConf.merge(OmegaConf.structured(_schema()), cfg))
        create_run_dir(cfg, run_dir)
        runfiles.write_text(run_dir / "overrides.txt", "\n".join(overrides) + "\n")
        code = start_run(cfg, run_dir)
        result["status"] = "ok" if code == 0 else f"exit {code}"
    except Exception as exc:  # noqa: BLE001 - a failed job is recorded, the sweep goes on
        result["status"] = "failed"
        result["error"] = f"{type(exc).__name__}: {exc}"
        runfiles.write_text(run_dir / "error.txt", traceback.format_exc())
    result["wall_s"] = round(time.time() - started, 1)
    result.update(summarize_metrics(run_dir / "metrics.jsonl"))
    runfiles.write_text(run_dir / "job_result.json", json.dumps(result, indent=1))
    objective = cfg.get("objective", "eval/rewards/accuracy") if isinstance(cfg, DictConfig) else None
    value = result.get(f"final {objective}")
    return float(value) if value is not None else float("nan")


def _schema():
    from alignkit.config.schema import AlignkitConfig

    return AlignkitConfig


def summarize_metrics(path: Path) -> dict[str, float]:
    """Final and best value of every eval metric, plus the final train loss."""
    if not path.is_file():
        return {}
    final: dict[str, float] = {}
    best: dict[str, float] = {}
    train_loss = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        split = rec.get("split", "train")
        if split == "train" and "loss" in rec:
            train_loss = rec["loss"]
        if split != "eval":
            continue
        for key, value in rec.items():
            if key in ("step", "split", "time", "cpu_time_s") or not isinstance(value, (int, float)):
                continue
            name = f"eval/{key}"
            final[name] = value
            better = max if ("accuracy" in key or "margin" in key or "reward" in key) else min
            best[name] = better(best.get(name, value), value)
    out = {f"final {k}": round(v, 4) for k, v in final.items()}
    out.update({f"best {k}": round(v, 4) for k, v in best.items()})
    if train_loss is not None:
        out["final train/loss"] = round(train_loss, 4)
    return out


def write_report(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``results.csv`` (every column) and ``results.md`` (the key columns) of a sweep.

    Each row's ``varied`` holds the overrides that differ between jobs (floats shortened to 4
    significant digits); the overrides shared by all jobs are stated once above the Markdown table.
    """
    rows = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).glob("*/job_result.json"),
                                                       key=lambda p: job_order(p.parent.name))]
    if not rows:
        return rows
    common, varied = varied_overrides({row["job"]: row.get("overrides", "").split() for row in rows})
    for row in rows:
        row["varied"] = varied[row["job"]]
    keys = ["job", "varied", *[k for k in dict.fromkeys(k for row in rows for k in row)
                               if k not in ("job", "varied", "error")]]
    import io

    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    runfiles.write_text(Path(sweep_dir) / "results.csv", handle.getvalue())  # never through a planted link
    shown = summary_columns(rows)
    lines = [f"Overrides of every job: `{' '.join(common) or '-'}`", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in shown) + " |" for row in rows]
    runfiles.write_text(Path(sweep_dir) / "results.md", "\n".join(lines) + "\n")
    return rows


KEY_METRICS = ("rewards/accuracy", "rewards/margin", "reward/mean", "/loss")


def summary_columns(rows: list[dict[str, Any]]) -> list[str]:
    """job, varied overrides, status, wall time, then final/best of the key eval metrics."""
    metrics = [k for k in dict.fromkeys(k for row in rows for k in row)
               if k.startswith(("final eval/", "best eval/")) and k.endswith(KEY_METRICS)]
    return ["job", "varied", "status", "wall_s", *metrics, "final train/loss"]


def varied_overrides(jobs: dict[str, list[str]]) -> tuple[list[str], dict[str, str]]:
    """The overrides every job shares, and per job the others (floats to 4 significant digits)."""
    lists = list(jobs.values())
    common = [o for o in lists[0] if all(o in other for other in lists[1:])] if len(lists) > 1 else []
    return common, {job: " ".join(_short(o) for o in overrides if o not in common) or "-"
                    for job, overrides in jobs.items()}


def _short(override: str) -> str:
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}{sep}{number:.4g}" if "." in value or "e" in value.lower() else override


def job_order(name: str) -> tuple[int, str]:
    """Sort key of a sweep's job folders: numbered jobs in numeric order (2 before 10), others last."""
    return (int(name), name) if name.isdigit() else (10**9, name)


def print_table(rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    shown = [k for k in summary_columns(rows) if not k.startswith("best ")]
    headers = [k.replace("final eval/", "").replace("final train/loss", "train loss").replace("rewards/", "")
               for k in shown]
    table = Table(title=f"sweep {sweep_dir} (final eval metrics; results.md has the best too)")
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(str(row.get(k, "")) for k in shown))
    Console().print(table)
