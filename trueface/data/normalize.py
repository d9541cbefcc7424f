"""Format normalisation (``data.normalize: jpeg:<quality>@<size>``): re-encode every image the same way.

Usage::

    q, size = parse_normalize("jpeg:95@256")
    img = normalize_image(load_rgb("face.png"), q, size)                 # in memory
    mirror = normalized_root(root, relpaths, "jpeg:95@256", cache_dir)   # once, cached on disk
    img = load_rgb(mirror / relpath, decode_size)                        # what training reads
    img = load_normalized("face.png", q, size, decode_size)              # the same, without the cache

Where reals are JPEG and fakes PNG (DESIGN.md flaw 5), a classifier can learn the file format.
Normalising decodes each file in full (``load_rgb``: orientation, oddities), resizes its shorter
side to exactly ``size`` (up or down: every image ends up in the same size class, so neither the
original size nor its resampling history separates the classes; an upscaled small image is still
upscaled alike for both classes), and encodes it as a baseline JPEG at ``quality`` with fixed
settings: 4:2:0 chroma subsampling (also removes the full-resolution chroma a PNG has and a camera
JPEG lacks), no EXIF or ICC profile, optimize and progressive off. The resize is Lanczos, done by
PIL in one pass (``reducing_gap=None``). Everything is deterministic for one Pillow/libjpeg build.

The cache mirrors ``root`` under ``<cache_dir>/normalized/<root name>-<spec>-<key>/`` with the same
relative paths (a ``.png`` keeps its name but holds JPEG data: PIL reads the content, not the
suffix). ``manifest.json`` there records each source's size, mtime and ctime, so only missing or changed
files are rebuilt, and a copy of a file no longer asked for (moved, deleted, excluded) is deleted;
every file is written to a temporary name and renamed, so an interrupted build leaves no partial
file. The Predictor's ``load_normalized`` encodes with the same function, so it
gives exactly the pixels the cached copy gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import PIL
from PIL import Image

from trueface.atomic import atomic_write_bytes, atomic_write_text
from trueface.config.choices import parse_normalize
from trueface.data.decode import ImageReadError, load_rgb, prepare_rgb
from trueface.data.layout import IMAGE_SUFFIXES, file_stamp

#: Bump when the recipe changes (filter, encoder settings): the cache folder's key changes with it.
RECIPE_VERSION = 1
RESAMPLE = Image.Resampling.LANCZOS
JPEG_SETTINGS = {"subsampling": "4:2:0", "optimize": False, "progressive": False}
MANIFEST = "manifest.json"


def normalized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side exactly ``size`` and the aspect ratio kept (rounded)."""
    short = min(width, height)
    if width <= height:
        return size, max(1, round(height * size / short))
    return max(1, round(width * size / short)), size


def encode_normalized(img: Image.Image, quality: int, size: int) -> bytes:
    """The normalised JPEG file of an RGB image: short side resized to ``size``, encoded at ``quality``."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    target = normalized_size(img.width, img.height, size)
    if img.size != target:
        img = img.resize(target, RESAMPLE, reducing_gap=None)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **JPEG_SETTINGS)  # no exif=, no icc_profile=
    return buf.getvalue()


def normalize_image(img: Image.Image, quality: int, size: int) -> Image.Image:
    """``img`` resized and JPEG re-encoded as the cache does it, decoded back (RGB, deterministic)."""
    with Image.open(io.BytesIO(encode_normalized(img, quality, size))) as out:
        out.load()
        return out


def load_normalized(path: str | os.PathLike, quality: int, size: int, decode_size: int | None) -> Image.Image:
    """What ``load_rgb(<cached copy of path>, decode_size)`` returns, computed in memory."""
    return prepare_rgb(normalize_image(load_rgb(path), quality, size), decode_size)


def normalized_folder(root: Path, spec: str, cache_dir: Path) -> Path:
    """The mirror's folder: readable name, key from the root's absolute path, the spec and the recipe.
    It ends in the root's own folder name: a single-domain root's domain is named after its folder."""
    key = hashlib.sha1(f"{Path(root).resolve()}\n{spec}\n{RECIPE_VERSION}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-")
    name = Path(root).resolve().name or "root"
    return Path(cache_dir) / "normalized" / f"{name}-{readable}-{key}" / name


def normalized_root(root: Path, relpaths: Sequence[str], spec: str, cache_dir: Path,
                    workers: int | None = None, progress: bool = True) -> Path:
    """Build (or bring up to date) the normalised mirror of ``root`` for ``relpaths``; return its root.

    ``workers``: processes (default: one per CPU; 1 builds in this process). A source that cannot
    be decoded raises ``ImageReadError`` naming it (the data check should have excluded it).
    Not safe to run twice at once on one folder (two ranks): build it once before training.
    """
    parsed = parse_normalize(spec)
    if parsed is None:
        raise ValueError(f"data.normalize {spec!r}: nothing to build (the data is used as it is)")
    quality, size = parsed
    root = Path(root).resolve()
    out = normalized_folder(root, spec, cache_dir)
    manifest = _read_manifest(out)
    wanted = {rel: _source_stamp(root, rel) for rel in map(_checked_relpath, relpaths)}
    stale = _remove_unwanted(out, wanted)
    todo = [rel for rel, stamp in wanted.items()
            if manifest["files"].get(rel) != stamp or not (out / rel).is_file()]
    done: dict[str, list[int]] = {rel: manifest["files"][rel] for rel in wanted if rel not in todo}
    try:
        for rel in _build(root, out, todo, quality, size, workers, progress, f"normalizing {root.name} ({spec})"):
            done[rel] = wanted[rel]
    finally:  # keep what was finished, even when interrupted, so a rerun does only the rest
        if todo or stale:
            kept = {rel: stamp for rel, stamp in manifest["files"].items() if rel in wanted}
            _write_manifest(out, spec, root, {**kept, **done})
    return out


def _remove_unwanted(out: Path, wanted: dict[str, list[int]]) -> list[str]:
    """Deletes the mirror's copies of files not in ``wanted`` (moved, deleted, or now excluded by
    the data check at the source) and returns their relpaths. The run's layout is read from the
    mirror: a copy left behind would be trained on, and one whose source moved from train to test
    would sit in both. Every image file counts, recorded or not (a build killed before its
    manifest was written leaves copies it never recorded)."""
    if not out.is_dir():
        return []
    stale = sorted(rel for rel in (p.relative_to(out).as_posix() for p in out.rglob("*")
                                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) if rel not in wanted)
    for rel in stale:
        (out / rel).unlink()
    return stale


def _build(root: Path, out: Path, todo: list[str], quality: int, size: int, workers: int | None,
           progress: bool, desc: str):
    """Yield each relpath once its normalised copy is in place."""
    from tqdm import tqdm

    if not todo:
        return
    workers = min(workers or os.cpu_count() or 1, len(todo))
    jobs = [(str(root / rel), str(out / rel), quality, size) for rel in todo]
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1:
            for rel, job in zip(todo, jobs):
                _write_one(job)
                bar.update()
                yield rel
            return
        # spawn, not fork: the parent may hold threads (tqdm's monitor, torch, Ray) whose locks a
        # forked child would inherit locked.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_write_one, job): rel for rel, job in zip(todo, jobs)}
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update()
                    yield futures[future]
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


def _write_one(job: tuple[str, str, int, int]) -> None:
    source, dest, quality, size = job
    try:
        data = encode_normalized(load_rgb(source), quality, size)
    except ImageReadError as exc:
        raise ImageReadError(exc.path, f"{exc.reason or exc} (data.normalize cannot re-encode it; "
                                       "the data check should have excluded it)") from exc
    atomic_write_bytes(dest, data)


def _checked_relpath(rel: str) -> str:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"data.normalize: {rel!r} is not a path inside the data root")
    return p.as_posix()


def _source_stamp(root: Path, rel: str) -> list[int]:
    """The source's ``file_stamp`` (size, mtime, ctime): a rebuild is due when any of them changes."""
    try:
        return list(file_stamp((root / rel).stat()))
    except OSError as exc:
        raise ImageReadError(root / rel, f"cannot normalise: {exc.strerror or exc}") from exc


def mirror_source(folder: str | os.PathLike, spec: str) -> Path | None:
    """The data root that ``folder``, a mirror built for ``spec``, was normalised from (its
    manifest says), or None when ``folder`` is not such a mirror. A checkpoint trained with
    ``data.normalize`` names its mirror as ``data.root``: the mirror's bytes are re-encoded, so a
    comparison by content with test files must read the source's."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("spec") != spec or not isinstance(manifest.get("root"), str):
        return None
    return Path(manifest["root"])


def _read_manifest(out: Path) -> dict:
    """The recorded stamps; empty when absent, unreadable or from another Pillow (its encoder may differ)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("pillow") == PIL.__version__ and isinstance(manifest.get("files"), dict):
            return manifest
    except (OSError, ValueError):
        pass
    return {"files": {}}


def _write_manifest(out: Path, spec: str, root: Path, files: dict[str, list[int]]) -> None:
    manifest = {"spec": spec, "root": str(root), "recipe": RECIPE_VERSION, "pillow": PIL.__version__,
                "files": dict(sorted(files.items()))}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
