"""A rich progress bar for the training loop: step/total, loss, tokens/s and ETA.

It is quiet (no bar, nothing printed) off rank 0 and when stderr is not a terminal (CI logs, the
DeepSpeed launcher's pipes), where ``metrics.jsonl`` and the console metric lines are the record.
``console()`` is the one rich Console both this bar and ``MetricsLogger``'s console backend print
through, so metric lines appear above the bar instead of tearing it.

Left out: per-epoch bars, nested bars for evaluation or generation.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_CONSOLE: Console | None = None


def console() -> Console:
    """The process-wide rich Console (stderr), shared by the progress bar and console metrics."""
    global _CONSOLE
    if _CONSOLE is None:
        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def bar_enabled(rank: int, *, stream=None) -> bool:
    """Whether to draw a bar: rank 0 and an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    return rank == 0 and bool(getattr(stream, "isatty", lambda: False)())


class TrainProgress:
    """``with TrainProgress(total_steps, rank=r) as bar: ... bar.update(step, loss=..., tokens_per_s=...)``."""

    def __init__(self, total_steps: int, *, rank: int = 0, start_step: int = 0, enabled: bool | None = None):
        self.enabled = bar_enabled(rank) if enabled is None else enabled
        self._progress: Progress | None = None
        self._task = None
        self.total_steps = total_steps
        self.start_step = start_step

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console(),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self.total_steps, completed=self.start_step, stats=""
            )
        return self

    def update(self, step: int, *, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        """Show ``step`` optimizer steps done, with the latest loss and throughput."""
        if self._progress is None:
            return
        self._progress.update(
            self._task, completed=step, stats=format_stats(loss=loss, tokens_per_s=tokens_per_s)
        )

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None


def format_stats(*, loss: float | None = None, tokens_per_s: float | None = None) -> str:
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    return "  ".join(parts)
