"""Atomic file writes: a crash mid-write never leaves a partial file in place of a good one.

Usage::

    with atomic_open(path) as f:      # a binary file; replaces ``path`` only on success
        torch.save(state, f)
    atomic_write_text(path, "text")

The data goes to a temporary file in the same folder (same file system, so ``os.replace`` is
atomic), is flushed and fsynced, then replaces ``path``, and the folder is fsynced. On any error,
KeyboardInterrupt included, the temporary file is removed and ``path`` keeps its previous content.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: Path | str) -> Iterator[BinaryIO]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp would leave 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """The rename lasts through a power loss only once the folder is on disk too (so best.pt,
    written before last.pt, is there whenever last.pt is)."""
    with contextlib.suppress(OSError):  # a file system that cannot open or sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_partial_files(folder: Path | str) -> list[Path]:
    """Delete what a writer killed mid-write (SIGKILL, a lost node) left of its temporary files.
    Call it only where no write is in flight, e.g. before a stage starts writing its checkpoints."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
