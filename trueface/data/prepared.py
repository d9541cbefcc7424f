"""The prepared cache (``data.prepared: uint8``): each image decoded once into memory-mappable shards.

Usage::

    jobs = plan_shards(samples, decode_size=224, cache_dir=".cache/trueface")   # what is missing
    for job in jobs: write_shard(job)                  # or in parallel: jobs.prepare maps them on Ray
    images = PreparedImages.open(".cache/trueface", 224)
    img = images.load(sample.path, 224)                # == load_rgb(sample.path, 224), pixel for pixel

What is stored is exactly what the decode path gives (``load_rgb(path, decode_size)``: EXIF
orientation, the one RGB conversion, the power-of-two reduce towards the stage's size) as raw
uint8 RGB, so training from the cache is bit-identical to training from the files: the cache
removes the JPEG/PNG decode from every epoch, not a step of the recipe. The random crop, resize
and augmentation still run per epoch on what it returns.

Layout: ``<cache_dir>/prepared/uint8-<decode size>-v<recipe>/`` holds shards: ``<id>.u8`` (the
images' bytes back to back, read with ``np.memmap``) and beside each its index ``<id>.json``
(path, file size, mtime and ctime, offset, height, width of every image in it). Keyed by the
manifest: an image is served from the cache only while its file has the size, mtime and ctime it
was prepared from (trueface.data.layout.file_stamp), so a changed, added or replaced file is
prepared again by the next build and, until then, decoded from the file (never served stale).
Each shard's ``.u8`` and then its ``.json`` are written to a temporary name and renamed, so an
interrupted build leaves whole shards only, and a rerun prepares just the rest. Not safe for two builders at once on one folder: build it from the
driver before training (jobs.pipeline, or ``python -m jobs.prepare``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from trueface.atomic import atomic_open, atomic_write_text
from trueface.data.decode import ImageReadError, load_rgb
from trueface.data.layout import Sample, file_stamp

#: Bump when what is stored changes: the folder name changes with it, so old caches are never read.
RECIPE_VERSION = 1
SHARD_IMAGES = 256  # images per shard: 50 MB at 256 px, 800 MB at 1024 px


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its files' paths (absolute) and where the shard goes."""
    folder: str
    shard_id: str
    paths: tuple[str, ...]
    decode_size: int | None


@dataclass(frozen=True)
class Entry:
    shard: str
    offset: int
    height: int
    width: int
    stamp: tuple[int, ...]  # the file's file_stamp (size, mtime_ns, ctime_ns) when prepared


def prepared_folder(cache_dir: str | os.PathLike, decode_size: int | None) -> Path:
    """The cache of one decode size (Pillow's version in the name: another build may decode otherwise)."""
    size = decode_size or "full"
    return Path(cache_dir) / "prepared" / f"uint8-{size}-v{RECIPE_VERSION}-pillow{PIL.__version__}"


def path_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """The file's ``file_stamp``, or None when it cannot be read."""
    try:
        return file_stamp(os.stat(path))
    except OSError:
        return None


def read_index(folder: str | os.PathLike) -> dict[str, list[Entry]]:
    """path -> its Entries in the complete shards of ``folder`` (none when it does not exist). A file
    prepared again after it changed has one per version: ``current`` picks the one it matches."""
    index: dict[str, list[Entry]] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return index
    for sidecar in sorted(folder.glob("*.json")):
        try:
            rows = json.loads(sidecar.read_text())["images"]
        except (OSError, ValueError, KeyError) as exc:
            raise ImageReadError(sidecar, f"prepared cache index unreadable ({exc}); delete {folder} to rebuild it") from exc
        for r in rows:
            index.setdefault(r["path"], []).append(Entry(sidecar.stem, r["offset"], r["height"], r["width"],
                                                         tuple(r["stamp"])))
    return index


def current(index: dict[str, list[Entry]], path: str) -> Entry | None:
    """The entry prepared from ``path`` as the file is now (same size, mtime and ctime), if any."""
    stamp = path_stamp(path)
    return next((e for e in index.get(path, ()) if e.stamp == stamp), None)


def plan_shards(samples: Sequence[Sample], decode_size: int | None, cache_dir: str | os.PathLike) -> list[ShardJob]:
    """The shards still to write for ``samples``: files not in the cache, or changed since prepared."""
    folder = prepared_folder(cache_dir, decode_size)
    index = read_index(folder)
    todo, seen = [], set()
    for s in samples:
        path = str(Path(s.path).absolute())
        if path in seen:
            continue
        seen.add(path)
        if current(index, path) is None:
            todo.append(path)
    jobs = []
    for start in range(0, len(todo), SHARD_IMAGES):
        chunk = tuple(todo[start:start + SHARD_IMAGES])
        stamps = "\n".join(f"{p}\t{path_stamp(p)}" for p in chunk)
        # Named by its content: a rerun after an interruption plans the same ids for what is left.
        shard_id = hashlib.sha1(f"{decode_size}\n{stamps}".encode()).hexdigest()[:16]
        jobs.append(ShardJob(str(folder), shard_id, chunk, decode_size))
    return jobs


def write_shard(job: ShardJob) -> int:
    """Decode the shard's files and write it (bytes, then index); returns its image count. A file
    that cannot be decoded raises ImageReadError naming it (the data check should have excluded it)."""
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows, offset = [], 0
    with atomic_open(folder / f"{job.shard_id}.u8") as out:
        for path in job.paths:
            stamp = path_stamp(path)  # before decoding: a file replaced meanwhile is stale, never newer
            try:
                pixels = np.asarray(load_rgb(path, job.decode_size), dtype=np.uint8)
            except ImageReadError as exc:
                raise ImageReadError(exc.path, f"{exc.reason or exc} (data.prepared cannot prepare it; "
                                               "the data check should have excluded it)") from exc
            out.write(np.ascontiguousarray(pixels).tobytes())
            rows.append({"path": path, "offset": offset, "height": int(pixels.shape[0]),
                         "width": int(pixels.shape[1]), "stamp": list(stamp or (0, 0))})
            offset += pixels.size
    atomic_write_text(folder / f"{job.shard_id}.json",
                      json.dumps({"decode_size": job.decode_size, "recipe": RECIPE_VERSION, "images": rows}) + "\n")
    return len(rows)


#: (write_shard, jobs) -> each job's image count as it finishes, in any order: how a build runs its
#: shards (in this process by default; jobs.prepare maps them on Ray tasks).
ShardMap = Callable[[Callable[[ShardJob], int], Sequence[ShardJob]], Iterable[int]]


def _in_process(fn: Callable[[ShardJob], int], jobs: Sequence[ShardJob]) -> Iterator[int]:
    return (fn(job) for job in jobs)


def build_prepared(samples: Sequence[Sample], decode_size: int | None, cache_dir: str | os.PathLike,
                   shard_map: ShardMap | None = None, progress: bool = True) -> tuple[int, int]:
    """Bring the cache up to date for ``samples``; returns (images already there, images prepared now)."""
    from tqdm import tqdm

    jobs = plan_shards(samples, decode_size, cache_dir)
    todo = sum(len(j.paths) for j in jobs)
    unique = len({str(Path(s.path).absolute()) for s in samples})
    if not jobs:
        return unique, 0
    desc = f"preparing {todo} images (uint8, decode size {decode_size or 'full'})"
    with tqdm(total=todo, desc=desc, unit="img", disable=not progress, mininterval=2) as bar:
        for count in (shard_map or _in_process)(write_shard, jobs):
            bar.update(count)
    return unique - todo, todo


class PreparedImages:
    """Images served from the cache, the file decoded where the cache has no current copy.
    Picklable (DataLoader workers): the memory maps are opened in each process on first use."""

    def __init__(self, folder: str | os.PathLike, decode_size: int | None, index: dict[str, list[Entry]]) -> None:
        self.folder, self.decode_size, self.index = Path(folder), decode_size, index
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, decode_size: int | None) -> "PreparedImages":
        folder = prepared_folder(cache_dir, decode_size)
        return cls(folder, decode_size, read_index(folder))

    def coverage(self, samples: Sequence[Sample]) -> int:
        """How many of ``samples`` the cache holds a current copy of."""
        return sum(1 for s in samples if current(self.index, str(Path(s.path).absolute())) is not None)

    def load(self, path: str | os.PathLike, decode_size: int | None) -> Image.Image:
        """``load_rgb(path, decode_size)``, from the cache where it holds the file as it is now."""
        path = str(Path(path).absolute())
        entry = current(self.index, path) if decode_size == self.decode_size else None
        if entry is None:
            return load_rgb(path, decode_size)
        data = self._map(entry.shard)
        size = entry.height * entry.width * 3
        return Image.fromarray(np.array(data[entry.offset:entry.offset + size]).reshape(entry.height, entry.width, 3))

    def __call__(self, path: str | os.PathLike, decode_size: int | None) -> Image.Image:  # an ImageDataset's ``load``
        return self.load(path, decode_size)

    def _map(self, shard: str) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.folder / f"{shard}.u8", dtype=np.uint8, mode="r")
        return self._maps[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}
