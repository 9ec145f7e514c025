"""Rows that ``datasets`` loads: ``save_to_disk`` folders, folder splits only ``load_dataset`` reads, hub names.

Each row is a ``RawRow`` located as ``name (split S):row N``. A wrong split lists the splits there
are; an unreachable hub is reported after a short connection probe instead of ``datasets``' half
minute of retries, with what to do offline. Left out: files this package reads itself
(``sources.py``) and which source is which (``resolve.py``). Hub access is cached by ``datasets``.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from alignkit.data.resolve import SET_SPLIT, pick_split
from alignkit.data.sources import RawRow
from alignkit.errors import DataError


def iter_datasets_folder(path: Path, split: str | None = None) -> Iterator[RawRow]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # not a save_to_disk folder (FileNotFoundError, ValueError, ...)
        raise DataError(f"expected a folder written by datasets' save_to_disk / found one it cannot read "
                        f"({type(err).__name__}: {str(err)[:200]})", location=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = pick_split(sorted(loaded), split, str(path), "in the folder's dataset_dict.json")
        loaded = loaded[split]
    return _iter_dataset(loaded, table_name(str(path), split or "train"))


def table_name(name: str, split: str) -> str:
    """``name (split S)``: the location prefix of a ``datasets`` table's rows (no square brackets, which
    rich would take for markup and drop from a printed error)."""
    return f"{name} (split {split})"


def _iter_dataset(dataset: Any, name: str) -> Iterator[RawRow]:
    for index, item in enumerate(dataset, start=1):  # row by row: a large split is not copied into a list
        yield RawRow(f"{name}:row {index}", item)


def iter_loader_folder(path: Path, split: str, subset: str | None) -> Iterator[RawRow]:
    """A folder split whose files only ``datasets`` reads (``.txt``, ``.arrow``, ``.tsv`` ...)."""
    import datasets

    try:
        loaded = datasets.load_dataset(str(path), name=subset, split=split)
    except Exception as err:
        raise DataError(f"could not load split {split!r} of the folder with datasets.load_dataset "
                        f"({type(err).__name__}: {str(err)[:200]})", location=str(path)) from None
    return _iter_dataset(loaded, table_name(str(path), split))


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


def _unknown_split(err: Exception) -> str | None:
    """``datasets``' 'Unknown split "x". Should be one of [...]' as a list of split names, if it is that."""
    found = re.search(r"Unknown split \"?([^\".]*)\"?\. Should be one of (\[.*?\])", str(err))
    return found.group(2) if found else None


def iter_hub(name: str, split: str | None = None, subset: str | None = None) -> Iterator[RawRow]:
    advice = ("No local file or folder has this name either. Without network access, download it elsewhere, "
              "`save_to_disk` it, and point the source's path at that folder (or, if it is in the local "
              "datasets cache, set HF_DATASETS_OFFLINE=1).")
    what = f"hub dataset {name!r}" + (f" (subset {subset!r})" if subset else "")
    why = _hub_unreachable()
    if why is not None:
        raise DataError(f"could not load {what}: {why}. {advice}", location=name)
    split = split or "train"
    try:
        import datasets

        loaded = datasets.load_dataset(name, subset, split=split)
    except Exception as err:
        splits = _unknown_split(err)
        if splits is not None:
            raise DataError(f"expected split {split!r} / found splits {splits} in {what}; {SET_SPLIT}",
                            location=name) from None
        raise DataError(
            f"could not load {what} (split {split!r}): {type(err).__name__}: {str(err)[:200]}. {advice}",
            location=name,
        ) from None
    return _iter_dataset(loaded, table_name(name, split))
