"""Reading raw rows from files, ``datasets`` folders and hub names, each row with its location.

Supported files: JSONL, JSON (a list of objects, or an object holding one such list; a ``.json``
file that is really JSON Lines, as many hub datasets ship, is read as JSON Lines), Parquet (read
batch by batch), CSV (cells that look like JSON lists/objects are decoded); the text formats also
compressed as ``.gz``, ``.bz2``, ``.xz``, or ``.zst`` when the ``zstandard`` package is installed.
Which files a source names (a file, a glob, a folder's split, a ``save_to_disk`` folder, a hub
name) is decided in ``resolve.py``; what ``datasets`` loads (``save_to_disk`` folders, hub names) is
read in ``hub.py``. Every row comes as ``RawRow(location, data)`` where location
is ``file:line`` (JSONL, CSV, JSON; inside a compressed file, the line of the decompressed text) or
``file:row N`` (Parquet, ``datasets`` tables) so that every later error can point at it.

Also here: mixing sources by weight and splitting train/eval by a seeded fraction of prompts.

Deliberately left out: what the columns mean (``formats.py``) and any tokenization.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar

from alignkit.data.resolve import GLOB_CHARS, Resolved, readable_suffix, resolve_source
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


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed by its last suffix (``.gz``, ``.bz2``, ``.xz``, ``.zst``)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError("expected a readable file / found zstd compression, which needs the zstandard "
                            "package: pip install zstandard (or decompress it: zstd -d FILE).",
                            location=str(path)) from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _corrupt(path: Path, err: Exception, location: str) -> DataError:
    return DataError(f"expected {path.suffix} compressed data / found data that cannot be decompressed "
                     f"({type(err).__name__}: {err}); the file may be truncated or not {path.suffix} at all.",
                     location=location)


def _compressed(path: Path) -> bool:
    return path.suffix.lower() in (".gz", ".bz2", ".xz", ".zst")


def _read_bytes(path: Path) -> bytes:
    try:
        with _open_binary(path) as handle:
            return handle.read()
    except Exception as err:  # gzip/zlib/lzma/bz2/zstd each raise their own kinds for bad data
        if not _compressed(path) or isinstance(err, DataError):
            raise
        raise _corrupt(path, err, str(path)) from None


def iter_jsonl(path: Path, max_line_bytes: int | None = None) -> Iterator[RawRow]:
    limit = max_line_bytes or MAX_LINE_BYTES
    compressed = _compressed(path)
    with _open_binary(path) as handle:
        line_number = 0
        seen_object = False
        while True:
            try:
                raw = handle.readline(limit + 1)
            except Exception as err:  # gzip/zlib/lzma/bz2/zstd each raise their own kinds for bad data
                if not compressed:
                    raise
                location = f"{path}:{line_number + 1}"
                yield RawRow(location, {}, _corrupt(path, err, location))
                return
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
                if text.startswith("[") and not seen_object:  # a JSON array saved as .jsonl: one hint, not N errors
                    yield RawRow(location, {}, DataError(
                        "expected JSON Lines (one object per line) / found a JSON array (the whole file is one "
                        f"JSON document); rename it to .json (read as an array of records) or convert it with "
                        f"jq -c '.[]' {path.name} > converted.jsonl", location=location))
                    return
                if text:
                    seen_object = True
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


def _is_json_lines(text: str, err: json.JSONDecodeError) -> bool:
    """A ``.json`` file holding one object per line (``Extra data`` after a first object that ends its line)."""
    return err.msg == "Extra data" and err.lineno > 1 and text.lstrip().startswith("{")


def iter_json(path: Path) -> Iterator[RawRow]:
    text = _decode_file(_read_bytes(path), path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if _is_json_lines(text, err):
            yield from iter_jsonl(path)
            return
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
    text = _decode_file(_read_bytes(path), path)
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


def iter_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"expected a Parquet file / found unreadable data ({err})", location=str(path)) from None
    return _iter_parquet_batches(parquet, str(path))


def _iter_parquet_batches(parquet: Any, name: str) -> Iterator[RawRow]:
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                index += 1
                yield RawRow(f"{name}:row {index}", item)
    except OSError as err:  # a corrupt column chunk shows up while reading
        raise DataError(f"expected a Parquet file / found unreadable data after row {index} ({err})",
                        location=name) from None


READERS: dict[str, Callable[[Path], Iterator[RawRow]]] = {
    ".jsonl": iter_jsonl,
    ".json": iter_json,
    ".parquet": iter_parquet,
    ".csv": iter_csv,
}


def _reader(path: Path) -> Callable[[Path], Iterator[RawRow]]:
    reader = READERS.get(readable_suffix(path))
    if reader is None or (reader is iter_parquet and _compressed(path)):
        raise DataError(
            f"expected a file ending in {', '.join(READERS)} (the text formats also as .gz, .bz2, .xz, .zst) "
            f"/ found {''.join(path.suffixes) or 'no suffix'!r}",
            location=str(path),
        )
    return reader


def iter_rows(path: str, split: str | None = None, subset: str | None = None) -> Iterator[RawRow]:
    """Rows of one source (a file, a glob, a folder's split, a hub name; see ``resolve.py``).

    Unreadable sources (nothing there, an empty glob, a wrong split) raise ``DataError`` here, before any
    row is read; rows that cannot be read come as ``RawRow.error``.
    """
    resolved = resolve_source(path, split, subset)
    return rows_of(resolved)


def rows_of(resolved: Resolved) -> Iterator[RawRow]:
    """The rows of a resolved source, file after file."""
    if resolved.kind == "files":
        readers = [(_reader(file), file) for file in resolved.files]  # every suffix checked before reading
        return itertools.chain.from_iterable(reader(file) for reader, file in readers)
    from alignkit.data.hub import iter_datasets_folder, iter_hub, iter_loader_folder  # hub imports RawRow from here

    if resolved.kind == "saved":
        if resolved.subset is not None:
            raise DataError(f"subset {resolved.subset!r} was asked of a save_to_disk folder, which has none; "
                            "drop the subset.", location=resolved.path)
        return iter_datasets_folder(Path(resolved.path), resolved.split)
    if resolved.kind == "loader":
        return iter_loader_folder(Path(resolved.path), resolved.split or "train", resolved.subset)
    return iter_hub(resolved.path, resolved.split, resolved.subset)


def fingerprint_source(path: str) -> str:
    """What identifies a source's content for the cache: its files' names and bytes (a file, a folder's
    files, a glob's matches), or the hub name."""
    import hashlib

    local = Path(os.path.expanduser(path))
    digest = hashlib.sha256()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
    elif local.exists():
        files = [local]
    elif any(c in path for c in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(local), recursive=True) if Path(p).is_file())
    else:
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
