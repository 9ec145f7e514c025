"""Raw rows -> canonical ``Record``s: format detection, located validation, what each record means.

A row first goes through its column layout (``layouts.py``: TRL, OpenRLHF, LLaMA-Factory, NeMo and
the published datasets hh-rlhf, UltraFeedback, Nectar, orca pairs), then through the parser of its
format: ``sft``, ``paired``, ``unpaired``, ``listwise``, ``prompt``, ``stepwise`` (see ``record.py``); ``auto``
detects it from the first row of a source. Optional scores: paired ``chosen_score``/``rejected_score``
(or ``score_chosen``/``score_rejected``) or ``margin`` (becomes scores [margin, 0]); unpaired
``score`` instead of ``label``. Columns not used go to ``Record.extra`` (reward functions see them).

What the parsers decide, following the source toolkits (each case is noted on the record, and the
data summary counts it, see ``summary.py``):

* A string ``prompt`` with ``chosen``/``rejected`` conversations that repeat it (HuggingFaceH4/
  ultrafeedback_binarized): the conversations' shared leading turns are the prompt and are cut out
  of the completions (TRL's ``maybe_extract_prompt`` rule). A message-list prompt repeated at the
  start of both conversations, or of a ``completion`` conversation (argilla/kto-mix-15k), is cut
  out the same way.
* ``messages`` + ``label`` (LLaMA-Factory's and TRL's KTO rows as conversations): the last turn is
  the completion.
* ``label``/``score`` with a prompt and no completion: prompt-only data; the value stays a column
  (OpenRLHF's ``label_key`` for rule rewards).
* A lone ``chosen_score`` (no ``rejected_score``): kept as a column, not as pair scores.
* Listwise lists with a missing score (``null``, ``NaN``, ``"N/A"``, ``""``, or an item without the
  field) or an empty response: that response is dropped and counted; fewer than 2 left is an error.
* Stepwise rows (TRL's stepwise supervision: ``prompt``, ``completions`` = the steps, ``labels`` = a
  boolean per step): a label list longer or shorter than the steps, an empty step or a label that is
  no boolean is an error; the steps stay strings (a ``system`` column goes into the prompt only).
* Prompt-only detection that would leave a list of candidate responses unread (Nectar's
  ``answers``) fails, naming the options, instead of silently dropping them.

Every problem raises ``DataError`` located ``file:line`` with the field and "expected / found".
Deliberately left out: converting between formats (``convert.py``) and tokens (``tokenize.py``).
"""

from __future__ import annotations

import math
from typing import Any

from alignkit.data.config import FORMATS
from alignkit.data.layouts import fail, hint, normalize, response_lists
from alignkit.data.record import Record, Text
from alignkit.data.sources import RawRow, describe

ROLES = ("system", "user", "assistant", "tool")
CANONICAL = ("prompt", "chosen", "rejected", "completion", "label", "score", "messages", "responses",
             "scores", "ranks", "margin", "chosen_score", "rejected_score", "completions", "labels")
MISSING_SCORES = ("", "n/a", "na", "none", "null")


def detect_format(row: dict[str, Any]) -> str | None:
    """The format a canonical row looks like, or None."""
    if "completions" in row and "labels" in row:
        return "stepwise"
    if "chosen" in row or "rejected" in row:
        return "paired"
    if "responses" in row or "ranks" in row or "scores" in row:
        return "listwise"
    if ("label" in row or "score" in row) and ("completion" in row or "messages" in row):
        return "unpaired"
    if "messages" in row or "completion" in row:
        return "sft"
    if "prompt" in row:
        return "prompt"
    return None


# ---------------------------------------------------------------- field checks


def _messages(value: list[Any], location: str, field: str) -> list[dict[str, Any]]:
    if not value:
        raise fail(location, field, "a non-empty list of messages", "an empty list")
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise fail(location, where, "a message {role, content}", describe(message))
        if message.get("role") not in ROLES:
            raise fail(location, f"{where}.role", f"one of {', '.join(ROLES)}", describe(message.get("role")))
        if not isinstance(message.get("content"), str):
            raise fail(location, f"{where}.content", "a string", describe(message.get("content")))
    return value


def _text(row: dict[str, Any], field: str, location: str, *, response: bool = False, value: Any = None) -> Text:
    if value is None:
        if field not in row:
            raise fail(location, field, f"a value in column {field!r}", f"no such column (columns: {sorted(row)})")
        if row[field] is None:
            raise fail(location, field, f"a value in column {field!r}", "null")
        value = row[field]
    if isinstance(value, str):
        if not value.strip():
            what = "response" if response else "text"
            raise fail(location, field, f"a non-empty {what}", "an empty string")
        return value
    if isinstance(value, list):
        messages = _messages(value, location, field)
        if response and not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
            raise fail(location, field, "a non-empty assistant response", "no assistant text")
        return messages
    raise fail(location, field, "a string or a list of messages", describe(value))


def _number(value: Any, location: str, field: str) -> float:
    if value is None:
        raise fail(location, field, "a number", "null (a missing value)")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(location, field, "a number", describe(value)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise fail(location, field, "a number", describe(value))
    return float(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and value.strip().lower() in MISSING_SCORES)


def _label(value: Any, location: str, field: str = "label") -> float:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return 1.0 if value.strip().lower() in ("true", "1") else 0.0
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return float(value)
    raise fail(location, field, "a boolean (true/false or 1/0)", describe(value))


def _align(prompt: Text, completions: list[Text]) -> tuple[Text, list[Text]]:
    """Make prompt and completions all strings or all messages."""
    if isinstance(prompt, list) or any(isinstance(c, list) for c in completions):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    return prompt, completions


def _rest(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used}


# ---------------------------------------------------------------- one parser per format


def _split_conversation(messages: list[dict[str, Any]], location: str, field: str, last: bool) -> tuple[list, list]:
    """A conversation -> (prompt, completion) at its first (SFT) or last (KTO) assistant turn."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise fail(location, field, "at least one assistant message", "none")
    cut = turns[-1] if last else turns[0]
    if cut == 0:
        raise fail(location, f"{field}[0].role", "a user or system message before the first assistant message",
                   "assistant")
    if last and cut != len(messages) - 1:
        raise fail(location, field, "a conversation ending in the assistant turn that is labelled",
                   f"{messages[-1]['role']} last")
    return messages[:cut], messages[cut:]


def _parse_sft(row: dict[str, Any], location: str, notes: list[str]) -> Record:
    if "messages" in row and "completion" not in row:
        messages = _text(row, "messages", location, response=True)
        if isinstance(messages, str):
            raise fail(location, "messages", "a list of messages", describe(messages))
        prompt, completion = _split_conversation(messages, location, "messages", last=False)
        return Record("sft", prompt, [completion], extra=_rest(row, ("messages",)), location=location)
    prompt, completion = _repeated_in_completion(_text(row, "prompt", location),
                                                 _text(row, "completion", location, response=True), notes)
    prompt, completions = _align(prompt, [completion])
    return Record("sft", prompt, completions, extra=_rest(row, ("prompt", "completion")), location=location)


def _shared_turns(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> int:
    """Leading messages both conversations share, cut back before the first differing assistant turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    return shared


EARLIER_TURN_NOTE = ("chosen/rejected differ before their last turn: the later user turns are trained inside the "
                     "completions (TRL's shared-prefix rule)")


def _implicit_prompt(chosen: Text, rejected: Text, location: str, row: dict[str, Any],
                     notes: list[str]) -> tuple[Text, Text, Text]:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise fail(location, "prompt", "a prompt column (or chosen/rejected as conversations sharing a prefix, or "
                   "Human:/Assistant: transcripts)", "no prompt column and plain-string responses" + hint(row))
    shared = _shared_turns(chosen, rejected)
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise fail(location, "chosen", "conversations sharing a non-empty prompt prefix then differing",
                   f"{shared} shared leading messages")
    if any(m.get("role") == "user" for m in chosen[shared:] + rejected[shared:]):
        notes.append(EARLIER_TURN_NOTE)
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _last_user(messages: list[dict[str, Any]]) -> str | None:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)


def _repeated_prompt(prompt: Text, chosen: Text, rejected: Text, notes: list[str]) -> tuple[Text, Text, Text]:
    """Cut a prompt that the chosen/rejected conversations repeat (see the module docstring)."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return prompt, chosen, rejected
    shared = _shared_turns(chosen, rejected)
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        return prompt, chosen, rejected
    turns = chosen[:shared]
    if isinstance(prompt, list):
        if prompt[-shared:] == turns:  # the conversations repeat the prompt's last turns
            notes.append("prompt repeated at the start of chosen/rejected: cut out")
            return prompt, chosen[shared:], rejected[shared:]
        if turns[-len(prompt):] == prompt:  # they repeat the whole prompt after more context (a system turn)
            notes.append("prompt repeated at the start of chosen/rejected: cut out")
            return turns, chosen[shared:], rejected[shared:]
        return prompt, chosen, rejected
    if _last_user(turns) is None:
        return prompt, chosen, rejected
    if (_last_user(turns) or "").strip() == prompt.strip():
        notes.append("prompt repeated at the start of chosen/rejected: cut out")
    else:
        notes.append("prompt column differs from the conversations' shared turns: the turns were used (TRL's rule)")
    return turns, chosen[shared:], rejected[shared:]


def _repeated_in_completion(prompt: Text, completion: Text, notes: list[str]) -> tuple[Text, Text]:
    """Cut the prompt out of a completion conversation that starts by repeating it (argilla/kto-mix-15k)."""
    if not isinstance(completion, list):
        return prompt, completion
    first = next((i for i, m in enumerate(completion) if m["role"] == "assistant"), 0)
    lead = completion[:first]
    if not lead or _last_user(lead) is None:
        return prompt, completion
    if isinstance(prompt, str):
        same = (_last_user(lead) or "").strip() == prompt.strip()
    else:
        same = prompt[-len(lead):] == lead or lead[-len(prompt):] == prompt
    if not same:
        return prompt, completion
    notes.append("prompt repeated at the start of the completion: cut out")
    longer = lead if isinstance(prompt, str) or len(lead) > len(prompt) else prompt
    return longer, completion[first:]


def _pair_scores(row: dict[str, Any], location: str, notes: list[str]) -> list[float] | None:
    has_chosen, has_rejected = "chosen_score" in row, "rejected_score" in row
    if has_chosen and has_rejected:
        if _is_missing(row["chosen_score"]) and _is_missing(row["rejected_score"]):
            notes.append("pair scores missing: pair kept without scores")
            return None
        return [_number(row.get("chosen_score"), location, "chosen_score"),
                _number(row.get("rejected_score"), location, "rejected_score")]
    if has_chosen or has_rejected:
        notes.append(f"{'chosen_score' if has_chosen else 'rejected_score'} without its partner: kept as a column, "
                     "not as pair scores")
        return None
    if "margin" in row:
        return [_number(row["margin"], location, "margin"), 0.0]
    return None


def _parse_paired(row: dict[str, Any], location: str, notes: list[str]) -> Record:
    chosen = _text(row, "chosen", location, response=True)
    rejected = _text(row, "rejected", location, response=True)
    if "prompt" in row:
        prompt, chosen, rejected = _repeated_prompt(_text(row, "prompt", location), chosen, rejected, notes)
    else:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected, location, row, notes)
    prompt, completions = _align(prompt, [chosen, rejected])
    scores = _pair_scores(row, location, notes)
    used = ("prompt", "chosen", "rejected", "margin") + (("chosen_score", "rejected_score") if scores else ())
    return Record("paired", prompt, completions, scores=scores, extra=_rest(row, used), location=location)


def _parse_unpaired(row: dict[str, Any], location: str, notes: list[str]) -> Record:
    if "prompt" not in row and "messages" in row and "completion" not in row:
        messages = _text(row, "messages", location, response=True)
        if isinstance(messages, str):
            raise fail(location, "messages", "a list of messages", describe(messages))
        prompt, completion = _split_conversation(messages, location, "messages", last=True)
        used: tuple[str, ...] = ("messages", "label", "score")
        completions: list[Text] = [completion]
    else:
        prompt, completion = _repeated_in_completion(_text(row, "prompt", location),
                                                     _text(row, "completion", location, response=True), notes)
        prompt, completions = _align(prompt, [completion])
        used = ("prompt", "completion", "label", "score")
    labels = [_label(row["label"], location)] if "label" in row else None
    scores = [_number(row["score"], location, "score")] if "score" in row else None
    if labels is None and scores is None:
        raise fail(location, "label", "a label (or a score) column", f"neither (columns: {sorted(row)})")
    return Record("unpaired", prompt, completions, scores=scores, labels=labels, extra=_rest(row, used),
                  location=location)


def _listed(row: dict[str, Any], field: str, location: str) -> list[Any]:
    values = row[field]
    if not isinstance(values, list):
        raise fail(location, field, "a list (one value per response)", describe(values))
    return values


def _empty(response: Any) -> bool:
    """A listwise candidate with nothing to train: null, blank text, or messages with no assistant text."""
    if response is None or (isinstance(response, str) and not response.strip()):
        return True
    return isinstance(response, list) and all(isinstance(m, dict) for m in response) and not any(
        str(m.get("content") or "").strip() for m in response if m.get("role") == "assistant")


def _parse_listwise(row: dict[str, Any], location: str, notes: list[str]) -> Record:
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise fail(location, "responses", "a list of at least 2 responses", describe(responses))
    field = "scores" if "scores" in row else "ranks" if "ranks" in row else None
    if field is None:
        raise fail(location, "scores", "a scores or ranks column", f"neither (columns: {sorted(row)})")
    values = _listed(row, field, location)
    if len(values) != len(responses):
        raise fail(location, field, f"{len(responses)} {field} (one per response)", f"{len(values)}")
    kept = [i for i, v in enumerate(values) if not _is_missing(v) and not _empty(responses[i])]
    if len(kept) < len(responses):
        notes += [f"response without a score dropped ({field}[{i}])" if _is_missing(values[i]) else
                  f"empty response dropped (responses[{i}])" for i in range(len(responses)) if i not in kept]
        if len(kept) < 2:
            raise fail(location, field, "at least 2 responses with a score",
                       f"{len(kept)} ({len(responses) - len(kept)} without a score)")
    completions = [_text(row, f"responses[{i}]", location, response=True, value=responses[i]) for i in kept]
    numbers = [_number(values[i], location, f"{field}[{i}]") for i in kept]
    scores = numbers if field == "scores" else [-rank for rank in numbers]
    prompt, completions = _align(_text(row, "prompt", location), completions)
    used = ("prompt", "responses", "scores", "ranks")
    return Record("listwise", prompt, completions, scores=scores, extra=_rest(row, used), location=location)


def _parse_prompt(row: dict[str, Any], location: str, notes: list[str]) -> Record:
    prompt = _text(row, "prompt", location)
    return Record("prompt", prompt, [], extra=_rest(row, ("prompt",)), location=location)


def _parse_stepwise(row: dict[str, Any], location: str, notes: list[str]) -> Record:
    """TRL's stepwise supervision row: ``prompt``, ``completions`` (the steps, strings), ``labels`` (one per step)."""
    prompt = _text(row, "prompt", location)
    steps = row.get("completions")
    if not isinstance(steps, list) or not steps:
        raise fail(location, "completions", "a non-empty list of steps (strings)", describe(steps))
    for index, step in enumerate(steps):
        if not isinstance(step, str):
            raise fail(location, f"completions[{index}]", "a step as a string", describe(step))
        if not step.strip():
            raise fail(location, f"completions[{index}]", "a non-empty step (its label would sit on the bare "
                       "separator)", "an empty string")
    labels = row.get("labels")
    if not isinstance(labels, list):
        raise fail(location, "labels", f"a list of {len(steps)} booleans (one per step)", describe(labels))
    if len(labels) != len(steps):
        raise fail(location, "labels", f"{len(steps)} label{'s' * (len(steps) != 1)} (one per step in completions)",
                   f"{len(labels)}")
    values = [_label(v, location, f"labels[{i}]") for i, v in enumerate(labels)]
    return Record("stepwise", prompt, list(steps), labels=values, extra=_rest(row, ("prompt", "completions", "labels")),
                  location=location)


PARSERS = {"sft": _parse_sft, "paired": _parse_paired, "unpaired": _parse_unpaired,
           "listwise": _parse_listwise, "prompt": _parse_prompt, "stepwise": _parse_stepwise}


def _apply_system(record: Record, system: Any, notes: list[str]) -> None:
    """A ``system`` column -> the prompt's system message (the prompt becomes messages)."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return
    if not isinstance(system, str):
        raise fail(record.location, "system", "a string system prompt", describe(system))
    if record.format == "stepwise":  # the steps stay strings: only the prompt becomes messages
        prompt = record.prompt if isinstance(record.prompt, list) else [{"role": "user", "content": record.prompt}]
        if prompt[0]["role"] == "system":
            notes.append("system column not used: the conversation has its own system message")
            record.extra["system"] = system
        else:
            record.prompt = [{"role": "system", "content": system}] + prompt
        return
    prompt, completions = _align(record.prompt, record.completions)
    if not isinstance(prompt, list):  # _align keeps strings only when nothing is a list
        prompt = [{"role": "user", "content": prompt}]
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    if prompt and prompt[0]["role"] == "system":
        notes.append("system column not used: the conversation has its own system message")
        record.extra["system"] = system
    else:
        prompt = [{"role": "system", "content": system}] + prompt
    record.prompt, record.completions = prompt, completions


def parse_row(
    raw: RawRow, fmt: str = "auto", preset: str = "trl", column_map: dict[str, str] | None = None
) -> Record:
    """One raw row -> a validated ``Record`` (``fmt="auto"`` detects the format of this row)."""
    notes: list[str] = []
    row = normalize(raw.data, raw.location, preset, column_map, notes)
    system = row.pop("system", None) if preset != "llamafactory" else None
    if fmt == "auto":
        detected = detect_format(row)
        if detected is None:
            raise fail(raw.location, None, f"columns of a known format (e.g. {', '.join(CANONICAL[:5])}) "
                       f"with columns={preset!r}", f"columns {sorted(raw.data)}" + hint(raw.data))
        if detected == "prompt" and response_lists(row):
            lists = ", ".join(response_lists(row))
            advice = hint(raw.data) or "; map them with column_map={responses: COL[].FIELD, scores|ranks: ...}"
            raise fail(raw.location, lists, "responses this layout reads",
                       f"column(s) {lists} holding lists of candidate responses that would be dropped as prompt-only "
                       f"data{advice}; or set data.format=prompt to keep prompt-only records (the lists stay columns)")
        fmt = detected
    if fmt not in PARSERS:
        raise fail(raw.location, "format", f"one of {', '.join(FORMATS)}", repr(fmt))
    record = PARSERS[fmt](row, raw.location, notes)
    _apply_system(record, system, notes)
    record.notes = notes
    return record


def to_row(record: Record) -> dict[str, Any]:
    """A record back to a row in TRL's column names (what ``alignkit data convert`` writes)."""
    row: dict[str, Any] = {"prompt": record.prompt}
    if record.format == "paired":
        row.update(chosen=record.completions[0], rejected=record.completions[1])
        if record.scores is not None:
            row.update(chosen_score=record.scores[0], rejected_score=record.scores[1])
    elif record.format == "listwise":
        row.update(responses=record.completions, scores=record.scores)
    elif record.format == "stepwise":
        row.update(completions=list(record.completions), labels=[bool(v) for v in record.labels or []])
    elif record.format in ("sft", "unpaired"):
        row["completion"] = record.completions[0]
        if record.labels is not None:
            row["label"] = bool(record.labels[0])
        if record.scores is not None:
            row["score"] = record.scores[0]
    return {**record.extra, **row}
