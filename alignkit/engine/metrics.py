"""Metric logging: ``metrics.jsonl`` always, plus console, TensorBoard and Weights & Biases by choice.

``MetricsLogger.log(metrics, step=, split=)`` writes one JSON object per call to
``RUN_DIR/metrics.jsonl`` (``{"step": 10, "split": "train", "time": ..., "loss": 0.69, ...}``),
flushed per line so a killed run keeps everything logged so far. Metric names are the shared ones
of docs/DESIGN.md; TensorBoard and wandb see them as ``<split>/<name>``. Only rank 0 logs; on other
ranks every method is a no-op. A backend whose package is missing (tensorboard, wandb) is skipped
with a one-line message instead of failing the run; wandb defaults to offline mode.

On resume, ``truncate_after=k`` drops lines with step > k that a killed run wrote after its last
checkpoint, so ``metrics.jsonl`` reads as one uninterrupted run. Non-finite values are written as
JSON ``NaN``/``Infinity`` (Python and pandas read them back).

Left out: MLflow/Comet, system metrics, histograms, media.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from alignkit.engine.progress import console
from alignkit.errors import ConfigError

BACKENDS = ("console", "jsonl", "tensorboard", "wandb")
SPLITS = ("train", "eval")
WANDB_MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"


@dataclass
class LoggerConfig:
    """Where metrics go. ``jsonl`` is written even when not listed (reports read it)."""

    backends: list[str] = field(default_factory=lambda: ["console", "jsonl"])
    wandb_project: str = "alignkit"
    wandb_mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins

    def validate(self) -> None:
        for name in self.backends:
            if name not in BACKENDS:
                raise ConfigError(
                    f"logger.backends contains {name!r}; valid backends: {', '.join(BACKENDS)}."
                )
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(
                f"logger.wandb_mode={self.wandb_mode!r} is not valid; choose one of: {', '.join(WANDB_MODES)}."
            )


def _to_float(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, after_step: int) -> None:
    """Rewrite ``path`` keeping only records with ``step <= after_step`` (atomically)."""
    if not path.exists():
        return
    from alignkit import runfiles

    kept = [r for r in read_metrics(path) if r.get("step", 0) <= after_step]
    runfiles.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))  # never through a planted link


def format_console_line(step: int, split: str, values: Mapping[str, float]) -> str:
    shown = " | ".join(f"{k} {v:.4g}" if math.isfinite(v) else f"{k} {v}" for k, v in values.items())
    return f"step {step} [{split}] {shown}"


class MetricsLogger:
    """Rank-0 metric sink over the chosen backends; ``close()`` (or ``with``) flushes and closes them."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        backends: Iterable[str] = ("console", "jsonl"),
        rank: int = 0,
        *,
        wandb_project: str = "alignkit",
        wandb_mode: str = "offline",
        run_name: Optional[str] = None,
        config: Optional[Mapping[str, Any]] = None,
        truncate_after: Optional[int] = None,
    ):
        self.active = rank == 0
        self.backends = set(backends) | {"jsonl"}
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._tensorboard = None
        self._wandb = None
        if not self.active:
            return
        unknown = self.backends - set(BACKENDS)
        if unknown:
            raise ConfigError(
                f"logger.backends contains {sorted(unknown)}; valid backends: {', '.join(BACKENDS)}."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None:
            truncate_metrics(self.path, truncate_after)
        from alignkit import runfiles

        self._file = runfiles.open_append(self.path, "metrics log")  # never through a planted link
        if "tensorboard" in self.backends:
            runfiles.refuse_symlink(Path(run_dir) / "tensorboard", "tensorboard folder")
            self._tensorboard = _open_tensorboard(Path(run_dir) / "tensorboard")
        if "wandb" in self.backends:
            self._wandb = _open_wandb(Path(run_dir), wandb_project, wandb_mode, run_name, config)

    def log(self, metrics: Mapping[str, Any], *, step: int, split: str = "train") -> None:
        """Record ``metrics`` (floats or 0-d tensors) at optimizer step ``step`` for ``split`` (train|eval)."""
        if not self.active:
            return
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        values = {name: _to_float(v) for name, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "console" in self.backends:
            console().print(format_console_line(step, split, values), highlight=False, markup=False)
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{name}": v for name, v in values.items()}, step=int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _skip(backend: str, package: str, error: Exception) -> None:
    console().print(
        f"[yellow]logger: skipping the {backend} backend: {error}. Install it with `pip install {package}` "
        f"or drop '{backend}' from logger.backends.[/yellow]"
    )


def _open_tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        _skip("tensorboard", "tensorboard", err)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _open_wandb(run_dir: Path, project: str, mode: str, run_name: Optional[str], config):
    try:
        import wandb
    except ImportError as err:
        _skip("wandb", "wandb", err)
        return None
    return wandb.init(
        project=project,
        name=run_name or run_dir.name,
        dir=str(run_dir),
        mode=os.environ.get("WANDB_MODE", mode),
        config=dict(config) if config else None,
    )
