"""Where runs and results are kept: a local or shared-filesystem path, or a URI (``s3://``,
``gs://``, ``hdfs://``, ...) that pyarrow's filesystems reach.

Usage::

    mirror = Mirror.of("s3://bucket/runs/demo", cache_dir="~/.cache/trueface")
    mirror.pull("stage1/stage.json")          # what an earlier driver or another node wrote
    ...write under mirror.local...
    mirror.push("stage1", "tensorboard")      # new or changed files go up

Training always reads and writes a local folder: torch.save, TensorBoard and the table writers
want one, and a checkpoint written where it is read is fast. For a URI that folder is a staging
copy under ``<cache>/staging/<scheme>/<bucket>/<path>``, and a :class:`Mirror` copies files each
way. For a path, the mirror's two ends are the same folder and push/pull do nothing.

Credentials come from the filesystem's usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for S3-compatible servers, ``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...), never from the config: nothing that is saved or logged
holds them. A URI carrying ``access_key=``/``secret_key=`` is refused for that reason.

Uploads go to a temporary name and are renamed once complete, downloads likewise: a copy cut
off never replaces a good file.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from trueface.atomic import atomic_open

CHUNK = 8 << 20
SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token")
OBJECT_STORES = ("s3", "gcs")  # no folders to create


class FileStat(NamedTuple):
    size: int
    mtime_ns: int


class StorageError(RuntimeError):
    """A storage location cannot be reached or read; the message names it and what to check."""


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a path written as a URI)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def as_path(location: str | Path) -> Path:
    """A path, or a ``file://`` URI's path (percent-escapes decoded, as ``Path.as_uri`` writes them)."""
    text = str(location)
    if text.startswith("file://"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{text}: a file:// URI names a file on this machine (file:///path), "
                               f"not on host {parsed.netloc!r}")
        text = url2pathname(parsed.path)
    return Path(text).expanduser().absolute()


def absolute(location: str | Path) -> str:
    """A URI as it is, a path made absolute: what is handed to other processes and nodes."""
    return str(location) if is_uri(location) else str(as_path(location))


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a URI (keeping a ``?query`` at the end) or a path."""
    if not is_uri(location):
        return str(as_path(location).joinpath(*parts))
    base, _, query = location.partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{joined}?{query}" if query else joined


def check_location(location: str, key: str) -> None:
    """Refuse what cannot work before anything starts: credentials in a URI, an unknown scheme."""
    if not is_uri(location):
        return
    query = location.partition("?")[2]
    secrets = [k for k in SECRET_QUERY_KEYS if f"{k}=" in query]
    if secrets:
        raise StorageError(
            f"{key}={location.split('?')[0]}?...: the URI holds {', '.join(secrets)}; it would be saved in "
            f"config.yaml and the logs. Give credentials through the environment instead "
            f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)")
    _filesystem(location, key)


def check_writable(location: str, key: str) -> None:
    """Write and delete a small object at a URI location, so a wrong bucket or missing credentials
    stop a job before it trains, with the key that named the location."""
    if not is_uri(location):
        return
    fs, root = _filesystem(location, key)
    probe = f"{root.rstrip('/')}/.trueface-write-check"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(f"{key}: cannot write to {_storage_error(location, exc)}") from exc


def _filesystem(location: str, key: str = "storage"):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # ArrowInvalid (unknown scheme), OSError (a filesystem it cannot build)
        raise StorageError(f"{key}: cannot open {location}: {exc}") from exc


def open_filesystem(location: str, key: str = "storage"):
    """(pyarrow filesystem, path in it) of a URI; StorageError naming ``key`` when it cannot be opened."""
    return _filesystem(location, key)


def _storage_error(location: str, exc: Exception) -> StorageError:
    hint = ""
    if location.startswith("s3://"):
        hint = (" Check the bucket name and the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE), and AWS_ENDPOINT_URL for an S3-compatible server.")
    elif location.startswith("gs://"):
        hint = " Check the bucket name and GOOGLE_APPLICATION_CREDENTIALS."
    return StorageError(f"{location}: {exc}.{hint}")


def staging_dir(location: str, cache_dir: str | Path) -> Path:
    """The local working copy of a URI location (the location itself for a path)."""
    if not is_uri(location):
        return as_path(location)
    scheme, rest = location.split("://", 1)
    return Path(cache_dir).expanduser().absolute() / "staging" / scheme / rest.partition("?")[0].strip("/")


@dataclass
class Mirror:
    """A local folder and, for a URI location, the remote folder it mirrors."""

    local: Path
    remote: str | None = None
    _pushed: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, location: str | Path, cache_dir: str | Path) -> "Mirror":
        """The process's mirror of ``location``, staged under ``cache_dir`` (see :func:`mirror`)."""
        return mirror(staging_dir(str(location), cache_dir), str(location))

    @property
    def location(self) -> str:
        """Where the files are kept, as users name it: the URI, or the local folder."""
        return self.remote or str(self.local)

    def child(self, *parts: str) -> "Mirror":
        return Mirror(self.local.joinpath(*parts), join(self.remote, *parts) if self.remote else None)

    def _remote_root(self):
        """(pyarrow filesystem, the remote folder's path in it, without a trailing slash)."""
        fs, root = _filesystem(self.remote)
        return fs, root.rstrip("/")

    def push(self, *relpaths: str) -> list[str]:
        """Upload the files under ``relpaths`` (files or folders; none: everything) that are new or
        changed since this mirror last pushed them. Returns the relative paths uploaded."""
        if self.remote is None:
            return []
        fs, root = self._remote_root()
        uploaded = []
        for path in self._local_files(relpaths):
            rel = path.relative_to(self.local).as_posix()
            stat = path.stat()
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._pushed.get(rel) == signature:
                continue
            try:
                _upload(fs, path, f"{root}/{rel}")
            except OSError as exc:
                raise _storage_error(join(self.remote, rel), exc) from exc
            self._pushed[rel] = signature
            uploaded.append(rel)
        return uploaded

    def pull(self, *relpaths: str, skip_suffixes: tuple[str, ...] = ()) -> list[str]:
        """Download the remote files under ``relpaths`` (none: everything) that are missing here,
        differ in size or are older here than remotely. A file named in ``relpaths`` that no longer
        exists remotely is removed here too: the URI is where the files are kept and this folder
        only a copy, so a stage, checkpoint or thresholds file deleted there must not live on in
        the copy (a pipeline would skip the deleted stage, a scorer use deleted thresholds).
        Returns what was downloaded."""
        if self.remote is None:
            return []
        fs, root = self._remote_root()
        downloaded = []
        for rel in relpaths or ("",):
            try:
                infos = self._remote_infos(fs, root, rel)
                if rel and not infos and (self.local / rel).is_file():
                    (self.local / rel).unlink(missing_ok=True)
                    self._pushed.pop(rel, None)
                for info in infos:
                    name = info.path[len(root) + 1:]
                    local = self.local / name
                    if name.endswith((".tmp", *skip_suffixes)) or _up_to_date(local, info):
                        continue
                    with fs.open_input_stream(info.path) as src, atomic_open(local) as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                    stat = local.stat()
                    self._pushed[name] = (stat.st_size, stat.st_mtime_ns)  # no need to send it back
                    downloaded.append(name)
            except OSError as exc:
                raise _storage_error(join(self.remote, rel), exc) from exc
        return downloaded

    @staticmethod
    def _remote_infos(fs, root: str, relpath: str) -> list:
        """pyarrow FileInfos of the files at or under ``root/relpath`` (none if it does not exist)."""
        import pyarrow.fs as pafs

        base = f"{root}/{relpath}".rstrip("/")
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            return [info]
        if info.type == pafs.FileType.Directory:
            return [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File]
        return []

    def files(self, relpath: str = "") -> dict[str, FileStat]:
        """Relative path -> size and modification time of every file under ``relpath``, where they are kept."""
        if self.remote is None:
            base = self.local / relpath
            found = [base] if base.is_file() else (base.rglob("*") if base.is_dir() else [])
            return {p.relative_to(self.local).as_posix(): FileStat(p.stat().st_size, p.stat().st_mtime_ns)
                    for p in found if p.is_file()}
        fs, root = self._remote_root()
        try:
            infos = self._remote_infos(fs, root, relpath)
        except OSError as exc:
            raise _storage_error(join(self.remote, relpath), exc) from exc
        return {i.path[len(root) + 1:]: FileStat(i.size, i.mtime_ns or 0) for i in infos}

    def exists(self, relpath: str) -> bool:
        if self.remote is None:
            return (self.local / relpath).exists()
        import pyarrow.fs as pafs

        fs, root = self._remote_root()
        try:
            return fs.get_file_info(f"{root}/{relpath}").type != pafs.FileType.NotFound
        except OSError as exc:
            raise _storage_error(join(self.remote, relpath), exc) from exc

    def delete(self, relpath: str) -> None:
        """Remove a file or folder here and remotely (missing is fine)."""
        local = self.local / relpath
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)
        if self.remote is None:
            return
        import pyarrow.fs as pafs

        fs, root = self._remote_root()
        target = f"{root}/{relpath}"
        try:
            kind = fs.get_file_info(target).type
            if kind == pafs.FileType.File:
                fs.delete_file(target)
            elif kind == pafs.FileType.Directory:
                fs.delete_dir(target)
        except OSError as exc:
            raise _storage_error(join(self.remote, relpath), exc) from exc

    def remove_partial_uploads(self, *relpaths: str) -> list[str]:
        """Delete the temporary objects under ``relpaths`` that an uploader killed between its copy
        and its delete left behind (see ``_upload``): the remote side of
        trueface.atomic.remove_partial_files, with the same rule: call it only where no upload is
        in flight, e.g. before a stage starts writing. Returns the relative paths removed."""
        if self.remote is None:
            return []
        fs, root = self._remote_root()
        removed = []
        for rel in relpaths:
            try:
                for info in self._remote_infos(fs, root, rel):
                    if info.path.endswith(".tmp"):
                        fs.delete_file(info.path)
                        removed.append(info.path[len(root) + 1:])
            except OSError as exc:
                raise _storage_error(join(self.remote, rel), exc) from exc
        return removed

    def _local_files(self, relpaths: tuple[str, ...]) -> list[Path]:
        files = []
        for rel in relpaths or ("",):
            path = self.local / rel
            if path.is_file():
                files.append(path)
            elif path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        return files


_MIRRORS: dict[tuple[Path, str | None], Mirror] = {}


def mirror(local: Path, location: str) -> Mirror:
    """The process's one mirror of ``location`` (staged at ``local``): it remembers what it pushed,
    so each push sends only files written since."""
    key = (Path(local), location if is_uri(location) else None)
    if key not in _MIRRORS:
        _MIRRORS[key] = Mirror(*key)
    return _MIRRORS[key]


def _up_to_date(local: Path, info) -> bool:
    """Same size, and not older than the remote copy (checkpoints keep their size from epoch to
    epoch; a copy left by an earlier run is older than the upload that replaced it)."""
    if not local.is_file():
        return False
    stat = local.stat()
    remote_ns = info.mtime_ns if info.mtime_ns is not None else 0
    return stat.st_size == info.size and stat.st_mtime_ns >= remote_ns


def _upload(fs, source: Path, target: str) -> None:
    """Upload to a temporary name, then rename (a server-side copy on object stores). Writing the
    target directly is not safe: pyarrow completes an S3 upload even when the writer fails, so a
    cut-off upload would replace a good object with a partial one."""
    staged = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
    if fs.type_name not in OBJECT_STORES:
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    try:
        with open(source, "rb") as src, fs.open_output_stream(staged) as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(staged)
        raise
    fs.move(staged, target)


def split_file(location: str) -> tuple[str, str]:
    """(folder location, file name) of a file's location, a URI's ``?query`` kept on the folder."""
    base, _, query = str(location).partition("?")
    parent, _, name = base.rpartition("/")
    return (f"{parent}?{query}" if query else parent), name


def fetch(location: str | Path, cache_dir: str | Path) -> Path:
    """A local file for ``location``: the path itself, or a URI's file downloaded to the staging area."""
    location = str(location)
    if not is_uri(location):
        return as_path(location)
    parent, name = split_file(location)
    folder = Mirror.of(parent, cache_dir)
    if not folder.pull(name) and not (folder.local / name).is_file():
        raise StorageError(f"{location} does not exist")
    return folder.local / name
