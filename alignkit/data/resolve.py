"""Which files (or which dataset) one source names: a file, a glob, a folder's split, or a hub name.

A source path is, in this order:

* an existing **file** (any suffix ``sources.READERS`` reads, optionally compressed);
* an existing **folder**: a ``datasets.save_to_disk`` folder (it holds ``dataset_dict.json`` or
  ``state.json``), or a folder in a layout ``datasets.load_dataset`` reads (``train.parquet`` +
  ``test.parquet`` as verl writes them, the hub layout ``data/train-00000-of-00002.parquet``, a
  ``README.md`` with ``configs:``). The files of the wanted split are found by ``datasets``' own
  rules (``load_dataset_builder``), then read here file by file, so JSON Lines problems keep their
  ``file:line``; a split whose files this module cannot read is loaded by ``load_dataset``;
* a **glob** (``data/*.jsonl``, ``train-*.parquet``, ``**`` recursive), matched files in sorted order;
* a **hub name** (``org/name``), loaded by ``datasets.load_dataset``.

``split`` and ``subset`` (``load_dataset``'s ``name``: a config such as gsm8k's ``main``) apply to
folders and hub names. A lone file or a glob is split ``train``, as in ``datasets``; asking it for
another split is an error, never ignored. A missing split lists the splits there are.

Left out: reading the files (``sources.py``) and what the columns mean (``formats.py``).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.errors import DataError

GLOB_CHARS = ("*", "?", "[")
SET_SPLIT = "set the source's split (split: NAME in a data.train / data.eval entry, or --split NAME)."
SET_SUBSET = "set the source's subset (subset: NAME in a data.train / data.eval entry, or --subset NAME)."
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class Resolved:
    """What a source names: ``files`` to read here, or a dataset ``datasets`` loads (``saved``/``hub``/``loader``)."""

    kind: str  # "files" | "saved" (save_to_disk folder) | "loader" (load_dataset on a folder) | "hub"
    path: str
    split: str | None = None
    subset: str | None = None
    files: list[Path] = field(default_factory=list)


def readable_suffix(path: Path) -> str:
    """``.jsonl`` for ``a.jsonl`` and ``a.jsonl.gz``: the format suffix under any compression suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and not path.startswith((".", "/", "~")) and not Path(path).suffix


def _where_to_look(path: Path) -> str:
    """A hint naming what the nearest existing folder holds (for a typo in a file name)."""
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return ""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    shown = ", ".join(entries[:12]) + (f", ... ({len(entries)} entries)" if len(entries) > 12 else "")
    return f" The folder {folder} holds: {shown or 'nothing'}."


def _only_train(path: str, split: str | None, subset: str | None, what: str) -> None:
    if split not in (None, "train"):
        raise DataError(
            f"split {split!r} was asked of {what}, which is one split ('train'), as in datasets. Point the path "
            "at that split's file (or a folder holding train/test files) instead, or drop the split.",
            location=path,
        )
    if subset is not None:
        raise DataError(
            f"subset {subset!r} was asked of {what}; a subset (load_dataset's name) applies to a folder with a "
            "README `configs:` section or a hub dataset. Point the path at the subset's files, or drop the subset.",
            location=path,
        )


def _glob_files(pattern: str) -> list[Path]:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    return [p for p in matches if p.is_file()]


def pick_split(splits: list[str], split: str | None, where: str, how: str) -> str:
    if split is None:
        if "train" in splits:
            return "train"
        if len(splits) == 1:
            return splits[0]
        raise DataError(f"expected a split / found splits {splits} ({how}) and none is 'train'; {SET_SPLIT}",
                        location=where)
    if split not in splits:
        raise DataError(f"expected split {split!r} / found splits {splits} ({how}); {SET_SPLIT}", location=where)
    return split


def _folder_split_files(folder: Path, split: str | None, subset: str | None) -> Resolved:
    """The files of one split of a folder, by ``datasets``' layout rules (README configs included)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder.resolve()), name=subset)
    except ValueError as err:
        text = str(err)
        if "BuilderConfig" in text and "not found" in text:
            inside = _subset_folder(folder, subset) if subset else None
            if inside is not None and "'default'" in text.split("Available:", 1)[-1]:
                inner = _folder_split_files(inside, split, None)  # a subset sub-folder, no README configs
                return Resolved(inner.kind, str(folder), inner.split, subset, inner.files)
            if not _has_configs(folder):
                dirs = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
                raise DataError(f"expected subset {subset!r} / found no README `configs:` and no sub-folder of that "
                                f"name (sub-folders: {dirs or 'none'}); {SET_SUBSET}", location=str(folder)) from None
            raise DataError(f"expected subset {subset!r} / found subsets {text.split('Available:', 1)[-1].strip()} "
                            f"(the folder's README configs); {SET_SUBSET}", location=str(folder)) from None
        if "Config name is missing" in text:
            found = re.search(r"available configs: (\[.*?\])", text)
            raise DataError(f"expected a subset / found none given, and the folder's README defines subsets "
                            f"{found.group(1) if found else '(several)'}; {SET_SUBSET}", location=str(folder)) from None
        raise DataError(_no_layout(folder, err), location=str(folder)) from None
    except Exception as err:  # EmptyDatasetError, FileNotFoundError, mixed formats, ...
        raise DataError(_no_layout(folder, err), location=str(folder)) from None
    data_files = builder.config.data_files or {}
    splits = {str(name): [Path(str(f)) for f in files] for name, files in data_files.items()}
    if not splits:
        raise DataError(_no_layout(folder, None), location=str(folder))
    chosen = pick_split(sorted(splits), split, str(folder), "by datasets' layout rules")
    files = splits[chosen]
    tops = [] if _has_configs(folder) else _subset_folders(folder, files)
    if len(tops) > 1:
        raise DataError(f"expected the {chosen!r} files of one subset / found them in the sub-folders "
                        f"{[t + '/' for t in tops]}, which datasets would merge (no README `configs:` names them); "
                        f"give a sub-folder's name as the subset: {SET_SUBSET}", location=str(folder))
    from alignkit.data.sources import READERS  # sources imports this module

    if all(readable_suffix(f) in READERS for f in files):
        return Resolved("files", str(folder), chosen, subset, files)
    return Resolved("loader", str(folder), chosen, subset)


def _has_configs(folder: Path) -> bool:
    readme = folder / "README.md"
    try:
        return readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace"), re.M) is not None
    except OSError:
        return False


def _subset_folders(folder: Path, files: list[Path]) -> list[str]:
    """The distinct sub-folders (relative paths) below the files' common folder when the files of one split
    lie in several of them: gsm8k's ``main/`` and ``socratic/`` as a hub snapshot without its README, or
    ``data/en/`` and ``data/fr/``. Shards of one folder give none; several are subsets, not shards."""
    root = os.path.realpath(folder)
    dirs = []
    for f in files:
        rel = Path(os.path.relpath(os.path.realpath(str(f)), root)).parts[:-1]
        if rel[:1] == ("..",):
            return []
        dirs.append(rel)
    common = os.path.commonprefix(dirs) if dirs else ()
    tops = {"/".join(d[:len(common) + 1]) for d in dirs if len(d) > len(common)}
    return sorted(tops) if len(tops) > 1 else []


def _subset_folder(folder: Path, subset: str) -> Path | None:
    """The sub-folder a subset names when no README defines subsets: ``folder/subset`` or, for a nested
    layout (``data/en/``), the one sub-folder of that name."""
    if (folder / subset).is_dir():
        return folder / subset
    found = [p for p in folder.glob(f"**/{subset}") if p.is_dir()]
    return found[0] if len(found) == 1 else None


def _no_layout(folder: Path, err: Exception | None) -> str:
    why = f" ({type(err).__name__}: {str(err)[:200]})" if err is not None else ""
    return ("expected a folder of data files datasets can read (train.parquet + test.parquet, "
            "data/train-00000-of-00002.parquet, *.jsonl, ...) or a folder written by datasets' save_to_disk "
            f"/ found none{why}.{_where_to_look(folder / 'x')}")


def resolve_source(path: str, split: str | None = None, subset: str | None = None) -> Resolved:
    """What one source path names (see the module docstring); an unreadable source raises ``DataError``."""
    local = Path(os.path.expanduser(path))
    if local.is_file():
        _only_train(path, split, subset, "a single file")
        return Resolved("files", path, "train", None, [local])
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            return Resolved("saved", str(local), split, subset)
        return _folder_split_files(local, split, subset)
    if any(c in path for c in GLOB_CHARS):
        files = _glob_files(str(local))
        if not files:
            raise DataError(f"expected files matching the glob {path!r} / found none.{_where_to_look(local)}",
                            location=path)
        _only_train(path, split, subset, "a glob of files")
        return Resolved("files", path, "train", None, files)
    if looks_like_hub_name(path):
        return Resolved("hub", path, split, subset)
    raise DataError(f"expected an existing file or folder / found nothing at {path!r}.{_where_to_look(local)}",
                    location=path)
