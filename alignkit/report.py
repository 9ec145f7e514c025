"""``alignkit report RUN_DIR``: PNG plots and a Markdown summary of a finished (or running) run.

Reads ``metrics.jsonl`` and draws one panel per metric family that the run logged — loss,
reward margin and accuracy, KL, reward mean, lengths, learning rate, tokens/s — with train
curves and eval points, into ``RUN_DIR/report/metrics.png``, and writes ``report.md`` with the
first, last and best value of each metric, led by the ``alignkit eval`` results when
``RUN_DIR/eval/eval.json`` exists (answer accuracy first, every rate with its 95% interval and N).
For a sweep directory it draws ``report/comparison.png``: one panel per key metric, one colour per
job (the same in every panel), a legend naming each job by the overrides that vary between jobs; metrics logged at
several steps are curves, a held-out metric evaluated once per job (``eval_every=0``) is a bar
chart of the jobs' values (and the first held-out metric's final values are always shown as bars).
Left out: interactive dashboards (TensorBoard and W&B are logger backends for that).
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("loss", ["loss"]),
    ("preference", ["rewards/accuracy", "rewards/margin"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("reward", ["reward/mean", "reward/winners"]),  # reward/winners: raft's kept best replies
    ("kl / entropy", ["kl", "entropy"]),
    ("length", ["response_length"]),
    ("learning rate", ["lr"]),
    ("throughput", ["tokens_per_s"]),
    ("step time", ["step_seconds", "gen_seconds"]),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        from alignkit.errors import UserError

        raise UserError(f"{run_dir}: no metrics.jsonl; give a run directory (runs/<name>) or a sweep directory.")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def series(rows: list[dict], key: str, split: str) -> tuple[list[int], list[float]]:
    picked = [(r["step"], r[key]) for r in rows if r.get("split", "train") == split and key in r]
    return [s for s, _ in picked], [v for _, v in picked]


def plot_run(rows: list[dict], out: Path) -> Path:
    """One run: a panel per metric family it logged, train curves and eval points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in PANELS
              if any(series(rows, k, s)[0] for k in keys for s in ("train", "eval"))]
    cols = 2
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(11, 3.2 * ((len(panels) + 1) // 2)),
                             squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = series(rows, key, "train")
            if steps:
                ax.plot(steps, values, label=f"{key} (train)", linewidth=1.2)
            steps, values = series(rows, key, "eval")
            if steps:
                ax.plot(steps, values, "o--", label=f"{key} (eval)", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save_png(fig, out)
    plt.close(fig)
    return out


SWEEP_PANELS = [  # (split, key), one panel each when any job logged it
    ("eval", "rewards/accuracy"), ("eval", "rewards/margin"), ("eval", "reward/mean"), ("eval", "loss"),
    ("train", "loss"), ("train", "reward/mean"), ("train", "kl"), ("train", "tokens_per_s"),
]


def plot_sweep(runs: dict[str, list[dict]], labels: dict[str, str], out: Path) -> Path:
    """Sweep comparison: a colour per job; metrics logged at several steps as curves, metrics with
    a single held-out evaluation per job (``eval_every=0``) as bars with their values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    logged = [(split, key) for split, key in SWEEP_PANELS if any(series(rows, key, split)[0] for rows in runs.values())]
    curves = [(split, key) for split, key in logged
              if max(len(series(rows, key, split)[0]) for rows in runs.values()) > 1]
    bars = [(split, key) for split, key in logged if split == "eval" and (split, key) not in curves]
    if not bars and curves and curves[0][0] == "eval":
        bars = [curves[0]]  # the first held-out metric's final values, side by side
    panels = [("curve", split, key) for split, key in curves] + [("bar", split, key) for split, key in bars]
    cols = 2
    rows_of_panels = (len(panels) + cols - 1) // cols
    legend_rows = len(runs) if len(runs) > 4 else (len(runs) + 1) // 2
    legend_in = 0.2 + 0.2 * legend_rows
    height = 3.0 * rows_of_panels + legend_in
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(11, height), squeeze=False)
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(runs)}
    for ax, (kind, split, key) in zip(axes.flat, panels):
        where = "held-out" if split == "eval" else "train"
        if kind == "curve":
            for name, rows in runs.items():
                steps, values = series(rows, key, split)
                style = dict(marker="o", linestyle="--", markersize=4) if split == "eval" else dict(linewidth=1.2)
                ax.plot(steps, values, color=colors[name], **style)
            ax.set_title(f"{key} ({where})")
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        else:
            finals = {name: (series(rows, key, split)[1] or [float("nan")])[-1] for name, rows in runs.items()}
            bars_drawn = ax.bar(range(len(finals)), list(finals.values()), color=[colors[n] for n in finals])
            ax.bar_label(bars_drawn, labels=[f"{v:.3g}" for v in finals.values()], fontsize=8)
            ax.set_xticks(range(len(finals)), list(finals))
            ax.set_xlabel("job")
            ax.set_title(f"final {key} ({where}) by job")
            ax.margins(y=0.15)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[n], linewidth=3) for n in runs]
    fig.legend(handles, [f"{n}: {labels.get(n, '')}" for n in runs], loc="lower center",
               ncol=1 if len(runs) > 4 else 2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    _save_png(fig, out)
    plt.close(fig)
    return out


def summary_table(rows: list[dict]) -> list[str]:
    lines = ["| metric | split | first | last | best |", "|---|---|---|---|---|"]
    keys = sorted({k for r in rows for k in r if k not in ("step", "split", "time")})
    for split in ("train", "eval"):
        for key in keys:
            _, values = series(rows, key, split)
            if not values:
                continue
            best = max(values) if any(w in key for w in ("accuracy", "margin", "reward")) else min(values)
            lines.append(f"| {key} | {split} | {values[0]:.4g} | {values[-1]:.4g} | {best:.4g} |")
    return lines


def eval_section(run_dir: Path) -> list[str]:
    """The ``alignkit eval`` results (``eval/eval.json``), answer accuracy first, each with its 95% interval and N."""
    path = run_dir / "eval" / "eval.json"
    if not path.is_file():
        return []
    result = json.loads(path.read_text())
    metrics = result.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return []
    first = [k for k in ("answer_accuracy", "baseline_answer_accuracy", "answer_accuracy_diff") if k in metrics]
    order = first + [k for k in metrics if k not in first]
    lines = ["## Held-out evaluation (`alignkit eval`)", "",
             f"Model `{result.get('model')}` against `{result.get('baseline')}` on {result.get('data')}.", "",
             "| metric | value | 95% interval | N |", "|---|---|---|---|"]
    for key in order:
        m = metrics[key]
        sign = "+" if key.endswith("_diff") else ""
        low, high = f"{m['ci_low']:{sign}.3f}", f"{m['ci_high']:{sign}.3f}"
        lines.append(f"| {key} | {m['rate']:{sign}.3f} | [{low}, {high}] | {m['n']} |")
    if "answer_accuracy_diff" in metrics:
        lines += ["", "`answer_accuracy_diff`: model minus baseline on the same prompts (Newcombe's paired interval); "
                  "rates: Wilson intervals; reward means and the win rate: normal intervals."]
    return lines + [f"- {note}" for note in result.get("notes", [])] + [""]


def _save_png(fig, out: Path) -> None:
    """``fig`` as PNG at ``out``, never written through a planted symlink (alignkit.runfiles)."""
    import io

    from alignkit import runfiles

    runfiles.make_dir(out.parent, "report folder")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    runfiles.write_text(out, buffer.getvalue())


def write_report(target: str) -> Path:
    root = Path(target)
    jobs = sorted(p for p in root.glob("*/metrics.jsonl")) if not (root / "metrics.jsonl").exists() else []
    out_dir = root / "report"
    if jobs:  # a sweep directory: one curve per job
        from alignkit.sweep import job_order, varied_overrides

        names = sorted((p.parent.name for p in jobs), key=job_order)
        runs = {name: read_metrics(root / name) for name in names}
        overrides = {name: (root / name / "overrides.txt").read_text().split()
                     if (root / name / "overrides.txt").exists() else [] for name in names}
        common, labels = varied_overrides(overrides)
        png = plot_sweep(runs, labels, out_dir / "comparison.png")
        lines = [f"# Sweep report: {root}", "", f"Overrides of every job: `{' '.join(common) or '-'}`", "",
                 f"![comparison]({png.name})", ""]
        for name, rows in runs.items():
            lines += [f"## job {name}: `{labels[name]}`", ""]
            lines += summary_table(rows) + [""]
    else:
        rows = read_metrics(root)
        png = plot_run(rows, out_dir / "metrics.png")
        lines = [f"# Run report: {root.name}", ""] + eval_section(root) + [f"![metrics]({png.name})", ""]
        lines += summary_table(rows)
    from alignkit import runfiles

    runfiles.make_dir(out_dir, "report folder")
    runfiles.write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return out_dir
