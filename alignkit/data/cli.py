"""``alignkit data validate|inspect|convert``: the data doctor on the command line.

A Typer sub-app (``data_app``) that the main CLI mounts under ``alignkit data``. Each command reads
a source with the same options a training source has (``data.train[]`` entries): ``--split``,
``--subset`` (alias ``--name``), ``--format``, ``--columns``, ``--column-map`` (alias ``--map``).
``validate`` and ``inspect`` also take training's config overrides instead of a PATH
(``alignkit data validate recipe=dpo_llama3 'data.train=[{path: my.jsonl}]'``) and then read every
source that training would, with the same settings. User mistakes raise ``DataError``/``UserError``
(printed by the main CLI without a traceback); ``validate`` exits 1 when any record has a problem.
Deliberately left out: the computations (``doctor.py``).
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from alignkit.data.config import CHAT_TEMPLATES, COLUMN_PRESETS, FORMATS, PAIR_EXPANSIONS, DataConfig, SourceConfig
from alignkit.data.doctor import CONVERT_TARGETS, InspectReport, convert_path, histogram, inspect_path, validate_path
from alignkit.errors import UserError

data_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="The shared data pipeline: validate, inspect, convert.")
console = Console(highlight=False, soft_wrap=True)
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}

FORMAT_HELP = f"Data format: {', '.join(FORMATS)} (training: data.format / a source's format)."
COLUMNS_HELP = f"Column preset: {', '.join(COLUMN_PRESETS)} (training: data.columns)."
MAP_HELP = ("Column mapping canonical=column (repeatable), e.g. --column-map prompt=question "
            "(training: data.column_map={prompt: question}).")
SPLIT_HELP = ("Split of a folder or hub dataset, e.g. --split test for train.parquet + test.parquet "
              "(training: a source's split). A lone file or a glob is split 'train'.")
SUBSET_HELP = "Subset of a hub dataset or a folder with README configs: load_dataset's name, e.g. main for gsm8k."
PATH_HELP = ("A file (.jsonl, .jsonl.gz, .json, .parquet, .csv), a glob ('data/*.jsonl'), a folder or a hub name; "
             "or leave it out and give training's config overrides (recipe=..., data.train=...).")


def _column_map(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        canonical, sep, column = pair.partition("=")
        if not sep or not canonical or not column:
            raise UserError(f"--column-map {pair!r}: expected canonical=column, e.g. --column-map prompt=question")
        mapping[canonical] = column
    return mapping


def _check(name: str, value: Optional[str], choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise UserError(f"--{name} {value!r} is not valid; valid choices: {', '.join(choices)}")


def _is_override(arg: str) -> bool:
    from pathlib import Path

    return "=" in arg and not Path(arg).expanduser().exists()


def _sources(path: Optional[str], extra: list[str], options: dict) -> tuple[list[tuple[str, SourceConfig]], DataConfig,
                                                                              Optional[object]]:
    """``[(role, source)]``, the data settings and the composed config (None for a PATH).

    A PATH becomes one source with the command's options; config overrides compose training's config
    and give its ``data.train`` and ``data.eval`` sources, so the data is read exactly as training reads it.
    """
    overrides = ([path] if path is not None and _is_override(path) else []) + list(extra)
    if path is not None and not overrides:
        _check("format", options["format"], FORMATS)
        _check("columns", options["columns"], COLUMN_PRESETS)
        source = SourceConfig(path=path, split=options["split"], subset=options["subset"], format=options["format"],
                              columns=options["columns"], column_map=_column_map(options["map"]))
        return [("", source)], DataConfig(), None
    if path is not None and path not in overrides:
        if not any(_is_override(e) for e in extra):  # e.g. data/*.jsonl unquoted: the shell gave every file
            raise UserError(f"one PATH per command, and {len(extra) + 1} were given ({path!r}, {extra[0]!r}, ...): "
                            "did the shell expand a glob? Quote it, e.g. 'data/*.jsonl', to read the files as one "
                            "source.")
        raise UserError(f"give either PATH ({path!r}) or config overrides ({' '.join(extra)}), not both.")
    if not overrides:
        raise UserError("give a PATH (a file, glob, folder or hub name) or training's config overrides, "
                        "e.g. recipe=dpo_smollm2 'data.train=[{path: my.jsonl}]'.")
    given = [f"--{ {'map': 'column-map'}.get(k, k)}" for k, v in options.items() if v not in (None, [])]
    if given:
        raise UserError(f"{', '.join(given)} only go with a PATH; with config overrides set the same as data.* keys "
                        "(a source's split/subset/format/columns/column_map, or data.format/data.columns/data.column_map).")
    from omegaconf import OmegaConf

    from alignkit.config.compose import compose

    cfg = compose(overrides)
    data: DataConfig = OmegaConf.to_object(cfg.data)
    roles = [(f"data.train[{i}]", s) for i, s in enumerate(data.train)]
    roles += [(f"data.eval[{i}]", s) for i, s in enumerate(data.eval)]
    if not data.train:
        raise UserError("the config has no training source; set data.train=[{path: ...}].")
    return roles, data, cfg


def _read_options(source: SourceConfig, data: DataConfig) -> dict:
    return dict(fmt=source.format or data.format, columns=source.columns or data.columns,
                column_map={**data.column_map, **source.column_map}, split=source.split, subset=source.subset)


def _label(role: str, source: SourceConfig) -> str:
    from alignkit.data.pipeline import source_label

    return f"{role}: {source_label(source)}" if role else source_label(source)


@data_app.command(context_settings=OVERRIDES)
def validate(
    ctx: typer.Context,
    path: Optional[str] = typer.Argument(None, help=PATH_HELP, show_default=False),
    split: Optional[str] = typer.Option(None, "--split", help=SPLIT_HELP),
    subset: Optional[str] = typer.Option(None, "--subset", "--name", help=SUBSET_HELP),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP + " [default: auto]"),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP + " [default: trl]"),
    map: list[str] = typer.Option([], "--column-map", "--map", help=MAP_HELP),
) -> None:
    """Check every record; print each problem as file:line: field: expected / found."""
    options = dict(split=split, subset=subset, format=format, columns=columns, map=map)
    roles, data, _ = _sources(path, ctx.args, options)
    failed = False
    for role, source in roles:
        report = validate_path(source.path, **_read_options(source, data))
        for error in report.errors:
            console.print(str(error), markup=False)
        for note in report.notes:  # fields dropped, prompts cut out, columns not trained on (summary.py)
            console.print(note, markup=False)
        name = _label(role, source)
        kinds = ", ".join(f"{n} {f}" for f, n in report.formats.items()) or "none"
        line = f"{name}: {len(report.records)} valid records ({kinds}), {len(report.errors)} problems"
        if not report.records and not report.errors:
            console.print(f"{name}: expected records / found none (empty file?)", style="bold red", markup=False)
            failed = True
        elif report.errors:
            console.print(line + " (by field: " + ", ".join(f"{f} {n}" for f, n in report.fields.most_common())
                          + ")", style="bold red", markup=False)
            failed = True
        else:
            console.print(line, style="bold green", markup=False)
    if failed:
        raise typer.Exit(1)


def _print_inspect(report: InspectReport) -> None:
    for sample in report.samples:
        console.rule(sample.location, style="dim")
        console.print(Text(sample.prompt, style="dim"))
        for k, runs in enumerate(sample.completions):
            tag = sample.tags[k] if k < len(sample.tags) and sample.tags[k] else ""
            console.print(Text(f"-- completion {k}{' (' + tag + ')' if tag else ''} (trained tokens in green)",
                               style="italic"))
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
    for note in report.notes:  # fields dropped, prompts cut out, columns not trained on (summary.py)
        console.print(note, markup=False)


@data_app.command(context_settings=OVERRIDES)
def inspect(
    ctx: typer.Context,
    path: Optional[str] = typer.Argument(None, help=PATH_HELP, show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help="Tokenizer: tiny, smollm2, a model folder or hub id "
                                        "[default: tiny; with config overrides, the config's model]."),
    n: int = typer.Option(3, "--n", help="Samples to render."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Length at which to count truncation "
                                             "[default: 1024; with config overrides, data.max_length]."),
    eval: Optional[str] = typer.Option(None, "--eval", help="Held-out file to check prompt overlap with."),
    eval_split: Optional[str] = typer.Option(None, "--eval-split", help="Split of --eval (e.g. test of the same "
                                             "folder: PATH --eval PATH --eval-split test)."),
    split: Optional[str] = typer.Option(None, "--split", help=SPLIT_HELP),
    subset: Optional[str] = typer.Option(None, "--subset", "--name", help=SUBSET_HELP),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP + " [default: auto]"),
    columns: Optional[str] = typer.Option(None, "--columns", help=COLUMNS_HELP + " [default: trl]"),
    map: list[str] = typer.Option([], "--column-map", "--map", help=MAP_HELP),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Plain-string prompts: auto (the "
                                                "model's template when it has one), always, never (training: "
                                                "data.chat_template) [default: auto]."),
    input_template: Optional[str] = typer.Option(None, "--input-template", help="OpenRLHF's --input_template, e.g. "
                                                 "'User: {}\nAssistant: ' (with --chat-template never; training: "
                                                 "data.input_template)."),
) -> None:
    """Render samples with trained tokens highlighted and print length and quality statistics.

    With config overrides: the first training source, its prompt overlap with the first eval source.
    """
    options = dict(split=split, subset=subset, format=format, columns=columns, map=map)
    _check("chat-template", chat_template, CHAT_TEMPLATES)
    roles, data, cfg = _sources(path, ctx.args, options)
    from alignkit.models.load import load_tokenizer, load_tokenizer_for

    if cfg is not None and (chat_template is not None or input_template is not None):
        raise UserError("--chat-template/--input-template only go with a PATH; with config overrides set "
                        "data.chat_template / data.input_template.")
    if cfg is None:
        data = DataConfig(chat_template=chat_template or data.chat_template,
                          input_template=input_template if input_template is not None else data.input_template)
    train = roles[0][1]
    evaluation = next((s for role, s in roles if role.startswith("data.eval")), None)
    if cfg is not None:
        model = model or cfg.model.name_or_path
        max_length = max_length or data.max_length
        eval, eval_split = (evaluation.path, evaluation.split) if evaluation is not None else (eval, eval_split)
        console.print(f"inspecting {_label(roles[0][0], train)}" + (
            f" (eval overlap with {_label('data.eval[0]', evaluation)})" if evaluation is not None else ""),
            markup=False)
    if cfg is not None and model == cfg.model.name_or_path:
        tokenizer = load_tokenizer_for(cfg.model)  # the config's model section: gguf_file, revision, trust_remote_code
    else:
        tokenizer = load_tokenizer(model or "tiny")
    _print_inspect(inspect_path(train.path, tokenizer, n=n, max_length=max_length or 1024, eval_path=eval,
                                eval_split=eval_split, chat_template=data.chat_template,
                                input_template=data.input_template, **_read_options(train, data)))


@data_app.command()
def convert(
    source: str,
    target: str,
    to: str = typer.Option(..., "--to", help=f"Target: {', '.join(CONVERT_TARGETS)}."),
    strategy: str = typer.Option("all_pairs", "--strategy", help=f"Pairing: {', '.join(PAIR_EXPANSIONS)}."),
    min_gap: float = typer.Option(0.0, "--min-gap", help="Drop pairs whose score gap is <= this."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="binary: label = score >= threshold "
                                              "(default: above the group's mean)."),
    split: Optional[str] = typer.Option(None, "--split", help=SPLIT_HELP),
    subset: Optional[str] = typer.Option(None, "--subset", "--name", help=SUBSET_HELP),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    columns: str = typer.Option("trl", "--columns", help=COLUMNS_HELP),
    map: list[str] = typer.Option([], "--column-map", "--map", help=MAP_HELP),
) -> None:
    """Convert SOURCE into TARGET (JSONL, TRL column names), printing counts in/out/dropped."""
    _check("to", to, CONVERT_TARGETS)
    _check("strategy", strategy, PAIR_EXPANSIONS)
    _check("format", format, FORMATS)
    _check("columns", columns, COLUMN_PRESETS)
    stats = convert_path(source, target, to, strategy=strategy, min_gap=min_gap, threshold=threshold, fmt=format,
                         columns=columns, column_map=_column_map(map), split=split, subset=subset)
    console.print(f"{stats} -> {target}", markup=False)
