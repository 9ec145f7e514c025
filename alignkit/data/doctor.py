"""The data doctor: what ``alignkit data validate|inspect|convert`` compute (printing is in ``cli.py``).

* ``validate_path``: every record of a file checked; all problems, located; ``notes``: what reading
  did to the rows (fields dropped, prompts cut out, columns not trained on; ``summary.py``).
* ``inspect_path``: token-length statistics and a text histogram, truncation rate at a given
  length, chosen == rejected pairs, empty responses, duplicate prompts, train/eval prompt overlap,
  chosen-vs-rejected length bias, the same ``notes``, and a few samples split into (text, trained?)
  runs, rendered as training renders them (``chat_template``, ``input_template``).
* ``convert_path``: a converter applied to a file, written as JSONL in TRL's column names through a
  temporary file renamed into place (an error never leaves a partial output).

Deliberately left out: terminal formatting (``cli.py``) and model loading (the caller passes a tokenizer).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.batch import TokenizedGroup
from alignkit.data.config import DataConfig
from alignkit.data.convert import ConvertStats, scores_to_labels
from alignkit.data.formats import to_row
from alignkit.data.pipeline import read_records, summarize_errors
from alignkit.data.record import Record
from alignkit.data.summary import describe_records
from alignkit.data.tokenize import TokenizeStats, tokenize_group
from alignkit.data.views import ACCEPTS, to_view
from alignkit.errors import ConfigError, DataError, UserError

CONVERT_TARGETS = ("paired", "unpaired", "binary", "listwise")
UNLIMITED = 10**9


@dataclass
class ValidationReport:
    path: str
    records: list[Record]
    errors: list[DataError]

    @property
    def formats(self) -> Counter:
        return Counter(r.format for r in self.records)

    @property
    def fields(self) -> Counter:
        return Counter(e.field or "(row)" for e in self.errors)

    @property
    def notes(self) -> list[str]:
        """What reading did to the rows: fields dropped, prompts cut, columns not trained on (summary.py)."""
        return describe_records(self.records)


def validate_path(path: str, fmt: str = "auto", columns: str = "trl",
                  column_map: dict[str, str] | None = None, *, split: str | None = None,
                  subset: str | None = None) -> ValidationReport:
    records, errors = read_records(path, fmt, columns, column_map, split, subset)
    return ValidationReport(path, records, errors)


@dataclass
class Sample:
    location: str
    prompt: str
    completions: list[list[tuple[str, bool]]]  # per completion, runs of (text, trained?)
    tags: list[str] = field(default_factory=list)  # per completion: chosen/rejected, its score or label


def completion_tags(record: Record) -> list[str]:
    """What each completion of a record is: ``chosen, score 8.5`` / ``score -2`` / ``desirable``."""
    tags = []
    for k in range(len(record.completions)):
        parts = [("chosen", "rejected")[k]] if record.format == "paired" and k < 2 else []
        if record.scores is not None and k < len(record.scores):
            parts.append(f"score {record.scores[k]:g}")
        if record.labels is not None and k < len(record.labels):
            parts.append("desirable" if record.labels[k] else "undesirable")
        tags.append(", ".join(parts))
    return tags


@dataclass
class InspectReport:
    path: str
    records: int
    problems: int
    formats: Counter
    sequence_lengths: list[int]  # prompt + completion tokens, per completion
    prompt_lengths: list[int]
    max_length: int
    truncation_rate: float
    chosen_equals_rejected: int = 0
    empty_responses: int = 0
    duplicate_prompts: int = 0
    eval_overlap: int | None = None
    chosen_longer: float | None = None  # share of pairs whose chosen has more tokens
    mean_length_gap: float | None = None  # mean (chosen - rejected) tokens
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what reading did to the rows (summary.py)


def _runs(tokenizer: Any, ids: list[int], mask: list[bool]) -> list[tuple[str, bool]]:
    runs: list[tuple[str, bool]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            runs.append((tokenizer.decode(ids[start:end]), mask[start]))
            start = end
    return runs


def histogram(values: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram lines ``low-high | ████ count``."""
    if not values:
        return []
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // step for v in values)
    peak = max(counts.values())
    lines = []
    for b in range(-(-(high - low + 1) // step)):
        count = counts.get(b, 0)
        bar = "█" * round(width * count / peak)
        lines.append(f"{low + b * step:>6}-{low + (b + 1) * step - 1:<6} | {bar:<{width}} {count}")
    return lines


def inspect_path(path: str, tokenizer: Any, *, n: int = 3, max_length: int = 1024, eval_path: str | None = None,
                 fmt: str = "auto", columns: str = "trl", column_map: dict[str, str] | None = None,
                 split: str | None = None, subset: str | None = None, eval_split: str | None = None,
                 chat_template: str = "auto", input_template: str | None = None) -> InspectReport:
    records, errors = read_records(path, fmt, columns, column_map, split, subset)
    measure = DataConfig(max_length=UNLIMITED, max_prompt_length=UNLIMITED - 1, chat_template=chat_template,
                         input_template=input_template)
    groups: list[TokenizedGroup] = []
    for record in records:
        group = tokenize_group(record, tokenizer, measure, TokenizeStats())
        assert group is not None  # nothing is cut or dropped at an unlimited length
        groups.append(group)
    sequence_lengths = [len(g.prompt_ids) + len(c) for g in groups for c in g.completion_ids]
    too_long = sum(any(len(g.prompt_ids) + len(c) > max_length for c in g.completion_ids) for g in groups)
    prompt_keys = [r.prompt_key() for r in records]
    report = InspectReport(
        path=path, records=len(records), problems=len(errors), formats=Counter(r.format for r in records),
        sequence_lengths=sequence_lengths, prompt_lengths=[len(g.prompt_ids) for g in groups], max_length=max_length,
        truncation_rate=too_long / max(len(groups), 1),
        empty_responses=sum("non-empty" in e.detail for e in errors),
        duplicate_prompts=len(prompt_keys) - len(set(prompt_keys)), notes=describe_records(records),
    )
    pairs = [(r, g) for r, g in zip(records, groups) if r.format == "paired"]
    if pairs:
        report.chosen_equals_rejected = sum(r.completions[0] == r.completions[1] for r, _ in pairs)
        gaps = [len(g.completion_ids[0]) - len(g.completion_ids[1]) for _, g in pairs]
        report.mean_length_gap = sum(gaps) / len(gaps)
        report.chosen_longer = sum(gap > 0 for gap in gaps) / len(gaps)
    if eval_path is not None:
        eval_records, _ = read_records(eval_path, fmt, columns, column_map, eval_split, subset)
        report.eval_overlap = len(set(prompt_keys) & {r.prompt_key() for r in eval_records})
    for record, group in list(zip(records, groups))[:n]:
        report.samples.append(Sample(record.location, tokenizer.decode(group.prompt_ids), [
            _runs(tokenizer, ids, mask) for ids, mask in zip(group.completion_ids, group.completion_train_mask)],
            completion_tags(record)))
    return report


def write_jsonl_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows to a temporary file next to ``path``, then rename it into place (``fsutil.atomic_write``)."""
    from alignkit.models.fsutil import atomic_write

    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def convert_records(records: list[Record], to: str, *, strategy: str = "all_pairs", min_gap: float = 0.0,
                    threshold: float | None = None) -> tuple[list[Record], ConvertStats]:
    if to not in CONVERT_TARGETS:
        raise UserError(f"--to {to!r} is not a valid target; valid: {', '.join(CONVERT_TARGETS)}")
    cfg = DataConfig(pair_expansion=strategy, min_score_gap=min_gap, label_threshold=threshold)
    cfg.validate()
    if to == "binary":
        return scores_to_labels(records, threshold)
    try:
        return to_view(records, "pairwise" if to == "paired" else to, cfg)
    except ConfigError:
        found = ", ".join(sorted({r.format for r in records}))
        valid = ", ".join(ACCEPTS["pairwise" if to == "paired" else to])
        raise UserError(f"cannot convert {found} data to {to}: there is nothing to rank or label "
                        f"(valid inputs for --to {to}: {valid}).") from None


def convert_path(source: str, target: str, to: str, *, strategy: str = "all_pairs", min_gap: float = 0.0,
                 threshold: float | None = None, fmt: str = "auto", columns: str = "trl",
                 column_map: dict[str, str] | None = None, split: str | None = None,
                 subset: str | None = None) -> ConvertStats:
    """Convert a file; any problem in the input raises before the output is touched."""
    if Path(target).resolve() == Path(source).resolve():
        raise UserError(f"{target}: the output must differ from the input (the input would be overwritten).")
    records, errors = read_records(source, fmt, columns, column_map, split, subset)
    if errors:
        raise summarize_errors(errors)
    converted, stats = convert_records(records, to, strategy=strategy, min_gap=min_gap, threshold=threshold)
    write_jsonl_atomically(Path(target), [to_row(r) for r in converted])
    return stats
