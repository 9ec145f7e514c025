"""Filesystem helpers: write a file or a directory atomically, serialise processes with a lock.

``atomic_write`` is the one way a file is written in place: a new temporary sibling (random name, created
exclusively, so a link planted next to the target is never written through), flushed and fsync'ed, then
renamed over the target (a link *at* the target is replaced, not followed); the file's mode follows the
umask like any other; on failure the temporary file is removed and the target is untouched.

``atomic_directory`` yields a temporary sibling folder; when the block succeeds the folder takes the
final name in one ``rename`` (an existing folder is moved aside first and removed after), and when
it fails the temporary folder is removed, so readers never see a half-written model.
``file_lock`` is an advisory ``fcntl`` lock (POSIX only), enough for several local processes
racing to build the same cache entry.

Deliberately left out: locks across machines on network filesystems (NFS ``flock`` semantics vary).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; see the module docstring."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL, 0600
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(handle, 0o666 & ~mask)
        with os.fdopen(handle, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``final_dir`` that replaces it atomically on success."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp_dir, 0o777 & ~mask)  # mkdtemp makes it private; the result is an ordinary folder (umask)
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    old_dir = None
    if final_dir.exists():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
        os.rename(final_dir, old_dir / final_dir.name)
    os.rename(tmp_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (created if missing) for the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
