"""The tokenized-data cache file: safetensors token ids + JSON metadata, a checksum and its key.

One file per cache key, ``CACHE_DIR/<key>.safetensors``, written atomically. It holds three tensors:
``tokens`` (int64: every group's prompt ids, then each completion's ids, in order), ``mask``
(uint8: the completions' train masks, aligned with their tokens) and ``meta`` (uint8: UTF-8 JSON
with the statistics and, per group, the lengths, scores, labels, example id and extra columns).
The safetensors header's metadata names the format, the key and the sha256 of the three tensors'
bytes. Reading a file executes nothing (safetensors and JSON only, never pickle).

``read_cache`` returns ``None`` for a missing file, and raises ``CacheDamaged`` (with the reason)
for a file that cannot be parsed, has another format or key, fails its checksum, or whose lengths
do not add up; ``move_aside`` renames such a file to ``<name>.bad-<time>`` so it is kept for
inspection and rebuilt. Extra columns that JSON cannot carry unchanged (e.g. bytes, dates) make
``write_cache`` refuse with ``CacheUnsupported``: the caller says so and runs without the cache.

Left out: memory mapping, sharding, compression, and any reading of the older pickle caches
(``*.pkl`` files are ignored, never opened).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from alignkit.data.batch import TokenizedGroup
from alignkit.models.fsutil import atomic_write

FORMAT = "alignkit-data-cache/2"
SUFFIX = ".safetensors"


class CacheDamaged(Exception):
    """A cache file that must not be used (the message says why)."""


class CacheUnsupported(Exception):
    """Data the cache format cannot carry unchanged (the message says what)."""


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"{key}{SUFFIX}"


def _digest(tokens: torch.Tensor, mask: torch.Tensor, meta: torch.Tensor) -> str:
    h = hashlib.sha256()
    for tensor in (tokens, mask, meta):
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def _group_meta(group: TokenizedGroup) -> dict[str, Any]:
    return {
        "prompt": len(group.prompt_ids),
        "completions": [len(ids) for ids in group.completion_ids],
        "scores": group.scores,
        "labels": group.labels,
        "example_id": group.example_id,
        "extra": group.extra,
    }


def _exact_json(value: Any, what: str) -> str:
    """JSON of ``value``, refused unless it decodes back to an equal value (no silent type changes)."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as error:
        raise CacheUnsupported(f"{what} cannot be stored as JSON ({error})") from error
    if not _nan_equal(json.loads(text), value):
        raise CacheUnsupported(f"{what} would change type through JSON (tuples, non-string keys ...)")
    return text


def _nan_equal(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (scores may be NaN for missing values)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    return a == b


def _stats_to_json(stats: Any) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def _stats_from_json(data: dict[str, Any]):
    from alignkit.data.convert import ConvertStats
    from alignkit.data.pipeline import DataStats
    from alignkit.data.tokenize import TokenizeStats

    data = dict(data)
    tokenize = dict(data.pop("tokenize"))
    tokenize["dropped"] = Counter(tokenize.get("dropped", {}))
    convert = data.pop("convert")
    if convert is not None:
        convert = ConvertStats(**{**convert, "dropped": Counter(convert.get("dropped", {}))})
    known = {f.name for f in dataclasses.fields(DataStats)}
    return DataStats(**{k: v for k, v in data.items() if k in known}, tokenize=TokenizeStats(**tokenize),
                     convert=convert)


def write_cache(path: Path, key: str, train: list[TokenizedGroup], evaluation: list[TokenizedGroup],
                stats: Any) -> None:
    """Write the cache file atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save

    tokens: list[int] = []
    mask: list[int] = []
    groups = {"train": [], "eval": []}
    for split, items in (("train", train), ("eval", evaluation)):
        for group in items:
            tokens += group.prompt_ids
            for ids, train_mask in zip(group.completion_ids, group.completion_train_mask):
                tokens += ids
                mask += [1 if m else 0 for m in train_mask]
            groups[split].append(_group_meta(group))
    meta_text = _exact_json({"key": key, "stats": _stats_to_json(stats), **groups}, "the data (extra columns) or its statistics")
    tensors = {
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "mask": torch.tensor(mask, dtype=torch.uint8),
        "meta": torch.frombuffer(bytearray(meta_text.encode()), dtype=torch.uint8).clone(),
    }
    header = {"format": FORMAT, "key": key, "sha256": _digest(**tensors)}
    payload = save(tensors, metadata=header)
    atomic_write(path, payload)


def read_cache(path: Path, key: str):
    """``(train, eval, stats)`` from the file, ``None`` when there is none; ``CacheDamaged`` when bad."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            names = set(handle.keys())
            if header.get("format") != FORMAT or names != {"tokens", "mask", "meta"}:
                raise CacheDamaged(f"not an {FORMAT} file (format {header.get('format')!r}, tensors {sorted(names)})")
            tensors = {name: handle.get_tensor(name) for name in ("tokens", "mask", "meta")}
    except CacheDamaged:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError, OSError, ...
        raise CacheDamaged(f"unreadable ({type(error).__name__}: {error})") from error
    if header.get("key") != key:
        raise CacheDamaged(f"it holds key {header.get('key')!r}, not {key!r}")
    if header.get("sha256") != _digest(**tensors):
        raise CacheDamaged("checksum mismatch (the file was changed after it was written)")
    try:
        meta = json.loads(tensors["meta"].numpy().tobytes().decode())
        return _rebuild(meta, tensors["tokens"].tolist(), tensors["mask"].tolist(), key)
    except CacheDamaged:
        raise
    except Exception as error:  # the checksum matched but the content does not make sense
        raise CacheDamaged(f"inconsistent content ({type(error).__name__}: {error})") from error


def _rebuild(meta: dict, tokens: list[int], mask: list[int], key: str):
    if meta.get("key") != key:
        raise CacheDamaged("metadata names another key")
    pos = 0
    mpos = 0
    out: dict[str, list[TokenizedGroup]] = {}
    for split in ("train", "eval"):
        groups = []
        for g in meta[split]:
            prompt = tokens[pos : pos + g["prompt"]]
            pos += g["prompt"]
            completions, masks = [], []
            for n in g["completions"]:
                completions.append(tokens[pos : pos + n])
                masks.append([bool(m) for m in mask[mpos : mpos + n]])
                pos += n
                mpos += n
            groups.append(TokenizedGroup(prompt, completions, masks, scores=g["scores"], labels=g["labels"],
                                         example_id=g["example_id"], extra=g["extra"]))
        out[split] = groups
    if pos != len(tokens) or mpos != len(mask):
        raise CacheDamaged(f"lengths do not add up ({pos} of {len(tokens)} tokens, {mpos} of {len(mask)} mask)")
    return out["train"], out["eval"], _stats_from_json(meta["stats"])


def move_aside(path: Path) -> Path | None:
    """Rename a bad cache file to ``<name>.bad-<unix time>``; returns the new path (None if it vanished)."""
    target = path.with_name(f"{path.name}.bad-{int(time.time())}-{os.getpid()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    return target
