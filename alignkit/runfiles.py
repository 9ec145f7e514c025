"""Files of a run directory, written so that a planted symlink is never followed.

A shared ``output_dir`` may be writable by others: a symlink named ``.lock``, ``overrides.txt``
or ``config.yaml`` would make a plain ``open(path, "w")`` write through it wherever it points.
Every file here is opened with ``O_NOFOLLOW`` (and new ones with ``O_EXCL`` under a private
temporary name, then renamed into place), and a symlink where a run file should be is refused
with a ``UserError`` naming it. Files get the mode ``open()`` would give (``0o666`` less the
umask).

``lock(run_dir)`` takes an exclusive ``flock`` on ``run_dir/.lock`` for the life of the process
(the lock is not inherited by child processes: Python's descriptors are non-inheritable).

The trainers' and tools' files use the same helpers: ``open_append`` (``metrics.jsonl``),
``write_text`` (checkpoint pointers and RNG files, ``eval/samples.jsonl``, ``eval/eval.json``,
``report/report.md``, a sweep's job files and ``results.csv``) and ``refuse_symlink`` on the
folders a run writes into (``checkpoints/``, ``eval/``, ``report/``); ``final/`` is replaced by a
rename (``models.fsutil.atomic_directory``), which moves a planted link aside without following it.

Left out: files written by third-party code inside folders alignkit created itself (DeepSpeed's
checkpoint parts, transformers' export) - those folders are fresh temporary ones, never planted.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from alignkit.errors import UserError

LOCK = ".lock"
_LOCKS: list[int] = []  # descriptors of held locks


def _symlink_error(path: Path, what: str) -> UserError:
    return UserError(
        f"{path} ({what}) is a symbolic link; alignkit never writes a run's files through a link (someone with "
        "write access to the output directory could point it anywhere). Remove the link, or choose another "
        "run_name / output_dir."
    )


def refuse_symlink(path: Path, what: str = "run file") -> None:
    if Path(path).is_symlink():
        raise _symlink_error(Path(path), what)


def exists(path: Path) -> bool:
    """True when ``path`` exists as a regular file; a symlink there is refused."""
    refuse_symlink(path)
    return Path(path).exists()


def write_text(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes) to ``path`` atomically (``models.fsutil.atomic_write``); a link at ``path``
    is refused (a run directory's files are its own)."""
    from alignkit.models.fsutil import atomic_write

    refuse_symlink(Path(path))
    atomic_write(path, text)


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` (created if missing), never through a symlink."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path, "run history") from None
        raise
    with os.fdopen(fd, "a") as handle:
        handle.write(line.rstrip("\n") + "\n")


def open_append(path: Path, what: str = "run file"):
    """``path`` opened for appending text (created if missing, line-buffered), never through a symlink."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path, what) from None
        raise
    return os.fdopen(fd, "a", buffering=1)


def make_dir(path: Path, what: str = "run folder") -> Path:
    """Create the folder ``path`` (and parents) unless it exists; a symlink there is refused."""
    path = Path(path)
    refuse_symlink(path, what)
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock(run_dir: Path) -> None:
    """Hold an exclusive lock on ``run_dir/.lock`` until the process exits or ``release_locks()``."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path, "run lock") from None
        raise UserError(f"cannot create the run lock {path}: {exc.strerror}.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{run_dir} is in use by another running alignkit process.") from None
    _LOCKS.append(fd)


def release_locks() -> None:
    while _LOCKS:
        os.close(_LOCKS.pop())
