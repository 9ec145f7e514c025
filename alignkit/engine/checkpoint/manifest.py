"""A checkpoint's integrity: ``manifest.json`` (every file's size and sha256) and the checks against it.

``write_manifest`` is the last thing written into a checkpoint before its commit; ``verify_checkpoint``
says what is wrong with one (a missing, truncated or changed file, a file the manifest does not list,
an RNG file that does not parse), or None. A checkpoint without a manifest (an older alignkit) gets
the RNG check and a warning. Left out: what to do with a damaged one (``resume``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from alignkit.engine.checkpoint.layout import MANIFEST, MANIFEST_FORMAT, write_text_atomic

log = logging.getLogger("alignkit.engine.checkpoint")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> Path:
    """``folder/manifest.json``: size and sha256 of every file below ``folder`` (written atomically)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        if path.name.startswith(f".{MANIFEST}."):
            continue
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    out = folder / MANIFEST
    write_text_atomic(out, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
    return out


def _check_rng_files(path: Path) -> str | None:
    for rng_file in sorted((path / "rng").glob("rank-*.json")):
        try:
            state = json.loads(rng_file.read_text())["state"]
            for key in ("python", "numpy", "torch"):
                state[key]
        except Exception as error:  # garbage, truncated JSON, wrong layout
            return f"{rng_file.relative_to(path)} is not an RNG state ({type(error).__name__}: {error})"
    return None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """What is wrong with checkpoint ``path`` (``step-N``), or None when it is intact.

    Intact: every file its manifest lists has the recorded size and sha256, and its RNG files parse.
    A checkpoint without a manifest (written before manifests existed) gets only the RNG check.
    """
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
            files = manifest["files"]
            if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
                raise ValueError(f"format {manifest.get('format')!r}")
            if not all(isinstance(entry, dict) for entry in files.values()):
                raise ValueError("a file entry is not {size, sha256}")
        except Exception as error:
            return f"{MANIFEST} is unreadable ({type(error).__name__}: {error})"
        present = sorted(f.relative_to(path).as_posix() for f in path.rglob("*")
                         if (f.is_file() or f.is_symlink()) and f.name != MANIFEST
                         and not f.name.startswith(f".{MANIFEST}."))
        unlisted = [name for name in present if name not in files]
        if unlisted:  # loading would read files nothing vouches for (a manifest naming other files)
            return f"{unlisted[0]} is not in its {MANIFEST} (the manifest does not describe this checkpoint)"
        for name, entry in files.items():
            file = path / name
            if ".." in Path(name).parts or not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size} bytes instead of {entry.get('size')} (truncated or replaced)"
            if _sha256(file) != entry.get("sha256"):
                return f"{name} was changed after it was saved (sha256 mismatch)"
    else:
        log.warning("%s has no %s (saved by an older alignkit): its files cannot be verified", path, MANIFEST)
    return _check_rng_files(path)
