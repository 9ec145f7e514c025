"""Converters between record formats, each returning the new records plus what it did.

* ``listwise_to_paired``: pairs from scored lists by ``strategy`` (``all_pairs``, ``best_vs_worst``,
  ``best_vs_rest``, ``adjacent``; candidates are taken in descending score order, stable for ties);
  a pair is dropped when its scores tie or differ by ``<= min_gap``. Paired records pass through.
* ``paired_to_unpaired``: chosen -> label 1, rejected -> label 0 (pairs with chosen == rejected dropped).
* ``unpaired_to_paired``: unpaired records grouped by prompt (labels count as scores 1/0), then paired
  as listwise data.
* ``scores_to_labels``: every scored completion -> an unpaired record labelled ``score >= threshold``,
  or with no threshold ``score > mean`` of its group (its record, or for K=1 records all records of the
  same prompt); completions at the mean, and groups of one with no threshold, are dropped.
* ``group_by_prompt``: unpaired/sft records of the same prompt -> one listwise record.

``ConvertStats`` counts records in, out, and dropped by reason; ``str()`` prints one line.
Deliberately left out: file I/O (``doctor.py``) and choosing a converter for a loss (``views.py``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterable

from alignkit.data.record import Record
from alignkit.errors import DataError

STRATEGIES = ("all_pairs", "best_vs_worst", "best_vs_rest", "adjacent")


@dataclass
class ConvertStats:
    name: str
    records_in: int = 0
    records_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)  # records kept but changed, by what was done

    def __str__(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.dropped.items()))
        tail = f", dropped {sum(self.dropped.values())} ({reasons})" if self.dropped else ""
        if self.converted:
            tail += ", converted " + ", ".join(f"{count} {what}" for what, count in sorted(self.converted.items()))
        return f"{self.name}: {self.records_in} in, {self.records_out} out{tail}"


def _candidate_pairs(order: list[int], strategy: str) -> list[tuple[int, int]]:
    """Index pairs (better, worse) over indices sorted best first."""
    if strategy == "all_pairs":
        return [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]
    if strategy == "best_vs_worst":
        return [(order[0], order[-1])]
    if strategy == "best_vs_rest":
        return [(order[0], other) for other in order[1:]]
    if strategy == "adjacent":
        return list(zip(order[:-1], order[1:]))
    raise ValueError(f"unknown pair strategy {strategy!r}; valid: {STRATEGIES}")


def listwise_to_paired(
    records: Iterable[Record], strategy: str = "all_pairs", min_gap: float = 0.0
) -> tuple[list[Record], ConvertStats]:
    stats = ConvertStats(f"listwise -> paired ({strategy})")
    out: list[Record] = []
    for record in records:
        stats.records_in += 1
        if record.format == "paired":
            out.append(record)
            continue
        if record.scores is None or record.group_size < 2:
            raise DataError("expected a listwise record with scores / found none", location=record.location,
                            field="scores")
        scores = record.scores
        order = sorted(range(record.group_size), key=lambda i: -scores[i])
        for better, worse in _candidate_pairs(order, strategy):
            gap = scores[better] - scores[worse]
            if gap == 0:
                stats.dropped["tie"] += 1
            elif gap <= min_gap:
                stats.dropped[f"score gap <= {min_gap:g}"] += 1
            else:
                out.append(replace(record, format="paired", labels=None,
                                   completions=[record.completions[better], record.completions[worse]],
                                   scores=[scores[better], scores[worse]]))
    stats.records_out = len(out)
    return out, stats


def paired_to_unpaired(records: Iterable[Record]) -> tuple[list[Record], ConvertStats]:
    stats = ConvertStats("paired -> unpaired")
    out: list[Record] = []
    for record in records:
        stats.records_in += 1
        if record.format == "unpaired":
            out.append(record)
            continue
        chosen, rejected = record.completions
        if chosen == rejected:
            stats.dropped["chosen == rejected"] += 1
            continue
        for completion, label in ((chosen, 1.0), (rejected, 0.0)):
            out.append(replace(record, format="unpaired", completions=[completion], labels=[label], scores=None))
    stats.records_out = len(out)
    return out, stats


def group_by_prompt(records: Iterable[Record], stats: ConvertStats) -> list[Record]:
    """K=1 records of the same prompt -> one listwise record (scores, else labels as scores)."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        stats.records_in += 1
        groups.setdefault(record.prompt_key(), []).append(record)
    out = []
    for members in groups.values():
        if len(members) < 2:
            stats.dropped["single completion for its prompt"] += 1
            continue
        scores = []
        for member in members:
            values = member.scores if member.scores is not None else member.labels
            if values is None:
                raise DataError("expected a score or label / found neither", location=member.location, field="score")
            scores.append(values[0])
        first = members[0]
        out.append(replace(first, format="listwise", completions=[m.completions[0] for m in members],
                           scores=scores, labels=None))
    return out


def unpaired_to_paired(
    records: Iterable[Record], strategy: str = "all_pairs", min_gap: float = 0.0
) -> tuple[list[Record], ConvertStats]:
    stats = ConvertStats(f"unpaired -> paired ({strategy})")
    listwise = group_by_prompt(records, stats)
    paired, pair_stats = listwise_to_paired(listwise, strategy, min_gap)
    stats.dropped.update(pair_stats.dropped)
    stats.records_out = len(paired)
    return paired, stats


def scores_to_labels(records: Iterable[Record], threshold: float | None = None) -> tuple[list[Record], ConvertStats]:
    stats = ConvertStats("scores -> labels" + (f" (threshold {threshold:g})" if threshold is not None else ""))
    records = list(records)
    stats.records_in = len(records)
    prompt_scores: dict[str, list[float]] = {}
    for record in records:
        if record.group_size == 1 and record.scores is not None:
            prompt_scores.setdefault(record.prompt_key(), []).append(record.scores[0])
    out: list[Record] = []
    for record in records:
        if record.scores is None:
            if record.format == "paired":
                out += paired_to_unpaired([record])[0]
            elif record.labels is not None:
                out.append(record)
            else:
                raise DataError("expected scores or labels / found neither", location=record.location, field="scores")
            continue
        group = record.scores if record.group_size > 1 else prompt_scores[record.prompt_key()]
        if threshold is None and len(group) < 2:
            stats.dropped["one completion per prompt and no threshold"] += 1
            continue
        mean = sum(group) / len(group)
        for completion, score in zip(record.completions, record.scores):
            if threshold is None and score == mean:
                stats.dropped["score equals group mean"] += 1
                continue
            label = float(score >= threshold) if threshold is not None else float(score > mean)
            out.append(replace(record, format="unpaired", completions=[completion], labels=[label], scores=[score]))
    stats.records_out = len(out)
    return out, stats
