"""Reading raw rows from files, ``datasets`` folders and hub names, each row with its location.

Supported: JSONL (``.jsonl``/``.jsonl.gz`` not included: plain text only), JSON (a list of objects,
or an object holding one such list), Parquet, CSV (cells that look like JSON lists/objects are
decoded), a local ``datasets.save_to_disk`` folder, and hub names through ``datasets.load_dataset``.
Every row comes as ``RawRow(location, data)`` where location is ``file:line`` (JSONL, CSV, JSON
errors) or ``file:row N`` so that every later error can point at it.

Also here: mixing sources by weight and splitting train/eval by a seeded fraction of prompts.

Deliberately left out: what the columns mean (``formats.py``) and any tokenization. Hub access is
not cached here (``datasets`` does that); an unreachable hub is
reported after a short connection probe instead of ``datasets``' half-minute of retries.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from alignkit.errors import DataError

MAX_LINE_BYTES = 8 * 1024 * 1024  # a longer JSONL line is reported instead of read
T = TypeVar("T")


@dataclass
class RawRow:
    """One row; a row that could not be read carries ``error`` instead of data (so reading goes on)."""

    location: str
    data: dict[str, Any]
    error: DataError | None = None


def describe(value: Any, limit: int = 60) -> str:
    """Short description of a found value for 'expected / found' messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def _decode_line(raw: bytes, location: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"expected UTF-8 text / found byte 0x{raw[err.start]:02x} at column {err.start + 1} "
            "that is not valid UTF-8; re-encode the file as UTF-8 (e.g. iconv -t UTF-8).",
            location=location,
        ) from None


def _decode_file(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # editors may write a byte-order mark
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
        return _decode_line(raw[err.start - column :], f"{path}:{line}")


def _parse_object(text: str, location: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError("expected a JSON object / found nesting too deep to read", location=location) from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"expected one JSON object per line / found invalid JSON ({err.msg} at column {err.colno}); "
            "the line may be truncated or hold several objects.",
            location=location,
        ) from None
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object / found {describe(value)}", location=location)
    return value


def iter_jsonl(path: Path, max_line_bytes: int | None = None) -> Iterator[RawRow]:
    limit = max_line_bytes or MAX_LINE_BYTES
    with open(path, "rb") as handle:
        line_number = 0
        while True:
            raw = handle.readline(limit + 1)
            if not raw:
                return
            line_number += 1
            location = f"{path}:{line_number}"
            if len(raw) > limit and not raw.endswith(b"\n"):
                # skip the rest of the oversized line without holding it in memory
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(limit + 1)
                error = DataError(
                    f"expected a line of at most {limit} bytes / found a longer line; "
                    "split the record or check that the file is really JSON Lines.",
                    location=location,
                )
                yield RawRow(location, {}, error)
                continue
            try:
                text = _decode_line(raw, location).strip().removeprefix("\ufeff")
                if text:
                    yield RawRow(location, _parse_object(text, location))
            except DataError as error:
                yield RawRow(location, {}, error)


def _array_item_lines(text: str) -> list[int]:
    """Line number where each item of a (valid) top-level JSON array starts."""
    decoder = json.JSONDecoder()
    whitespace = " \t\r\n"
    position = text.index("[") + 1
    starts = []
    while True:
        while text[position] in whitespace or text[position] == ",":
            position += 1
        if text[position] == "]":
            return [text.count("\n", 0, start) + 1 for start in starts]
        starts.append(position)
        _, position = decoder.raw_decode(text, position)


def iter_json(path: Path) -> Iterator[RawRow]:
    text = _decode_file(path.read_bytes(), path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"expected a JSON document / found invalid JSON ({err.msg} at column {err.colno})",
            location=f"{path}:{err.lineno}",
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"expected a list of records (or an object holding exactly one list) / found an object with keys "
                f"{sorted(value)[:8]}",
                location=str(path),
            )
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"expected a list of records / found {describe(value)}", location=str(path))
    lines = _array_item_lines(text) if text.lstrip().startswith("[") else None
    for index, item in enumerate(value, start=1):
        location = f"{path}:{lines[index - 1]}" if lines else f"{path}:record {index}"
        if not isinstance(item, dict):
            yield RawRow(location, {}, DataError(f"expected a JSON object / found {describe(item)}", location=location))
            continue
        yield RawRow(location, item)


def _maybe_json_cell(cell: str) -> Any:
    stripped = cell.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return cell
    return cell


def iter_csv(path: Path) -> Iterator[RawRow]:
    text = _decode_file(path.read_bytes(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start_line = 2  # line 1 is the header; a quoted cell may span several lines
    for row in reader:
        location = f"{path}:{start_line}"
        start_line = reader.line_num + 1
        if None in row:
            message = f"expected {len(reader.fieldnames or [])} columns / found more cells than header columns"
            yield RawRow(location, {}, DataError(message, location=location))
            continue
        yield RawRow(location, {key: _maybe_json_cell(value or "") for key, value in row.items()})


def _iter_table(rows: list[dict[str, Any]], name: str) -> Iterator[RawRow]:
    for index, item in enumerate(rows, start=1):
        yield RawRow(f"{name}:row {index}", item)


def iter_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"expected a Parquet file / found unreadable data ({err})", location=str(path)) from None
    return _iter_table(table.to_pylist(), str(path))


def iter_datasets_folder(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # not a save_to_disk folder (FileNotFoundError, ValueError, ...)
        raise DataError(f"expected a folder written by datasets' save_to_disk / found one it cannot read "
                        f"({type(err).__name__}: {str(err)[:200]})", location=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"expected split {split!r} / found splits {sorted(loaded)}; set the source's split.",
                location=str(path),
            )
        loaded = loaded[split]
    return _iter_table(loaded.to_list(), f"{path}[{split}]")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None if it can, or if offline mode / a proxy makes probing moot).

    ``datasets`` retries an unreachable hub for about half a minute; this probe fails in seconds.
    """
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)
    if offline or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port} is unreachable ({err})"
    return None


def iter_hub(name: str, split: str) -> Iterator[RawRow]:
    advice = ("No local file or folder has this name either. Without network access, download it elsewhere, "
              "`save_to_disk` it, and point the source's path at that folder (or, if it is in the local "
              "datasets cache, set HF_DATASETS_OFFLINE=1).")
    why = _hub_unreachable()
    if why is not None:
        raise DataError(f"could not load hub dataset {name!r}: {why}. {advice}", location=name)
    try:
        import datasets

        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"could not load hub dataset {name!r} (split {split!r}): {type(err).__name__}: {str(err)[:200]}. {advice}",
            location=name,
        ) from None
    return _iter_table(loaded.to_list(), f"{name}[{split}]")


READERS: dict[str, Callable[[Path], Iterator[RawRow]]] = {
    ".jsonl": iter_jsonl,
    ".json": iter_json,
    ".parquet": iter_parquet,
    ".csv": iter_csv,
}


def looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and not path.startswith((".", "/", "~")) and not Path(path).suffix


def iter_rows(path: str, split: str = "train") -> Iterator[RawRow]:
    """Rows of one source: a file, a ``save_to_disk`` folder or a hub name."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        return iter_datasets_folder(local, split)
    if local.is_file():
        reader = READERS.get(local.suffix.lower())
        if reader is None:
            raise DataError(
                f"expected a file ending in {', '.join(READERS)} / found suffix {local.suffix!r}",
                location=str(local),
            )
        return reader(local)
    if looks_like_hub_name(path):
        return iter_hub(path, split)
    raise DataError(f"expected an existing file or folder / found nothing at {path!r}", location=path)


def fingerprint_source(path: str) -> str:
    """What identifies a source's content for the cache: file bytes' hash, or the hub name."""
    import hashlib

    local = Path(os.path.expanduser(path))
    digest = hashlib.sha256()
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    if not local.exists():
        return f"hub:{path}"
    for file in files:
        digest.update(str(file.relative_to(local) if local.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def apply_weight(items: list[T], weight: float, rng: random.Random) -> list[T]:
    """``round(weight * len)`` items: whole copies for the integer part, a seeded sample for the rest."""
    whole, fraction = divmod(weight, 1.0)
    out = items * int(whole)
    extra = round(fraction * len(items))
    if extra:
        out += rng.sample(items, extra)
    return out


def split_by_key(items: list[T], key: Callable[[T], str], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded (train, eval) split holding out about ``fraction`` of items, whole keys at a time.

    Splitting by prompt key keeps every prompt on one side, so train and eval never share a prompt.
    """
    if fraction <= 0 or not items:
        return list(items), []
    keys = sorted({key(item) for item in items})
    random.Random(seed).shuffle(keys)
    target = max(1, round(fraction * len(items)))
    held: set[str] = set()
    count = 0
    counts: dict[str, int] = {}
    for item in items:
        counts[key(item)] = counts.get(key(item), 0) + 1
    for k in keys:
        if count >= target or len(held) == len(keys) - 1:
            break
        held.add(k)
        count += counts[k]
    train = [item for item in items if key(item) not in held]
    evaluation = [item for item in items if key(item) in held]
    return train, evaluation
