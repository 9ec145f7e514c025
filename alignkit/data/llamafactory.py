"""LLaMA-Factory's dataset layouts, read with its own semantics (``data/README.md``, ``converter.py``, ``parser.py``).

Under ``columns=llamafactory`` the column map speaks LLaMA-Factory's vocabulary, i.e. it is a
``dataset_info.json`` entry's ``columns`` and ``tags`` (plus ``formatting`` and ``ranking``):

* columns: ``prompt`` (default ``instruction``), ``query`` (``input``), ``response`` (``output``),
  ``history``, ``messages`` (``conversations``), ``system``, ``tools``, ``images``, ``videos``,
  ``audios``, ``chosen``, ``rejected``, ``kto_tag``;
* tags (sharegpt/openai): ``role_tag`` (``from``), ``content_tag`` (``value``), ``user_tag``
  (``human``), ``assistant_tag`` (``gpt``), ``observation_tag`` (``observation``), ``function_tag``
  (``function_call``), ``system_tag`` (``system``);
* ``formatting``: ``alpaca`` | ``sharegpt`` | ``openai``; ``ranking``: ``true`` | ``false``.

As in LLaMA-Factory's parser, naming any column leaves the unnamed ones unset, and naming any tag
leaves the unnamed tags unset. With an empty column map the defaults apply and the conventional
columns are picked up when present (``system``, ``history``, ``chosen``/``rejected`` (ranking),
``kto_tag``, ``tools``; ``conversations`` means sharegpt, a ``messages`` list of role/content
messages means sharegpt with OpenAI-style tags).

Meaning, as LLaMA-Factory's converters give it (every prompt is a conversation, so the model's chat
template is always applied, as LLaMA-Factory's ``template`` does):

* alpaca: user turn = ``prompt`` + "\\n" + ``query`` (each only if non-empty), after the ``history``
  pairs; ``system`` in front. SFT trains the history's responses too (LLaMA-Factory does), so an
  SFT row becomes a whole conversation; ranking rows (string ``chosen``/``rejected``) and KTO rows
  (boolean ``kto_tag``) keep the history in the prompt.
* sharegpt/openai: a leading ``system_tag`` message is the system prompt (else the ``system``
  column); user/observation turns at odd positions, assistant/function turns at even ones, an even
  count (odd for ranking, whose ``chosen``/``rejected`` are single messages); a row that breaks
  this, which LLaMA-Factory skips with a warning, is a located error here (``on_error=skip`` skips
  and counts it). observation -> ``tool``, function_call -> ``assistant``; openai ``tool_calls``
  become the function turn's JSON text, as in LLaMA-Factory.
* KTO: the last turn is the completion, ``kto_tag`` its label.

``tools`` (tool descriptions) are dropped and counted (alignkit renders no tool schemas);
non-empty ``images``/``videos``/``audios`` fail (text-only training would change the meaning).

``resolve_dataset_info(path)`` turns ``DIR/dataset_info.json#NAME`` (or ``DIR#NAME`` with
``DIR/dataset_info.json``) into the entry's file or hub name, split, subset and column map.
Deliberately left out: ``script_url`` (nothing read from disk executes), ModelScope/OpenMind and
cloud files, a hub entry's ``folder``, ``num_samples`` (use ``data.max_records`` or a source
``weight``), multimodal data; each fails naming what to do instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.sources import describe
from alignkit.errors import DataError

COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images", "videos",
           "audios", "chosen", "rejected", "kto_tag")
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "system_tag": "system"}
SETTINGS = ("formatting", "ranking")
KEYS = COLUMNS + TAGS + SETTINGS
FORMATTINGS = ("alpaca", "sharegpt", "openai")
INFO_FILE = "dataset_info.json"


def _fail(location: str, field: str | None, expected: str, found: str) -> DataError:
    return DataError(f"expected {expected} / found {found}", location=location, field=field)


@dataclass
class Attr:
    """A dataset_info.json entry's columns/tags/settings (None = unset)."""

    columns: dict[str, str | None]
    tags: dict[str, str | None]
    formatting: str
    ranking: bool


def _as_bool(value: Any, location: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise _fail(location, "column_map.ranking", "true or false", describe(value))
    return text in ("true", "1")


def attributes(column_map: dict[str, Any], row: dict[str, Any], location: str) -> Attr:
    """The entry a column map stands for (see the module docstring for the defaults)."""
    unknown = sorted(set(column_map) - set(KEYS))
    if unknown:
        raise _fail(location, "column_map", f"LLaMA-Factory keys ({', '.join(KEYS)}) with columns=llamafactory",
                    f"{', '.join(unknown)}")
    given_columns = {k: column_map[k] for k in COLUMNS if k in column_map}
    given_tags = {k: column_map[k] for k in TAGS if k in column_map}
    if given_columns:
        columns: dict[str, str | None] = {k: given_columns.get(k) for k in COLUMNS}
    else:
        columns = {k: DEFAULT_COLUMNS.get(k) for k in COLUMNS}
        for name in ("system", "history", "chosen", "rejected", "kto_tag", "tools"):
            if name in row:
                columns[name] = name
    tags = {k: given_tags.get(k) for k in TAGS} if given_tags else dict(DEFAULT_TAGS)
    if not column_map and "conversations" not in row and "instruction" not in row and isinstance(
            row.get("messages"), list):  # an OpenAI-style messages column, as in LLaMA-Factory's kto_en_demo
        columns["messages"] = "messages"
        tags.update(OPENAI_TAGS)
    formatting = str(column_map.get("formatting") or "")
    if not formatting:
        formatting = "sharegpt" if columns["messages"] and columns["messages"] in row and not given_columns.get(
            "prompt") and "instruction" not in row else "alpaca"
    if formatting not in FORMATTINGS:
        raise _fail(location, "column_map.formatting", f"one of {', '.join(FORMATTINGS)}", repr(formatting))
    if "ranking" in column_map:
        ranking = _as_bool(column_map["ranking"], location)
    else:
        ranking = bool(columns["chosen"] and columns["rejected"] and columns["chosen"] in row)
    return Attr(columns, tags, formatting, ranking)


def _value(row: dict[str, Any], attr: Attr, name: str) -> Any:
    column = attr.columns.get(name)
    return row.get(column) if column else None


def _kto_label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _shared(row: dict[str, Any], attr: Attr, location: str, notes: list[str]) -> None:
    for media in ("images", "videos", "audios"):
        if _value(row, attr, media):
            raise _fail(location, attr.columns[media], "text-only data (alignkit trains no multimodal models)",
                        f"non-empty {media}; drop '{media}' from the column map to train on the text alone")
    if _value(row, attr, "tools"):
        notes.append(f"dropped {attr.columns['tools']} (tool descriptions; no tool schema is rendered)")


def _alpaca(row: dict[str, Any], attr: Attr, location: str, notes: list[str]) -> dict[str, Any]:
    turns: list[dict[str, str]] = []
    history = _value(row, attr, "history")
    if isinstance(history, list):
        for index, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise _fail(location, f"{attr.columns['history']}[{index}]", "a [query, response] pair", describe(pair))
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [text for text in (_value(row, attr, "prompt"), _value(row, attr, "query")) if text]
    if not query:
        names = " / ".join(str(attr.columns[k]) for k in ("prompt", "query") if attr.columns[k]) or "none mapped"
        raise _fail(location, attr.columns["prompt"] or "prompt", f"a non-empty instruction ({names})",
                    f"none (columns: {sorted(row)})")
    turns.append({"role": "user", "content": "\n".join(str(t) for t in query)})
    system = _value(row, attr, "system")
    head = [{"role": "system", "content": system}] if system else []
    response = _value(row, attr, "response")
    label = _kto_label(_value(row, attr, "kto_tag"))
    if label is not None:
        return {"prompt": head + turns, "completion": [{"role": "assistant", "content": response}], "label": label}
    chosen, rejected = _value(row, attr, "chosen"), _value(row, attr, "rejected")
    if attr.ranking and isinstance(chosen, str) and isinstance(rejected, str):
        return {"prompt": head + turns, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if attr.ranking:
        raise _fail(location, attr.columns["chosen"] or "chosen", "string chosen/rejected columns (ranking: true)",
                    f"{describe(chosen)} / {describe(rejected)}")
    if isinstance(response, str):
        return {"messages": head + turns + [{"role": "assistant", "content": response}]}
    return {"prompt": head + turns}  # LLaMA-Factory's "unsupervised" example: prompt only


def _roles(attr: Attr) -> dict[str, str]:
    tags = attr.tags
    mapping = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
               tags["function_tag"]: "assistant", tags["system_tag"]: "system"}
    return {k: v for k, v in mapping.items() if k is not None}


def _message(item: Any, attr: Attr, location: str, field: str) -> tuple[str, str]:
    role_tag, content_tag = attr.tags["role_tag"], attr.tags["content_tag"]
    if not isinstance(item, dict) or role_tag not in item or content_tag not in item:
        raise _fail(location, field, f"a message {{{role_tag}, {content_tag}}} (tags role_tag/content_tag)",
                    describe(item))
    content = item[content_tag]
    if attr.formatting == "openai" and item.get("tool_calls"):
        return attr.tags["function_tag"] or "function_call", json.dumps(
            [call.get("function") for call in item["tool_calls"]], ensure_ascii=False)
    return item[role_tag], content


def _sharegpt(row: dict[str, Any], attr: Attr, location: str, notes: list[str]) -> dict[str, Any]:
    field = attr.columns["messages"] or "messages"
    messages = _value(row, attr, "messages")
    if not isinstance(messages, list):
        raise _fail(location, field, "a list of messages", describe(messages))
    roles = _roles(attr)
    pairs = [_message(m, attr, location, f"{field}[{i}]") for i, m in enumerate(messages)]
    system = _value(row, attr, "system")
    if pairs and attr.tags["system_tag"] is not None and pairs[0][0] == attr.tags["system_tag"]:
        system, pairs = pairs[0][1], pairs[1:]
        offset = 1
    else:
        offset = 0
    tags = attr.tags
    accept = ((tags["user_tag"], tags["observation_tag"]), (tags["assistant_tag"], tags["function_tag"]))
    turns = []
    for index, (role, content) in enumerate(pairs):
        if role not in accept[index % 2] or role is None:
            valid = "/".join(str(t) for t in accept[index % 2] if t is not None)
            raise _fail(location, f"{field}[{index + offset}].{tags['role_tag']}",
                        f"{valid} at this position (LLaMA-Factory alternates user/observation and "
                        f"assistant/function turns; it skips such rows)", repr(role))
        turns.append({"role": roles[role], "content": content})
    if (len(turns) % 2 == 0) == attr.ranking:
        expected = "an odd number of turns before chosen/rejected" if attr.ranking else "an even number of turns"
        raise _fail(location, field, f"{expected} (LLaMA-Factory skips other rows)", f"{len(turns)} turns")
    head = [{"role": "system", "content": system}] if system else []
    label = _kto_label(_value(row, attr, "kto_tag"))
    if label is not None:
        return {"prompt": head + turns[:-1], "completion": turns[-1:], "label": label}
    if attr.ranking:
        out: dict[str, Any] = {"prompt": head + turns}
        for name in ("chosen", "rejected"):
            value = _value(row, attr, name)
            role, content = _message(value, attr, location, attr.columns[name] or name)
            if role not in accept[1]:
                raise _fail(location, f"{attr.columns[name]}.{tags['role_tag']}",
                            "/".join(str(t) for t in accept[1] if t is not None), repr(role))
            out[name] = [{"role": roles[role], "content": content}]
        return out
    return {"messages": head + turns}


def convert(row: dict[str, Any], location: str, column_map: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """One LLaMA-Factory row -> canonical columns (TRL names) plus the columns it did not use."""
    attr = attributes(column_map, row, location)
    _shared(row, attr, location, notes)
    out = _sharegpt(row, attr, location, notes) if attr.formatting != "alpaca" else _alpaca(row, attr, location, notes)
    used = {c for c in attr.columns.values() if c}
    out.update({k: v for k, v in row.items() if k not in used and k not in out})
    return out


# ---------------------------------------------------------------- dataset_info.json


@dataclass
class InfoSource:
    path: str  # file/folder path or hub name
    split: str | None
    subset: str | None
    column_map: dict[str, str]


def split_info_path(path: str) -> tuple[Path, str] | None:
    """``DIR/dataset_info.json#NAME`` or ``DIR#NAME`` -> (info file, NAME); None for any other path."""
    base, sep, name = path.rpartition("#")
    if not sep or not name:
        return None
    info = Path(base).expanduser()
    if info.is_dir():
        info = info / INFO_FILE
    if info.name != INFO_FILE:
        return None
    return info, name


def _whole_info(path: str) -> None:
    """A dataset_info.json, or LLaMA-Factory's data folder holding one, named without an entry: which entry?"""
    where = Path(path).expanduser()
    info = where / INFO_FILE if where.is_dir() else where
    if "#" in path or info.name != INFO_FILE or not info.is_file():
        return
    try:
        names = sorted(json.loads(info.read_text(encoding="utf-8")))
    except (ValueError, TypeError, OSError):
        return
    shown = ", ".join(names[:12]) + (f", ... ({len(names)})" if len(names) > 12 else "")
    raise DataError(f"expected one entry of LLaMA-Factory's {INFO_FILE}, as {path.rstrip('/')}#NAME / found "
                    f"{'its folder' if where.is_dir() else 'the whole file'}, whose entries are {shown}; "
                    "its files read as one source would mix their formats", location=str(info))


def resolve_dataset_info(path: str) -> InfoSource | None:
    """The source a ``dataset_info.json`` entry names (None when ``path`` does not name one)."""
    parts = split_info_path(path)
    if parts is None:
        _whole_info(path)
        return None
    info_file, name = parts
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"expected LLaMA-Factory's {INFO_FILE} / found no such file", location=str(info_file)) from None
    except json.JSONDecodeError as err:
        raise DataError(f"expected a JSON object / found invalid JSON ({err.msg})", location=f"{info_file}:{err.lineno}"
                        ) from None
    if not isinstance(info, dict) or name not in info or not isinstance(info[name], dict):
        names = sorted(info) if isinstance(info, dict) else []
        raise DataError(f"expected a dataset named {name!r} / found {', '.join(names[:20]) or 'none'}",
                        location=str(info_file))
    entry: dict[str, Any] = info[name]
    where = f"{info_file}#{name}"
    if "num_samples" in entry:
        raise DataError("expected no num_samples (alignkit does not sample inside a source) / found "
                        f"num_samples={entry['num_samples']}; remove it and use data.max_records or the source's "
                        "weight", location=where)
    if entry.get("folder"):
        raise DataError(f"expected no folder (a hub repository's sub-folder) / found folder={entry['folder']!r}; "
                        "download that folder and point the source's path at it", location=where)
    if "hf_hub_url" in entry:
        target = str(entry["hf_hub_url"])
    elif "file_name" in entry and not any(k in entry for k in ("ms_hub_url", "om_hub_url", "script_url",
                                                                 "cloud_file_name")):
        target = str(info_file.parent / str(entry["file_name"]))
    else:
        kinds = [k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
        raise DataError(f"expected file_name or hf_hub_url / found {', '.join(kinds) or 'neither'} "
                        "(loading scripts are never run; ModelScope/OpenMind/cloud files are not read)", location=where)
    column_map: dict[str, str] = {"formatting": str(entry.get("formatting", "alpaca")),
                                  "ranking": "true" if entry.get("ranking") else "false"}
    for group, keys in (("columns", COLUMNS), ("tags", TAGS)):
        values = entry.get(group) or {}
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise DataError(f"expected {group} among {', '.join(keys)} / found {', '.join(unknown)}", location=where)
        column_map.update({k: str(v) for k, v in values.items() if v is not None})
    if "columns" not in entry:
        column_map.update(DEFAULT_COLUMNS)  # LLaMA-Factory's defaults; system/history stay unset
    return InfoSource(target, entry.get("split"), entry.get("subset"), column_map)


def apply_dataset_info(path: str, columns: str, column_map: dict[str, str] | None, split: str | None,
                       subset: str | None) -> tuple[str, str, dict[str, str] | None, str | None, str | None]:
    """A source's (path, columns, column_map, split, subset) with a dataset_info.json entry resolved.

    The entry's column map comes first; the source's own ``column_map`` goes on top of it.
    """
    info = resolve_dataset_info(path)
    if info is None:
        return path, columns, column_map, split, subset
    return info.path, "llamafactory", {**info.column_map, **(column_map or {})}, split or info.split, \
        subset or info.subset


def fingerprint_paths(path: str) -> list[str]:
    """The paths whose content identifies a source for the cache (the entry's file and the info file)."""
    parts = split_info_path(path)
    if parts is None:
        return [path]
    info = resolve_dataset_info(path)
    return [str(parts[0]), info.path if info is not None else path]
