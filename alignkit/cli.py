"""The ``alignkit`` command line: a thin Typer app.

Each command parses its own flags and hands the rest (Hydra overrides, ``key=value``) to
``alignkit.config`` and ``alignkit.run``. User mistakes (``UserError``) are printed as one
paragraph without a traceback (rich markup in the message is escaped, so ``[judge]`` prints as
written) and exit with their code (2; 128 + N for a run stopped by signal N, see ``alignkit.run``);
``--debug`` (or ``ALIGNKIT_DEBUG=1``) shows the traceback. Left out: any training logic; see ``alignkit.run``.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from alignkit.errors import UserError

console = Console(stderr=True)
app = typer.Typer(
    name="alignkit",
    help="Config-driven alignment of language models: SFT, DPO family, KTO, listwise, reward models, PPO, GRPO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect configs without running anything.", no_args_is_help=True)
app.add_typer(config_app, name="config")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def _debug_enabled() -> bool:
    return os.environ.get("ALIGNKIT_DEBUG", "") not in ("", "0")


@app.command(context_settings=OVERRIDES)
def train(
    ctx: typer.Context,
    nproc: int = typer.Option(0, "-g", "--nproc", help="Processes per node (DeepSpeed launcher); 0 = from the config."),
    nnodes: int = typer.Option(0, "--nnodes", help="Number of nodes (multi-node needs --hostfile)."),
    hostfile: Optional[str] = typer.Option(None, "--hostfile", help="DeepSpeed hostfile for multi-node runs."),
    multirun: bool = typer.Option(False, "-m", "--multirun", help="Hydra multirun sweep over comma-separated values."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Train a recipe: `alignkit train recipe=dpo_smollm2 trainer.lr=5e-7` (overrides are Hydra key=value)."""
    if debug:
        os.environ["ALIGNKIT_DEBUG"] = "1"
    overrides = list(ctx.args) + _launcher_overrides(nproc, nnodes, hostfile)
    if multirun:
        from alignkit.sweep import run_sweep

        raise typer.Exit(run_sweep(overrides))
    from alignkit.run import train_from_overrides

    raise typer.Exit(train_from_overrides(overrides))


def _launcher_overrides(nproc: int, nnodes: int, hostfile: Optional[str]) -> List[str]:
    out = []
    if nproc:
        out.append(f"launcher.nproc_per_node={nproc}")
    if nnodes:
        out.append(f"launcher.nnodes={nnodes}")
    if hostfile:
        out.append(f"launcher.hostfile={hostfile}")
    return out


@app.command(hidden=True)
def worker(config_path: str) -> None:
    """Run one process of a launched job from the run directory's frozen config."""
    from alignkit.run import run_worker

    raise typer.Exit(run_worker(config_path))


@config_app.command("show", context_settings=OVERRIDES)
def config_show(ctx: typer.Context) -> None:
    """Print the resolved config for the overrides; nothing is run."""
    from omegaconf import OmegaConf

    from alignkit.config.compose import compose

    cfg = compose(ctx.args)
    typer.echo(OmegaConf.to_yaml(cfg))


@app.command()
def recipes() -> None:
    """List every preset with a one-line description."""
    from rich.table import Table

    from alignkit.config.compose import list_recipes

    table = Table("recipe", "description", box=None, pad_edge=False)
    for name, desc in list_recipes():
        table.add_row(name, desc)
    Console().print(table)


@app.command()
def env() -> None:
    """Print versions (torch, transformers, deepspeed, hydra), device and DeepSpeed accelerator."""
    from alignkit.envinfo import environment_report

    for key, value in environment_report().items():
        typer.echo(f"{key:<22} {value}")


@app.command(context_settings=OVERRIDES)
def plan(ctx: typer.Context, nproc: int = typer.Option(0, "-g", "--nproc")) -> None:
    """Batch accounting, parameter count and memory estimate per ZeRO stage, without loading weights."""
    from alignkit.plan import print_plan

    raise typer.Exit(print_plan(list(ctx.args) + _launcher_overrides(nproc, 0, None)))


@app.command("eval", context_settings=OVERRIDES)
def eval_command(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A run directory (its final/ model) or a model path/name."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline model (default: the run's starting model)."),
    limit: int = typer.Option(200, "--n", help="Held-out pairs and prompts to use (0 = all)."),
    out: Optional[str] = typer.Option(None, "--out", help="Where samples.jsonl and eval.json go."),
) -> None:
    """Answer accuracy (and the run's rewards, win-rate, preference accuracy) on the run's own held-out data,
    each with N and a 95% interval. `alignkit eval RUN_DIR`, or `alignkit eval MODEL data=FILE`; overrides
    `data=FILE`, `reward.fns=[...]`."""
    from alignkit.evaluate import format_table, run_eval

    result = run_eval(target, list(ctx.args), baseline=baseline, limit=limit, out_dir=out)
    for line in format_table(result):
        typer.echo(line)


@app.command()
def report(run_dir: str) -> None:
    """PNG plots (loss, margins, accuracy, KL, reward, lengths, lr, tokens/s) and a Markdown summary."""
    from alignkit.report import write_report

    out = write_report(run_dir)
    typer.echo(f"report written to {out}/report.md")


@app.command("sweep-report")
def sweep_report(sweep_dir: str) -> None:
    """Rebuild the results table (results.csv, results.md) of a sweep directory."""
    from pathlib import Path

    from alignkit.sweep import print_table, write_report

    rows = write_report(Path(sweep_dir))
    if not rows:
        raise UserError(f"{sweep_dir}: no job_result.json found; is this a sweep directory (runs/sweeps/...)?")
    print_table(rows, Path(sweep_dir))


def _mount_optional_apps() -> None:
    try:
        from alignkit.data.cli import data_app
    except ImportError:  # the data pipeline's CLI is optional at import time
        return
    app.add_typer(data_app, name="data", help="The shared data pipeline: validate, inspect, convert.")


_mount_optional_apps()


def main() -> None:
    try:
        app()
    except UserError as exc:
        if _debug_enabled():
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
