"""``models.fsutil.atomic_write``, the one in-place file writer (run files, data and reference caches, the
precision probe, ``alignkit data convert``): all or nothing, never through a link, mode from the umask."""

from __future__ import annotations

import os

import pytest

from alignkit.models.fsutil import atomic_write


def test_writes_text_and_bytes_and_replaces_an_existing_file(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temp file left


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path = tmp_path / "cache.bin"
    path.symlink_to(victim)
    atomic_write(path, b"new")
    assert victim.read_text() == "precious\n" and not path.is_symlink() and path.read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old\n")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode
