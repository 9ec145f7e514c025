"""Turning records of any format into what a loss view consumes.

``to_view(records, view, cfg)`` with view in ``sft``, ``pairwise``, ``unpaired``, ``listwise``,
``scalar``, ``stepwise``, ``prompt`` (``rollout`` is an alias of ``prompt``: online runners sample the completions):

============  ==========================================================================
view          accepted formats and what happens
============  ==========================================================================
sft           sft as-is; paired -> chosen; listwise -> best response; unpaired -> label 1 only
pairwise      paired as-is; listwise -> pairs by ``cfg.pair_expansion`` and ``cfg.min_score_gap``;
              unpaired -> grouped by prompt, then paired
unpaired      unpaired (scores -> labels by ``cfg.label_threshold``); paired -> chosen 1 / rejected 0
              (even when the pair has scores);
              listwise -> scores -> labels
listwise      listwise as-is; paired -> K=2 with scores [1, 0]; unpaired -> grouped by prompt
scalar        K=1 with a scalar reward in ``scores`` (DRO): unpaired with a ``score`` -> that score
              (also when it has a label); unpaired with a label only -> reward 1.0 (desirable) /
              0.0 (undesirable); paired -> chosen 1.0 / rejected 0.0 (the pair's verdict, even
              when the pair has scores, as the unpaired view); listwise -> one record per response
              with its score
stepwise      stepwise as-is (a process reward model's step labels, ``runner=prm``); no other format
              has step labels, and stepwise data feeds no other view
prompt        every format -> its prompt (K=0), extra columns kept
============  ==========================================================================

A format that cannot feed the view (e.g. prompt-only data under a DPO loss) raises ``ConfigError``
before anything is tokenized. Deliberately left out: how each conversion works (``convert.py``).
"""

from __future__ import annotations

from dataclasses import replace

from alignkit.data.config import DataConfig
from alignkit.data.convert import (
    ConvertStats,
    group_by_prompt,
    listwise_to_paired,
    paired_to_unpaired,
    scores_to_labels,
    unpaired_to_paired,
)
from alignkit.data.record import Record
from alignkit.errors import ConfigError, DataError

DATA_VIEWS = ("sft", "pairwise", "unpaired", "listwise", "scalar", "stepwise", "prompt", "rollout")
ACCEPTS = {
    "sft": ("sft", "paired", "listwise", "unpaired"),
    "pairwise": ("paired", "listwise", "unpaired"),
    "unpaired": ("unpaired", "paired", "listwise"),
    "listwise": ("listwise", "paired", "unpaired"),
    "scalar": ("unpaired", "paired", "listwise"),
    "stepwise": ("stepwise",),
    "prompt": ("prompt", "sft", "paired", "unpaired", "listwise"),
}


def _to_sft(records: list[Record]) -> tuple[list[Record], ConvertStats]:
    stats = ConvertStats("-> sft", records_in=len(records))
    out = []
    for record in records:
        if record.format == "sft":
            out.append(record)
        elif record.format in ("paired", "listwise"):
            best = 0 if record.format == "paired" else max(range(record.group_size), key=lambda i: record.scores[i])
            out.append(replace(record, format="sft", completions=[record.completions[best]], scores=None, labels=None))
        elif record.labels is not None and record.labels[0] >= 1.0:
            out.append(replace(record, format="sft", scores=None, labels=None))
        else:
            stats.dropped["undesirable or unlabelled completion"] += 1
    stats.records_out = len(out)
    return out, stats


def _to_listwise(records: list[Record]) -> tuple[list[Record], ConvertStats]:
    stats = ConvertStats("-> listwise", records_in=len(records))
    singles = [r for r in records if r.format == "unpaired"]
    out = [r for r in records if r.format == "listwise"]
    out += [replace(r, format="listwise", scores=[1.0, 0.0]) for r in records if r.format == "paired"]
    if singles:
        grouped = ConvertStats("group by prompt")
        out += group_by_prompt(singles, grouped)
        stats.dropped.update(grouped.dropped)
    stats.records_out = len(out)
    return out, stats


def _to_pairwise(records: list[Record], cfg: DataConfig) -> tuple[list[Record], ConvertStats]:
    singles = [r for r in records if r.format == "unpaired"]
    others = [r for r in records if r.format != "unpaired"]
    out, stats = listwise_to_paired(others, cfg.pair_expansion, cfg.min_score_gap)
    if singles:
        paired, single_stats = unpaired_to_paired(singles, cfg.pair_expansion, cfg.min_score_gap)
        out += paired
        stats.records_in += single_stats.records_in
        stats.dropped.update(single_stats.dropped)
        stats.records_out = len(out)
    return out, stats


def _to_unpaired(records: list[Record], cfg: DataConfig) -> tuple[list[Record], ConvertStats]:
    labelled = [r for r in records if r.labels is not None]
    paired = [r for r in records if r.format == "paired"]
    scored = [r for r in records if r.labels is None and r.format != "paired"]
    out, stats = scores_to_labels(scored, cfg.label_threshold)
    if paired:  # the pair's own verdict wins over its scores: chosen desirable, rejected not
        unpaired, pair_stats = paired_to_unpaired(paired)
        out += unpaired
        stats.dropped.update(pair_stats.dropped)
    stats.records_in = len(records)
    out += labelled
    stats.records_out = len(out)
    return out, stats


def _to_scalar(records: list[Record]) -> tuple[list[Record], ConvertStats]:
    """Each completion alone with its reward in ``scores`` (see the table above); counts what was converted."""
    stats = ConvertStats("-> scalar rewards", records_in=len(records))
    out: list[Record] = []
    for record in records:
        if record.format == "paired":
            singles, pair_stats = paired_to_unpaired([record])
            stats.dropped.update(pair_stats.dropped)
            stats.converted["paired -> labels 1/0 as rewards"] += 1
            out += [replace(r, scores=list(r.labels)) for r in singles]
        elif record.format == "listwise":
            stats.converted["listwise -> one record per response"] += 1
            out += [replace(record, format="unpaired", completions=[c], scores=[s], labels=None)
                    for c, s in zip(record.completions, record.scores)]
        elif record.scores is not None:
            out.append(record)
        elif record.labels is not None:
            stats.converted["label -> reward 1.0/0.0"] += 1
            out.append(replace(record, scores=list(record.labels)))
        else:  # the parser refuses such a row; a record built in code may still arrive here
            raise DataError("expected a scalar reward (a score or a label) / found neither",
                            location=record.location, field="score")
    stats.records_out = len(out)
    return out, stats


RESPONSE_LIKE = ("response", "output", "answer", "target", "solution", "chosen_response")  # columns a prompt
# record may carry that are responses under another name (prompt/response SFT data)


def to_view(records: list[Record], view: str, cfg: DataConfig) -> tuple[list[Record], ConvertStats]:
    """Records of any format -> records the ``view`` consumes, plus what was converted or dropped."""
    if view == "rollout":
        view = "prompt"
    if view not in ACCEPTS:
        raise ConfigError(f"unknown data view {view!r}; valid views: {', '.join(DATA_VIEWS)}")
    wrong = sorted({r.format for r in records} - set(ACCEPTS[view]))
    if wrong:
        example = next(r for r in records if r.format in wrong)
        unread = [c for c in RESPONSE_LIKE if c in example.extra] if example.format == "prompt" else []
        advice = (f" Its column {unread[0]!r} is not read as a response: map it, e.g. "
                  f"data.column_map={{completion: {unread[0]}}}." if unread else "")
        raise ConfigError(
            f"{', '.join(wrong)} data (e.g. {example.location}) cannot feed a loss that consumes {view} data; "
            f"it accepts {', '.join(ACCEPTS[view])}.{advice} Pick a loss that fits the data or convert the data "
            "first (alignkit data convert)."
        )
    if view == "sft":
        return _to_sft(records)
    if view == "pairwise":
        return _to_pairwise(records, cfg)
    if view == "unpaired":
        return _to_unpaired(records, cfg)
    if view == "listwise":
        return _to_listwise(records)
    if view == "scalar":
        return _to_scalar(records)
    if view == "stepwise":
        return list(records), ConvertStats("-> stepwise", records_in=len(records), records_out=len(records))
    out = [replace(r, format="prompt", completions=[], scores=None, labels=None) for r in records]
    return out, ConvertStats("-> prompt", records_in=len(records), records_out=len(out))
