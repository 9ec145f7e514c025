"""What reading a source did to its rows, as lines of the data summary (training log and ``alignkit data``).

``describe_records(records, source)`` names and counts, for one source:

* every note the parsers left on records (``Record.notes``: a repeated prompt cut out, a field of a
  nested list dropped, a response without a score dropped, a lone score kept as a column ...);
  fields dropped from as many records share one line;
* the columns that are not trained on (kept in ``Record.extra``, where reward functions see them);
* records whose prompt also appears inside one of their completions (the prompt's last user turn,
  at least ``MIN_PROMPT_CHARS`` characters, found in a completion's text): the symptom of a prompt
  trained twice;
* pairs whose two scores are equal (a tie: the pair still trains as chosen > rejected);
* pairs whose chosen and rejected are the same text (no preference at all).

Each line carries an example location. Deliberately left out: printing (``cli.py``, the trainers).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from alignkit.data.record import Record, text_of

MIN_PROMPT_CHARS = 8  # shorter prompts ("Hi") appear inside answers by chance


def _prompt_text(record: Record) -> str:
    if isinstance(record.prompt, str):
        return record.prompt.strip()
    users = [m.get("content", "") for m in record.prompt if m.get("role") == "user"]
    return str(users[-1]).strip() if users else ""


def prompt_in_completion(record: Record) -> bool:
    """Whether the record's prompt (its last user turn) also appears inside one of its completions."""
    text = _prompt_text(record)
    return len(text) >= MIN_PROMPT_CHARS and any(text in text_of(c) for c in record.completions)


def describe_records(records: Iterable[Record], source: str = "") -> list[str]:
    """Summary lines for one source's records (empty when nothing needs saying)."""
    notes: Counter = Counter()
    examples: dict[str, str] = {}
    extra: Counter = Counter()
    repeated, ties, same, total = [], [], [], 0
    for record in records:
        total += 1
        for note in dict.fromkeys(record.notes):
            notes[note] += 1
            examples.setdefault(note, record.location)
        extra.update(record.extra.keys())
        if prompt_in_completion(record):
            repeated.append(record.location)
        if record.format == "paired" and record.scores is not None and record.scores[0] == record.scores[1]:
            ties.append(record.location)
        if record.format == "paired" and text_of(record.completions[0]).strip() == text_of(record.completions[1]).strip():
            same.append(record.location)
    prefix = f"{source}: " if source else ""
    dropped: dict[int, list[str]] = {}  # "dropped FIELD" notes of the same count share a line
    lines = []
    for note, count in sorted(notes.items(), key=lambda item: (-item[1], item[0])):
        if note.startswith("dropped ") and " " not in note[len("dropped "):]:
            dropped.setdefault(count, []).append(note[len("dropped "):])
        else:
            lines.append(f"{prefix}{count} of {total} records: {note} (e.g. {examples[note]})")
    for count, fields in sorted(dropped.items(), reverse=True):
        example = examples[f"dropped {fields[0]}"]
        lines.insert(0, f"{prefix}{count} of {total} records: dropped {', '.join(fields)} (e.g. {example})")
    if extra:
        names = ", ".join(f"{name}" + (f" ({count})" if count < total else "") for name, count in sorted(extra.items()))
        lines.append(f"{prefix}columns not trained on (kept for reward functions): {names}")
    if repeated:
        lines.append(f"{prefix}{len(repeated)} of {total} records have their prompt also inside a completion "
                     f"(e.g. {repeated[0]}): is the prompt part of the response column?")
    if ties:
        lines.append(f"{prefix}{len(ties)} pairs with equal chosen/rejected scores (e.g. {ties[0]}); "
                     "they still train as chosen > rejected")
    if same:
        lines.append(f"{prefix}{len(same)} pairs whose chosen and rejected are the same text (e.g. {same[0]}); "
                     "they carry no preference (hh-rlhf has such rows)")
    return lines
