"""Column layouts: one raw row -> a row in the canonical (TRL) column names, the way its source means it.

``data.columns`` picks a layout; ``data.column_map`` (canonical name -> column, or a nested field path,
see ``paths.py``) goes on top of the layout's own map.

==================  =========================================================================================
layout              reads
==================  =========================================================================================
``trl``             TRL's names: ``prompt``, ``chosen``/``rejected``, ``completion``, ``label``, ``messages``,
                    ``responses`` + ``scores``/``ranks``. Paired rows without ``prompt``: conversations share
                    their leading turns (implicit prompt), or Anthropic ``Human:/Assistant:`` transcripts.
``openrlhf``        OpenRLHF's keys: ``input`` -> prompt, ``output`` -> completion; the column map also takes
                    its flag names (``input_key``, ``output_key``, ``prompt_key``, ``chosen_key``,
                    ``rejected_key``, ``label_key``). An ``input`` holding a whole conversation and no
                    output is OpenRLHF's ``apply_chat_template`` SFT form: the last turn is the completion.
``llamafactory``    LLaMA-Factory alpaca / sharegpt / openai rows; the column map is a dataset_info.json
                    entry's ``columns`` + ``tags`` (see ``llamafactory.py``).
``nemo``            NeMo-Aligner: ``context`` / ``completions: [{rank, completion}]`` ...
``hh_rlhf``         Anthropic/hh-rlhf: ``chosen``/``rejected`` whole transcripts, prompt = shared turns.
``ultrafeedback``   openbmb/UltraFeedback raw: ``instruction``, ``completions[].response`` scored by
                    ``completions[].overall_score`` (listwise).
``nectar``          berkeley-nest/Nectar: ``prompt`` transcript, ``answers[].answer`` ranked by
                    ``answers[].rank`` (1 = best; listwise).
``orca``            argilla/distilabel-intel-orca-dpo-pairs: ``system`` + ``input`` prompt, ``chosen``/
                    ``rejected`` scored [max(rating), min(rating)] (``chosen_score`` is the max).
``math_shepherd``   peiyi9979/Math-Shepherd: ``input`` = problem + steps, each step ending in the tag ``ки``;
                    ``label`` = the same text with each ``ки`` replaced by ``+`` (correct) or ``-``; read as
                    stepwise (TRL's ``examples/datasets/math_shepherd.py`` rule, see ``_math_shepherd``).
==================  =========================================================================================

In every layout but ``llamafactory`` (which has its own rule), a non-empty ``system`` column becomes
the prompt's system message (applied by ``formats.parse_row`` once the prompt is known).

Everything a layout leaves behind is said, not dropped: fields of a nested list that no path reads
are appended to ``notes`` by name; unused top-level columns stay in ``Record.extra``.
Deliberately left out: validating values (``formats.py``).
"""

from __future__ import annotations

from typing import Any, Callable

from alignkit.data import llamafactory, transcript
from alignkit.data.paths import get_path, is_path, parse_path, unused_fields
from alignkit.data.sources import describe
from alignkit.errors import DataError

LAYOUT_MAPS: dict[str, dict[str, str]] = {  # layout -> its column map (canonical -> column or path)
    "trl": {},
    "openrlhf": {},
    "llamafactory": {},
    "nemo": {},
    "hh_rlhf": {},
    "ultrafeedback": {"prompt": "instruction", "responses": "completions[].response",
                      "scores": "completions[].overall_score"},
    "nectar": {"responses": "answers[].answer", "ranks": "answers[].rank"},
    "orca": {"prompt": "input"},
    "math_shepherd": {},
}
RENAMES = {  # layout -> {column in the file: canonical name}, applied when the canonical name is free
    "openrlhf": {"input": "prompt", "output": "completion"},
    "nemo": {"context": "prompt", "input": "prompt", "output": "completion",
             "chosen_response": "chosen", "rejected_response": "rejected"},
}
OPENRLHF_KEYS = {"input_key": "prompt", "output_key": "completion", "prompt_key": "prompt", "chosen_key": "chosen",
                 "rejected_key": "rejected", "label_key": "label"}
SCORE_ALIASES = {"score_chosen": "chosen_score", "score_rejected": "rejected_score"}
RESPONSE_KEYS = ("answer", "response", "completion", "output", "text", "content", "generation")
SIGNATURES = (  # (columns that identify a published layout, the option that reads it)
    ({"instruction", "completions"}, "data.columns=ultrafeedback (openbmb/UltraFeedback)"),
    ({"prompt", "answers"}, "data.columns=nectar (berkeley-nest/Nectar)"),
    ({"context", "completions"}, "data.columns=nemo (NeMo-Aligner)"),
    ({"input", "chosen", "rejected"}, "data.columns=orca (distilabel-intel-orca-dpo-pairs)"),
    ({"question", "answer"}, "column_map {prompt: question} on the source (gsm8k-style prompt-only data; "
                             "`answer` reaches the reward functions)"),
    ({"conversations"}, "data.columns=llamafactory (ShareGPT)"),
    ({"instruction", "output"}, "data.columns=llamafactory (Alpaca)"),
    ({"input", "output"}, "data.columns=openrlhf"),
    ({"input", "label"}, "data.columns=math_shepherd (peiyi9979/Math-Shepherd: steps tagged with ки)"),
)


def fail(location: str, field: str | None, expected: str, found: str) -> DataError:
    return DataError(f"expected {expected} / found {found}", location=location, field=field)


def hint(row: dict[str, Any]) -> str:
    """The option(s) that read a row whose columns match a published layout ('' if none does)."""
    matches = [option for columns, option in SIGNATURES if columns <= set(row)]
    return f"; these columns look like a published layout: use {' or '.join(matches)}" if matches else ""


def response_lists(row: dict[str, Any]) -> list[str]:
    """Columns holding lists of candidate responses (objects with an answer/response/... key)."""
    found = []
    for column, value in row.items():
        if isinstance(value, list) and len(value) >= 2 and all(isinstance(v, dict) for v in value) and any(
                key in value[0] for key in RESPONSE_KEYS) and not {"role", "content"} <= set(value[0]):
            found.append(column)
    return found


# ---------------------------------------------------------------- the column map


def _translate(column_map: dict[str, str], layout: str) -> dict[str, str]:
    if layout != "openrlhf":
        return dict(column_map)
    return {OPENRLHF_KEYS.get(key, key): value for key, value in column_map.items()}


def apply_map(data: dict[str, Any], mapping: dict[str, str], location: str, notes: list[str]) -> dict[str, Any]:
    """Canonical columns from plain names (renamed) and nested paths (read; their columns consumed)."""
    row = dict(data)
    paths = {canonical: column for canonical, column in mapping.items() if column not in data and is_path(column)}
    for canonical, column in mapping.items():
        if canonical in paths or column not in row or column == canonical:
            continue
        row[canonical] = row.pop(column)
    roots = set()
    for canonical, path in paths.items():
        try:
            root, _ = parse_path(path)
        except ValueError as err:
            raise fail(location, f"column_map.{canonical}", "a column name or a path like a[].b", str(err)) from None
        try:
            row[canonical] = get_path(data, path)
        except KeyError:
            continue  # the parser reports the missing canonical column
        roots.add(root)
    if paths:
        notes += [f"dropped {name}" for name in unused_fields(data, list(paths.values()))]
        for root in roots - set(mapping):
            row.pop(root, None)
    return row


# ---------------------------------------------------------------- per-layout steps


def _nemo(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    completions = row.pop("completions", None)
    if completions is not None:
        if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
            raise fail(location, "completions", "a list of {rank, completion} objects", describe(completions))
        for index, item in enumerate(completions):
            if "completion" not in item or "rank" not in item:
                raise fail(location, f"completions[{index}]", "keys rank and completion", f"keys {sorted(item)}")
        row["responses"] = [c["completion"] for c in completions]
        row["ranks"] = [c["rank"] for c in completions]
    return row


def _hh_rlhf(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    if "prompt" in row:
        return row
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not transcript.looks_like_transcript(value):
            raise fail(location, name, "a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript", describe(value))
    try:
        prompt, row["chosen"], row["rejected"] = transcript.split_pair(chosen, rejected)
    except ValueError as err:
        raise fail(location, "chosen", str(err), "transcripts that differ before any Assistant turn") from None
    row["prompt"] = prompt
    if any("\n\n" + transcript.HUMAN in row[k] for k in ("chosen", "rejected")):
        notes.append("transcripts differ before their last turn: the later Human:/Assistant: turns are trained "
                     "inside the completions as text (TRL's hh-rlhf rule)")
    return row


def _nectar(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    prompt = row.get("prompt")
    if transcript.looks_like_transcript(prompt):
        try:
            messages, open_end = transcript.to_messages(prompt)
        except ValueError as err:
            raise fail(location, "prompt", str(err), describe(prompt)) from None
        if not open_end or not messages or messages[-1]["role"] != "user":
            raise fail(location, "prompt", "a transcript ending in a Human turn and an empty '\\n\\nAssistant:'",
                       describe(prompt[-40:]))
        row["prompt"] = messages
    return row


def _orca(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    rating = row.get("rating")
    if "chosen_score" in row and "rejected_score" not in row:
        listed = rating if isinstance(rating, list) else []
        if len(listed) == 2 and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in listed):
            high, low = max(listed), min(listed)
            if row["chosen_score"] is not None and float(row["chosen_score"]) != float(high):
                raise fail(location, "chosen_score", f"max(rating) = {high:g} (the chosen response's rating)",
                           describe(row["chosen_score"]))
            row["chosen_score"], row["rejected_score"] = high, low
        else:
            notes.append("no rating: pair kept without scores")
            row.pop("chosen_score")
    return row


def _openrlhf(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    prompt = row.get("prompt")
    if (isinstance(prompt, list) and prompt and "completion" not in row and "chosen" not in row
            and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant"):
        row["prompt"], row["completion"] = prompt[:-1], prompt[-1:]  # apply_chat_template without output_key
    return row


STEP_TAG = "ки"  # Math-Shepherd's step tag (Cyrillic), one per step in ``input``
FIRST_STEP = ("Step 1:", "step 1:")


def _math_shepherd(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    """Math-Shepherd -> stepwise, as TRL's conversion script does it (the one that made trl-lib/math_shepherd):
    the text before the first tag holds the problem and step 1, split at ``Step 1:`` (or ``step 1:``, else
    after the last ``?``); each later tag ends one step; steps and prompt are stripped. Checked, where TRL
    asserts: ``label`` must be ``input`` with each tag replaced by ``+``/``-`` (the first difference is
    located). Differs from TRL: the dozen rows TRL special-cases by their prompt's first words (a tag inside
    the problem) are not special-cased, and text after the last tag (TRL drops it) is noted on the record."""
    if "completions" in row:
        return row
    text, marked = row.get("input"), row.get("label")
    if not isinstance(text, str):
        raise fail(location, "input", "the problem and its steps, each ending in 'ки' (a string)", describe(text))
    if not isinstance(marked, str):
        raise fail(location, "label", "the input text with each 'ки' replaced by '+' or '-'", describe(marked))
    pieces = text.split(STEP_TAG)
    if len(pieces) < 2:
        raise fail(location, "input", "steps ending in the tag 'ки'", "no tag")
    labels, at = [], 0
    for index, piece in enumerate(pieces):
        if marked[at : at + len(piece)] != piece:
            diff = next((i for i, (a, b) in enumerate(zip(marked[at:], piece)) if a != b), min(len(piece),
                                                                                              len(marked) - at))
            found = (f"the label ending at character {at + diff}" if at + diff >= len(marked) else
                     f"a different text at character {at + diff}: {describe(marked[at + diff: at + diff + 20])}")
            raise fail(location, "label", "the input text with each 'ки' replaced by '+' or '-'", found)
        at += len(piece)
        if index == len(pieces) - 1:
            break
        tag = marked[at : at + 1]
        if tag not in ("+", "-"):
            raise fail(location, "label", f"'+' or '-' where input has tag {index + 1} (character {at})", describe(tag))
        labels.append(tag == "+")
        at += 1
    if at != len(marked):
        raise fail(location, "label", "the input text with each 'ки' replaced by '+' or '-'",
                   f"{len(marked) - at} extra characters at the end")
    head, steps, tail = pieces[0], [p.strip() for p in pieces[1:-1]], pieces[-1]
    split = next((head.index(m) for m in FIRST_STEP if m in head), None)
    if split is not None:
        prompt, first = head[:split], head[split:]
    elif "?" in head:
        cut = head.rindex("?") + 1
        prompt, first = head[:cut], head[cut:]
    else:
        raise fail(location, "input", "the problem then 'Step 1:' (or a '?' ending the problem) before the first "
                   "tag", describe(head[:60]))
    if tail.strip():
        notes.append("text after the last ки tag (no label) dropped")
    row.pop("input"), row.pop("label")
    row.update(prompt=prompt.strip(), completions=[first.strip(), *steps], labels=labels)
    return row


STEPS: dict[str, Callable[[dict[str, Any], str, list[str]], dict[str, Any]]] = {
    "nemo": _nemo, "hh_rlhf": _hh_rlhf, "nectar": _nectar, "orca": _orca, "openrlhf": _openrlhf,
    "math_shepherd": _math_shepherd,
}


def _trl_transcripts(row: dict[str, Any], location: str, notes: list[str]) -> dict[str, Any]:
    """TRL layout: a pair of hh-rlhf transcripts without a prompt column is read as hh_rlhf."""
    if "prompt" not in row and all(transcript.looks_like_transcript(row.get(k)) for k in ("chosen", "rejected")):
        return _hh_rlhf(row, location, notes)
    return row


def normalize(data: dict[str, Any], location: str, layout: str = "trl", column_map: dict[str, str] | None = None,
              notes: list[str] | None = None) -> dict[str, Any]:
    """A raw row -> canonical column names (what the format parsers read); see the module docstring."""
    notes = notes if notes is not None else []
    if layout == "llamafactory":
        return llamafactory.convert(data, location, dict(column_map or {}), notes)
    mapping = {**LAYOUT_MAPS.get(layout, {}), **_translate(column_map or {}, layout)}
    row = apply_map(data, mapping, location, notes)
    for column, canonical in {**RENAMES.get(layout, {}), **SCORE_ALIASES}.items():
        if column in row and canonical not in row:
            row[canonical] = row.pop(column)
    if layout in STEPS:
        row = STEPS[layout](row, location, notes)
    elif layout == "trl":
        row = _trl_transcripts(row, location, notes)
    return row
