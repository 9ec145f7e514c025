"""From a ``DataConfig`` to tokenized train/eval groups.

``prepare_data(cfg, view, tokenizer)`` reads every source, parses and validates every row (bad rows
raise one located ``DataError`` before any model is loaded, or with ``on_error=skip`` are skipped
and counted), splits eval off (separate sources, or a seeded ``eval_fraction`` of prompts), applies
source weights, converts to the loss view, tokenizes, and caches the result on disk when
``cache_dir`` is set. The cache key covers the sources' bytes, the tokenizer (vocabulary, special
tokens, chat template), every data setting that changes the output, and the view; any change
rebuilds. Cache files (``alignkit.data.cache``: safetensors + JSON, never pickle) are written
atomically and carry their key and a checksum; a damaged or planted file is reported (in the
stats line), moved aside and rebuilt.

Batching is the trainers' (``alignkit.trainers.common.step_groups`` / ``micro_chunks`` /
``collate_groups``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data import cache as data_cache
from alignkit.data.batch import TokenizedGroup
from alignkit.data.config import DataConfig, SourceConfig
from alignkit.data.convert import ConvertStats
from alignkit.data.formats import parse_row
from alignkit.data.llamafactory import apply_dataset_info, fingerprint_paths
from alignkit.data.record import Record
from alignkit.data.sources import apply_weight, fingerprint_source, iter_rows, split_by_key
from alignkit.data.summary import describe_records
from alignkit.data.tokenize import TokenizeStats, adds_bos, tokenize_group
from alignkit.data.views import to_view
from alignkit.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 2
MAX_REPORTED_ERRORS = 20


@dataclass
class DataStats:
    """What the pipeline did, printed by the trainer (``str``) and by ``alignkit data`` commands."""

    sources: dict[str, int] = field(default_factory=dict)  # path -> records read
    skipped: int = 0  # bad rows skipped with on_error=skip
    skipped_examples: list[str] = field(default_factory=list)
    convert: ConvertStats | None = None
    tokenize: TokenizeStats = field(default_factory=TokenizeStats)
    train_groups: int = 0
    eval_groups: int = 0
    cached: bool = False
    cache_note: str = ""  # a cache file found damaged and rebuilt, or data the cache cannot carry
    eval_set: str = ""  # where the eval records come from (or that there are none), with their count
    notes: list[str] = field(default_factory=list)  # per source: fields dropped, prompts cut, columns unused

    def __str__(self) -> str:
        parts = [f"{self.train_groups} train / {self.eval_groups} eval groups from "
                 + ", ".join(f"{Path(p).name} ({n})" for p, n in self.sources.items())]
        if self.eval_set:
            parts.append(self.eval_set)
        parts += getattr(self, "notes", [])  # what reading the sources did (summary.py)
        if self.convert is not None and (self.convert.dropped or self.convert.converted
                                         or self.convert.records_in != self.convert.records_out):
            parts.append(str(self.convert))
        tok = self.tokenize
        parts.append(f"truncated {100 * tok.truncation_rate:.1f}% of groups (prompts cut {tok.prompts_truncated}, "
                     f"completions cut {tok.completions_truncated})")
        if getattr(tok, "steps_with_separator", 0):
            parts.append(f"{tok.steps_with_separator} steps contain data.step_separator (each trained as one step "
                         "with one label; the prm reward would split such a text into several steps)")
        if tok.dropped:
            parts.append("dropped " + ", ".join(f"{n} {why}" for why, n in sorted(tok.dropped.items())))
        if self.skipped:
            parts.append(f"skipped {self.skipped} bad rows (first: {self.skipped_examples[0]})")
        if self.cached:
            parts.append("from cache")
        if self.cache_note:
            parts.append(self.cache_note)
        return "; ".join(parts)


@dataclass
class PreparedData:
    train: list[TokenizedGroup]
    eval: list[TokenizedGroup]
    stats: DataStats


# ---------------------------------------------------------------- reading


def read_records(
    path: str, fmt: str = "auto", columns: str = "trl", column_map: dict[str, str] | None = None,
    split: str | None = None, subset: str | None = None,
) -> tuple[list[Record], list[DataError]]:
    """Every valid record of one source plus every problem found (nothing raised for bad rows).

    With ``fmt="auto"`` the first readable row fixes the format of the whole source, so a later row
    missing a field is reported instead of silently read as another format.
    """
    path, columns, column_map, split, subset = apply_dataset_info(path, columns, column_map, split, subset)
    records: list[Record] = []
    errors: list[DataError] = []
    for raw in iter_rows(path, split, subset):
        if raw.error is not None:
            errors.append(raw.error)
            continue
        try:
            record = parse_row(raw, fmt, columns, column_map)
        except DataError as error:
            errors.append(error)
            continue
        fmt = record.format if fmt == "auto" else fmt
        records.append(record)
    return records, errors


def summarize_errors(errors: list[DataError]) -> DataError:
    """One ``DataError`` standing for all: the first, plus how many more and how to list them."""
    first = errors[0]
    more = len(errors) - 1
    tail = (f" ({more} more problem{'s' if more > 1 else ''} in the data: list them all with "
            "`alignkit data validate PATH`, or set data.on_error=skip to skip bad rows)") if more else ""
    return DataError(first.detail + tail, location=first.location, field=first.field)


def _source_records(source: SourceConfig, cfg: DataConfig, stats: DataStats) -> list[Record]:
    records, errors = read_records(
        source.path, source.format or cfg.format, source.columns or cfg.columns,
        {**cfg.column_map, **source.column_map}, source.split, source.subset,
    )
    if errors and cfg.on_error == "raise":
        raise summarize_errors(errors)
    stats.skipped += len(errors)
    stats.skipped_examples += [str(e) for e in errors[: MAX_REPORTED_ERRORS - len(stats.skipped_examples)]]
    if not records:
        raise DataError("expected at least one valid record / found none", location=source.path)
    if cfg.max_records is not None:
        records = records[: cfg.max_records]
    name = source_label(source)
    stats.sources[name] = stats.sources.get(name, 0) + len(records)
    stats.notes += describe_records(records, Path(name).name)
    return records


def load_split_records(cfg: DataConfig, stats: DataStats) -> tuple[list[Record], list[Record]]:
    """(train, eval) records: weights applied to train only; eval from its sources or a held-out fraction."""
    if not cfg.train:
        raise DataError("expected at least one training source / found none; set data.train=[{path: ...}]",
                        location="data.train")
    rng = random.Random(cfg.seed)
    train: list[Record] = []
    held_out: list[Record] = []
    for source in cfg.train:
        records = _source_records(source, cfg, stats)
        if not cfg.eval and cfg.eval_fraction > 0:
            records, held = split_by_key(records, Record.prompt_key, cfg.eval_fraction, cfg.seed)
            held_out += held
        train += apply_weight(records, source.weight, rng)
    for source in cfg.eval:
        held_out += _source_records(source, cfg, stats)
    stats.eval_set = describe_eval_set(cfg, held_out)
    return train, held_out


def source_label(source: SourceConfig) -> str:
    """``path``, or ``path (subset S, split T)`` naming what the source names (no square brackets: the
    trainer prints with rich markup, which would drop them)."""
    inner = ", ".join(f"{k} {v}" for k, v in (("subset", source.subset), ("split", source.split)) if v)
    return f"{source.path} ({inner})" if inner else source.path


def describe_eval_set(cfg: DataConfig, held_out: list[Record]) -> str:
    """One sentence for the data summary: where the eval records come from and how many, or that there are none."""
    prompts = len({r.prompt_key() for r in held_out})
    count = f"{len(held_out)} record{'s' * (len(held_out) != 1)} ({prompts} prompt{'s' * (prompts != 1)})"
    if cfg.eval:
        names = ", ".join(source_label(s) for s in cfg.eval)
        return f"eval set: {count} from data.eval ({names})"
    if cfg.eval_fraction > 0 and held_out:
        return (f"eval set: {count} held out of data.train by prompt "
                f"(data.eval_fraction={cfg.eval_fraction:g}, data.seed={cfg.seed}; not trained on)")
    why = (f"data.eval_fraction={cfg.eval_fraction:g} held out nothing (a source needs 2+ prompts)"
           if cfg.eval_fraction > 0 else "data.eval is empty and data.eval_fraction=0")
    return (f"no eval set ({why}): the run is not evaluated; give data.eval=[{{path: FILE}}] or "
            "data.eval_fraction=0.05")


# ---------------------------------------------------------------- tokenizing and caching


def _tokenize_all(records: list[Record], tokenizer: Any, cfg: DataConfig, stats: DataStats) -> list[TokenizedGroup]:
    groups = []
    memo: dict = {}
    for record in records:
        try:
            group = tokenize_group(record, tokenizer, cfg, stats.tokenize, memo)
        except DataError as error:
            if cfg.on_error == "raise":
                raise
            stats.tokenize.dropped["rejected by the chat template"] += 1
            stats.skipped_examples.append(str(error))
            continue
        if group is not None:
            groups.append(group)
    return groups


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what changes token ids: vocabulary, special tokens, chat template, BOS behaviour."""
    blob = json.dumps(
        {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "template": getattr(tokenizer, "chat_template", None),
            "adds_bos": adds_bos(tokenizer),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(cfg: DataConfig, view: str, tokenizer: Any) -> str:
    settings = dataclasses.asdict(cfg)
    for batching_only in ("cache_dir", "layout", "max_tokens_per_row"):
        settings.pop(batching_only)
    sources = [fingerprint_source(p) for s in [*cfg.train, *cfg.eval] for p in fingerprint_paths(s.path)]
    blob = json.dumps({"version": CACHE_VERSION, "settings": settings, "sources": sources, "view": view,
                       "tokenizer": tokenizer_fingerprint(tokenizer)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def prepare_data(cfg: DataConfig, view: str, tokenizer: Any) -> PreparedData:
    """Config -> tokenized train/eval groups for a loss consuming ``view`` (see the module docstring)."""
    cfg.validate()
    key = cache_key(cfg, view, tokenizer) if cfg.cache_dir else ""
    cache_file = data_cache.cache_path(cfg.cache_dir, key) if cfg.cache_dir else None
    note = ""
    if cache_file is not None:
        try:
            found = data_cache.read_cache(cache_file, key)
        except data_cache.CacheDamaged as damaged:
            moved = data_cache.move_aside(cache_file)
            note = f"data cache {cache_file} was damaged ({damaged}): moved aside to {moved} and rebuilt"
            log.warning(note)
            found = None
        if found is not None:
            train, evaluation, stats = found
            stats.cached = True
            return PreparedData(train, evaluation, stats)
    stats = DataStats(cache_note=note)
    train_records, eval_records = load_split_records(cfg, stats)
    train_records, stats.convert = to_view(train_records, view, cfg)
    eval_records, _ = to_view(eval_records, view, cfg)
    train = _tokenize_all(train_records, tokenizer, cfg, stats)
    evaluation = _tokenize_all(eval_records, tokenizer, cfg, stats)
    if not train:
        raise DataError(f"expected training examples / found none left after conversion and tokenization ({stats})",
                        location=cfg.train[0].path)
    stats.train_groups, stats.eval_groups = len(train), len(evaluation)
    prepared = PreparedData(train, evaluation, stats)
    if cache_file is not None:
        try:
            data_cache.write_cache(cache_file, key, train, evaluation, dataclasses.replace(stats, cache_note=""))
        except data_cache.CacheUnsupported as unsupported:
            stats.cache_note = f"not cached: {unsupported}"
            log.warning("data.cache_dir: %s", stats.cache_note)
    return prepared
