import os

import pytest

from trueface import atomic
from trueface.atomic import atomic_write_bytes, atomic_write_text


def test_atomic_write_creates_and_replaces(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["a.txt"]
    assert (target.stat().st_mode & 0o777) == 0o644


def test_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "good")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "partial")
    assert target.read_text() == "good"
    assert os.listdir(tmp_path) == ["metrics.csv"]  # temporary file removed


def test_failure_while_writing_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"good")

    def boom(fd):
        raise OSError("I/O error")

    # Fails after the data went to the temporary file but before it could replace the target.
    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_bytes(target, b"new and partial")
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_missing_parent_folders_are_created(tmp_path):
    assert atomic_write_text(tmp_path / "a" / "b" / "c.txt", "x").read_text() == "x"


def test_partial_files_of_a_killed_writer_are_removed_and_good_files_kept(tmp_path):
    atomic_write_bytes(tmp_path / "last.pt", b"good")
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")  # what SIGKILL mid-write leaves
    removed = atomic.remove_partial_files(tmp_path)
    assert [p.name for p in removed] == [".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert (tmp_path / "last.pt").read_bytes() == b"good"


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    """Without it a power loss can undo the rename: last.pt's could survive and best.pt's not."""
    import stat

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append(
        "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file") or real_fsync(fd))
    atomic_write_text(tmp_path / "a.json", "{}")
    assert events == ["file", "replace", "folder"]
