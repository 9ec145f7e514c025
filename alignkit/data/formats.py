"""Raw rows -> canonical ``Record``s: column presets, format detection, located validation.

Column layouts (``columns`` preset, then the explicit ``column_map`` canonical -> column on top):

* ``trl``: TRL's names as-is: ``prompt``, ``chosen``, ``rejected``, ``completion``, ``label``,
  ``messages``, plus ``responses`` + ``scores``/``ranks`` for listwise data. Paired rows may omit
  ``prompt`` when ``chosen``/``rejected`` are whole conversations sharing a prefix (implicit prompt).
* ``openrlhf``: OpenRLHF's default keys ``input`` (prompt) and ``output`` (completion); other keys as
  in TRL (its ``--input_key``-style custom keys are given through ``column_map``).
* ``llamafactory``: Alpaca (``instruction`` + ``input``, ``output``, ``system``, ``history``) and
  ShareGPT (``conversations`` of ``{from, value}``) layouts, the ranking layout (``chosen``/``rejected``
  as strings or single ``{from, value}`` messages) and ``kto_tag`` labels.
* ``nemo``: ``context`` as the prompt, ``completions: [{rank, completion}]`` (listwise, lower rank =
  better), ``chosen_response``/``rejected_response`` and ``input``/``output``.

Formats: ``sft``, ``paired``, ``unpaired``, ``listwise``, ``prompt`` (see ``record.py``); ``auto``
detects it from the first row of a source. Optional scores: paired ``chosen_score``/``rejected_score``
(or ``score_chosen``/``score_rejected``) or ``margin`` (becomes scores [margin, 0]); unpaired
``score`` instead of ``label``. Columns not used go to ``Record.extra`` (reward functions see them).

Every problem raises ``DataError`` located ``file:line`` with the field and "expected / found".
Deliberately left out: converting between formats (``convert.py``) and tokens (``tokenize.py``).
"""

from __future__ import annotations

import math
from typing import Any

from alignkit.data.config import FORMATS
from alignkit.data.record import Record, Text
from alignkit.data.sources import RawRow, describe
from alignkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "function_call": "assistant", "tool": "tool"}
RENAMES = {  # preset -> {column in the file: canonical name}
    "trl": {},
    "openrlhf": {"input": "prompt", "output": "completion"},
    "llamafactory": {"output": "completion", "kto_tag": "label"},
    "nemo": {"context": "prompt", "input": "prompt", "output": "completion",
             "chosen_response": "chosen", "rejected_response": "rejected"},
}
CANONICAL = ("prompt", "chosen", "rejected", "completion", "label", "score", "messages", "responses",
             "scores", "ranks", "margin", "chosen_score", "rejected_score")
SCORE_ALIASES = {"score_chosen": "chosen_score", "score_rejected": "rejected_score"}


def fail(location: str, field: str | None, expected: str, found: str) -> DataError:
    return DataError(f"expected {expected} / found {found}", location=location, field=field)


# ---------------------------------------------------------------- column layouts


def _sharegpt_message(item: Any, location: str, field: str) -> dict[str, Any]:
    if not isinstance(item, dict) or "value" not in item or item.get("from") not in SHAREGPT_ROLES:
        raise fail(location, field, f"a message {{from: {'|'.join(SHAREGPT_ROLES)}, value: str}}", describe(item))
    return {"role": SHAREGPT_ROLES[item["from"]], "content": item["value"]}


def _llamafactory(row: dict[str, Any], location: str) -> dict[str, Any]:
    out = dict(row)
    if "kto_tag" in out:
        out["label"] = out.pop("kto_tag")
    system = out.pop("system", None)
    if "conversations" in out:
        turns = out.pop("conversations")
        if not isinstance(turns, list):
            raise fail(location, "conversations", "a list of {from, value} messages", describe(turns))
        messages = [_sharegpt_message(t, location, "conversations") for t in turns]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        for name in ("chosen", "rejected"):
            if isinstance(out.get(name), dict):
                out[name] = [_sharegpt_message(out[name], location, name)]
        if "chosen" in out or "completion" in out or "label" in out:
            out["prompt"] = messages
            if "label" in out and "completion" not in out and messages and messages[-1]["role"] == "assistant":
                out["prompt"], out["completion"] = messages[:-1], messages[-1:]
        else:
            out["messages"] = messages
        return out
    if "instruction" in out:
        instruction = out.pop("instruction")
        extra_input = out.pop("input", "") or ""
        prompt = f"{instruction}\n{extra_input}" if extra_input else instruction
        history = out.pop("history", None) or []
        if system or history:
            messages = [{"role": "system", "content": system}] if system else []
            for pair in history:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise fail(location, "history", "a list of [query, response] pairs", describe(pair))
                messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
            prompt = messages + [{"role": "user", "content": prompt}]
        out["prompt"] = prompt
    return out


def _nemo(row: dict[str, Any], location: str) -> dict[str, Any]:
    out = dict(row)
    completions = out.pop("completions", None)
    if completions is not None:
        if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
            raise fail(location, "completions", "a list of {rank, completion} objects", describe(completions))
        for index, item in enumerate(completions):
            if "completion" not in item or "rank" not in item:
                raise fail(location, f"completions[{index}]", "keys rank and completion", f"keys {sorted(item)}")
        out["responses"] = [c["completion"] for c in completions]
        out["ranks"] = [c["rank"] for c in completions]
    return out


def normalize_columns(
    data: dict[str, Any], location: str, preset: str = "trl", column_map: dict[str, str] | None = None
) -> dict[str, Any]:
    """Rename a raw row's columns to the canonical (TRL) names."""
    row = dict(data)
    for canonical, column in (column_map or {}).items():
        if column in row and column != canonical:
            row[canonical] = row.pop(column)
    if preset == "llamafactory":
        row = _llamafactory(row, location)
    elif preset == "nemo":
        row = _nemo(row, location)
    for column, canonical in {**RENAMES.get(preset, {}), **SCORE_ALIASES}.items():
        if column in row and canonical not in row:
            row[canonical] = row.pop(column)
    return row


def detect_format(row: dict[str, Any]) -> str | None:
    """The format a canonical row looks like, or None."""
    if "chosen" in row or "rejected" in row:
        return "paired"
    if "responses" in row or "ranks" in row or "scores" in row:
        return "listwise"
    if "label" in row or "score" in row:
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
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(location, field, "a number", describe(value)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise fail(location, field, "a number", describe(value))
    return float(value)


def _label(value: Any, location: str) -> float:
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return 1.0 if value.strip().lower() in ("true", "1") else 0.0
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return float(value)
    raise fail(location, "label", "a boolean (true/false or 1/0)", describe(value))


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


def _parse_sft(row: dict[str, Any], location: str) -> Record:
    if "messages" in row and "completion" not in row:
        messages = _text(row, "messages", location, response=True)
        if isinstance(messages, str):
            raise fail(location, "messages", "a list of messages", describe(messages))
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first is None:
            raise fail(location, "messages", "at least one assistant message", "none")
        if first == 0:
            raise fail(location, "messages[0].role", "a user or system message before the first assistant message",
                       "assistant")
        return Record("sft", messages[:first], [messages[first:]], extra=_rest(row, ("messages",)), location=location)
    prompt, completions = _align(_text(row, "prompt", location),
                                 [_text(row, "completion", location, response=True)])
    return Record("sft", prompt, completions, extra=_rest(row, ("prompt", "completion")), location=location)


def _implicit_prompt(chosen: Text, rejected: Text, location: str) -> tuple[Text, Text, Text]:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise fail(location, "prompt", "a prompt column (or chosen/rejected as conversations sharing a prefix)",
                   "no prompt column and plain-string responses")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1  # the prompt ends before the first differing assistant turn
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise fail(location, "chosen", "conversations sharing a non-empty prompt prefix then differing",
                   f"{shared} shared leading messages")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _parse_paired(row: dict[str, Any], location: str) -> Record:
    chosen = _text(row, "chosen", location, response=True)
    rejected = _text(row, "rejected", location, response=True)
    if "prompt" in row:
        prompt = _text(row, "prompt", location)
    else:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected, location)
    prompt, completions = _align(prompt, [chosen, rejected])
    scores = None
    if "chosen_score" in row or "rejected_score" in row:
        scores = [_number(row.get("chosen_score"), location, "chosen_score"),
                  _number(row.get("rejected_score"), location, "rejected_score")]
    elif "margin" in row:
        scores = [_number(row["margin"], location, "margin"), 0.0]
    used = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "margin")
    return Record("paired", prompt, completions, scores=scores, extra=_rest(row, used), location=location)


def _parse_unpaired(row: dict[str, Any], location: str) -> Record:
    prompt, completions = _align(_text(row, "prompt", location),
                                 [_text(row, "completion", location, response=True)])
    labels = [_label(row["label"], location)] if "label" in row else None
    scores = [_number(row["score"], location, "score")] if "score" in row else None
    if labels is None and scores is None:
        raise fail(location, "label", "a label (or a score) column", f"neither (columns: {sorted(row)})")
    used = ("prompt", "completion", "label", "score")
    return Record("unpaired", prompt, completions, scores=scores, labels=labels, extra=_rest(row, used),
                  location=location)


def _numbers(row: dict[str, Any], field: str, count: int, location: str) -> list[float]:
    values = row[field]
    if not isinstance(values, list):
        raise fail(location, field, f"a list of {count} numbers", describe(values))
    if len(values) != count:
        raise fail(location, field, f"{count} {field} (one per response)", f"{len(values)}")
    return [_number(v, location, f"{field}[{i}]") for i, v in enumerate(values)]


def _parse_listwise(row: dict[str, Any], location: str) -> Record:
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise fail(location, "responses", "a list of at least 2 responses", describe(responses))
    completions = [_text(row, f"responses[{i}]", location, response=True, value=r) for i, r in enumerate(responses)]
    if "scores" in row:
        scores = _numbers(row, "scores", len(completions), location)
    elif "ranks" in row:
        scores = [-rank for rank in _numbers(row, "ranks", len(completions), location)]
    else:
        raise fail(location, "scores", "a scores or ranks column", f"neither (columns: {sorted(row)})")
    prompt, completions = _align(_text(row, "prompt", location), completions)
    used = ("prompt", "responses", "scores", "ranks")
    return Record("listwise", prompt, completions, scores=scores, extra=_rest(row, used), location=location)


def _parse_prompt(row: dict[str, Any], location: str) -> Record:
    prompt = _text(row, "prompt", location)
    return Record("prompt", prompt, [], extra=_rest(row, ("prompt",)), location=location)


PARSERS = {"sft": _parse_sft, "paired": _parse_paired, "unpaired": _parse_unpaired,
           "listwise": _parse_listwise, "prompt": _parse_prompt}


def parse_row(
    raw: RawRow, fmt: str = "auto", preset: str = "trl", column_map: dict[str, str] | None = None
) -> Record:
    """One raw row -> a validated ``Record`` (``fmt="auto"`` detects the format of this row)."""
    row = normalize_columns(raw.data, raw.location, preset, column_map)
    if fmt == "auto":
        detected = detect_format(row)
        if detected is None:
            raise fail(raw.location, None, f"columns of a known format (e.g. {', '.join(CANONICAL[:5])}) "
                       f"with columns={preset!r}", f"columns {sorted(raw.data)}")
        fmt = detected
    if fmt not in PARSERS:
        raise fail(raw.location, "format", f"one of {', '.join(FORMATS)}", repr(fmt))
    return PARSERS[fmt](row, raw.location)


def to_row(record: Record) -> dict[str, Any]:
    """A record back to a row in TRL's column names (what ``alignkit data convert`` writes)."""
    row: dict[str, Any] = {"prompt": record.prompt}
    if record.format == "paired":
        row.update(chosen=record.completions[0], rejected=record.completions[1])
        if record.scores is not None:
            row.update(chosen_score=record.scores[0], rejected_score=record.scores[1])
    elif record.format == "listwise":
        row.update(responses=record.completions, scores=record.scores)
    elif record.format in ("sft", "unpaired"):
        row["completion"] = record.completions[0]
        if record.labels is not None:
            row["label"] = bool(record.labels[0])
        if record.scores is not None:
            row["score"] = record.scores[0]
    return {**record.extra, **row}
