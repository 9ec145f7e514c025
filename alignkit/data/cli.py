"""``alignkit data validate|inspect|convert``: the data doctor on the command line.

A Typer sub-app (``data_app``) that the main CLI mounts under ``alignkit data``. User mistakes raise
``DataError``/``UserError`` (printed by the main CLI without a traceback); ``validate`` exits 1 when
any record has a problem. Deliberately left out: the computations (``doctor.py``).
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from alignkit.data.config import COLUMN_PRESETS, FORMATS, PAIR_EXPANSIONS
from alignkit.data.doctor import CONVERT_TARGETS, InspectReport, convert_path, histogram, inspect_path, validate_path
from alignkit.errors import UserError

data_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="The shared data pipeline: validate, inspect, convert.")
console = Console(highlight=False, soft_wrap=True)

FORMAT_HELP = f"Data format: {', '.join(FORMATS)}."
COLUMNS_HELP = f"Column preset: {', '.join(COLUMN_PRESETS)}."
MAP_HELP = "Column mapping canonical=column (repeatable), e.g. --map prompt=question."


def _column_map(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        canonical, sep, column = pair.partition("=")
        if not sep or not canonical or not column:
            raise UserError(f"--map {pair!r}: expected canonical=column, e.g. --map prompt=question")
        mapping[canonical] = column
    return mapping


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"--{name} {value!r} is not valid; valid choices: {', '.join(choices)}")


@data_app.command()
def validate(
    path: str,
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    columns: str = typer.Option("trl", "--columns", help=COLUMNS_HELP),
    map: list[str] = typer.Option([], "--map", help=MAP_HELP),
) -> None:
    """Check every record; print each problem as file:line: field: expected / found."""
    _check("format", format, FORMATS)
    _check("columns", columns, COLUMN_PRESETS)
    report = validate_path(path, format, columns, _column_map(map))
    for error in report.errors:
        console.print(str(error), markup=False)
    kinds = ", ".join(f"{n} {f}" for f, n in report.formats.items()) or "none"
    line = f"{path}: {len(report.records)} valid records ({kinds}), {len(report.errors)} problems"
    if not report.records and not report.errors:
        console.print(f"{path}: expected records / found none (empty file?)", style="bold red", markup=False)
        raise typer.Exit(1)
    if report.errors:
        console.print(line + " (by field: " + ", ".join(f"{f} {n}" for f, n in report.fields.most_common()) + ")",
                      style="bold red", markup=False)
        raise typer.Exit(1)
    console.print(line, style="bold green", markup=False)


def _print_inspect(report: InspectReport) -> None:
    for sample in report.samples:
        console.rule(sample.location, style="dim")
        console.print(Text(sample.prompt, style="dim"))
        for k, runs in enumerate(sample.completions):
            console.print(Text(f"-- completion {k} (trained tokens in green)", style="italic"))
            console.print(Text.assemble(*[(text, "bold green" if trained else "dim") for text, trained in runs]))
    console.rule("statistics")
    kinds = ", ".join(f"{n} {f}" for f, n in report.formats.items())
    console.print(f"records: {report.records} ({kinds}); problems: {report.problems} "
                  f"(empty responses: {report.empty_responses})", markup=False)
    lengths = sorted(report.sequence_lengths)
    if lengths:
        pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]  # noqa: E731
        console.print(f"prompt+completion tokens: min {lengths[0]}, median {pick(0.5)}, p95 {pick(0.95)}, "
                      f"max {lengths[-1]}; prompt tokens max {max(report.prompt_lengths)}", markup=False)
        for line in histogram(lengths):
            console.print(line, markup=False)
    console.print(f"truncated at max_length={report.max_length}: {100 * report.truncation_rate:.1f}% of records",
                  markup=False)
    console.print(f"duplicate prompts: {report.duplicate_prompts}", markup=False)
    if report.mean_length_gap is not None:
        console.print(f"chosen == rejected: {report.chosen_equals_rejected}; chosen longer than rejected in "
                      f"{100 * report.chosen_longer:.1f}% of pairs (mean gap {report.mean_length_gap:+.1f} tokens)",
                      markup=False)
    if report.eval_overlap is not None:
        console.print(f"prompts shared with the eval file: {report.eval_overlap}", markup=False)


@data_app.command()
def inspect(
    path: str,
    model: str = typer.Option("tiny", "--model", help="Tokenizer: tiny, smollm2, a model folder or hub id."),
    n: int = typer.Option(3, "--n", help="Samples to render."),
    max_length: int = typer.Option(1024, "--max-length", help="Length at which to count truncation."),
    eval: Optional[str] = typer.Option(None, "--eval", help="Held-out file to check prompt overlap with."),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    columns: str = typer.Option("trl", "--columns", help=COLUMNS_HELP),
    map: list[str] = typer.Option([], "--map", help=MAP_HELP),
) -> None:
    """Render samples with trained tokens highlighted and print length and quality statistics."""
    _check("format", format, FORMATS)
    _check("columns", columns, COLUMN_PRESETS)
    from alignkit.models.load import load_tokenizer

    tokenizer = load_tokenizer(model)
    _print_inspect(inspect_path(path, tokenizer, n=n, max_length=max_length, eval_path=eval, fmt=format,
                                columns=columns, column_map=_column_map(map)))


@data_app.command()
def convert(
    source: str,
    target: str,
    to: str = typer.Option(..., "--to", help=f"Target: {', '.join(CONVERT_TARGETS)}."),
    strategy: str = typer.Option("all_pairs", "--strategy", help=f"Pairing: {', '.join(PAIR_EXPANSIONS)}."),
    min_gap: float = typer.Option(0.0, "--min-gap", help="Drop pairs whose score gap is <= this."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="binary: label = score >= threshold "
                                              "(default: above the group's mean)."),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    columns: str = typer.Option("trl", "--columns", help=COLUMNS_HELP),
    map: list[str] = typer.Option([], "--map", help=MAP_HELP),
) -> None:
    """Convert SOURCE into TARGET (JSONL, TRL column names), printing counts in/out/dropped."""
    _check("to", to, CONVERT_TARGETS)
    _check("strategy", strategy, PAIR_EXPANSIONS)
    _check("format", format, FORMATS)
    _check("columns", columns, COLUMN_PRESETS)
    stats = convert_path(source, target, to, strategy=strategy, min_gap=min_gap, threshold=threshold, fmt=format,
                         columns=columns, column_map=_column_map(map))
    console.print(f"{stats} -> {target}", markup=False)
