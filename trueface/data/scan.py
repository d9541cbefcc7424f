"""Scan every image of a data root once: metadata, content hashes and whether it decodes.

Usage::

    table = scan_layout(layout, cache_file=Path(".cache/trueface/data-check/x.parquet"))   # list of rows
    row = inspect_image("/data/faces/train/real/1.jpg")

Each row holds the facts the data check (trueface.data.check) judges: format, size, mode, JPEG
quality (estimated from the quantisation tables), EXIF, file size, sha1 of the bytes, sha1 of the
decoded pixels (``pixel_sha1``: a re-saved PNG or a copy with its metadata stripped has other bytes
but the same pixels), a perceptual hash (and that of the mirror image, ``phash_flip``, from the same
transform: trueface.data.leakage finds mirrored copies with it) and the error when the file cannot
be used. A file is decoded exactly as training decodes it (trueface.data.decode.load_rgb), so
"decodes here" means "decodes in the DataLoader".

The scan is cached by (path, size, mtime): a rerun on an unchanged root reads only the cache, which
is why the pipeline can run the check before every training. Scanning runs in a process pool with a
progress bar (images/s and ETA).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from trueface.atomic import atomic_write_bytes
from trueface.data.decode import ImageReadError, load_rgb
from trueface.data.layout import DataLayout, Sample, display_path, file_stamp
from trueface.data.leakage import perceptual_hashes, thumbnail

#: Bump when a row's meaning changes: cached rows of another version are scanned again.
SCAN_VERSION = 5  # 2: thumb; 3: ctime_ns; 4: pixel_sha1; 5: phash_flip

COLUMNS = ("path", "relpath", "domain", "split", "label", "format", "width", "height", "mode", "jpeg_quality",
           "exif", "exif_orientation", "file_size", "mtime_ns", "ctime_ns", "sha1", "pixel_sha1", "phash",
           "phash_flip", "thumb", "error", "warning")

# The IJG standard luminance quantisation table (JPEG Annex K), in zigzag-independent raster order:
# PIL's ``quantization`` gives tables in the same order libjpeg stores them.
_STD_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)
_EXIF_ORIENTATION = 0x0112
#: Formats whose quantisation tables give a JPEG quality: MPO is the multi-picture JPEG that phones
#: write (PIL names it by its container; the first picture is a plain JPEG).
JPEG_FORMATS = ("JPEG", "MPO")


def _ijg_table(quality: int) -> np.ndarray:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_STD_LUMINANCE * scale + 50) / 100), 1, 255)


_IJG_TABLES = np.sort(np.stack([_ijg_table(q) for q in range(1, 101)]), axis=1)


def estimate_jpeg_quality(quantization: dict[int, Sequence[int]]) -> int:
    """The IJG quality (1-100) whose luminance table is closest to table 0: exact for files written
    by libjpeg (PIL, most cameras' software), the nearest match for other encoders. Tables are
    compared sorted: the scaling is monotone, so entries pair up whatever order PIL lists them in."""
    table = np.sort(np.asarray(quantization[0], dtype=np.float64))
    if table.size != 64:
        return -1
    return int(np.argmin(np.abs(_IJG_TABLES - table).sum(axis=1))) + 1


def inspect_image(path: str, relpath: str = "") -> dict:
    """One row for ``path`` (see COLUMNS); never raises: what goes wrong is the row's ``error``."""
    row = {c: None for c in COLUMNS} | {
        "path": display_path(path), "relpath": display_path(relpath), "format": "", "width": -1, "height": -1,
        "mode": "", "jpeg_quality": -1, "exif": False, "exif_orientation": 1, "file_size": -1, "mtime_ns": -1,
        "ctime_ns": -1, "sha1": "", "pixel_sha1": "", "phash": "", "phash_flip": "", "thumb": b"", "error": "",
        "warning": "",
    }
    try:
        st = os.stat(path)
        row["file_size"], row["mtime_ns"], row["ctime_ns"] = file_stamp(st)
        with open(path, "rb") as f:
            row["sha1"] = hashlib.sha1(f.read()).hexdigest()
    except OSError as exc:
        row["error"] = f"cannot read the file: {exc.strerror or exc}"
        return row
    try:
        with Image.open(path) as img:
            row |= {"format": img.format or "", "width": img.width, "height": img.height, "mode": img.mode}
            if img.format in JPEG_FORMATS and getattr(img, "quantization", None):
                row["jpeg_quality"] = estimate_jpeg_quality(img.quantization)
            exif = img.getexif()
            row["exif"] = bool(exif)
            row["exif_orientation"] = int(exif.get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - load_rgb below names the problem in words
        pass
    try:
        rgb = load_rgb(path)  # the training decoder: same checks, same conversion of oddities
        (row["phash"], row["phash_flip"]), row["thumb"] = perceptual_hashes(rgb), thumbnail(rgb)
        row["pixel_sha1"] = pixel_digest(rgb)
    except ImageReadError as exc:
        row["error"] = _without_path(str(exc), path)
    row["warning"] = _oddity(row)
    return row


def pixel_digest(rgb: Image.Image) -> str:
    """sha1 of a decoded image's size, mode and pixels: equal for two files that decode to the
    same picture whatever their bytes (PNG compression level, metadata, ancillary chunks).
    ``rgb`` is what ``load_rgb`` returns, so the digest costs one pass over pixels already decoded."""
    h = hashlib.sha1(f"{rgb.mode} {rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _without_path(message: str, path: str) -> str:
    """The cause alone: the report shows the path in its own column."""
    return message.split(f"{path}: ", 1)[-1]


def _oddity(row: dict) -> str:
    """Valid but converted on the way in: worth a line when one class has it and the other not."""
    notes = []
    if row["mode"] in ("RGBA", "LA", "PA") or (row["mode"] == "P"):
        notes.append(f"mode {row['mode']} converted to RGB" + (" (alpha over black)" if "A" in row["mode"] else ""))
    elif row["mode"].startswith(("I", "F")):
        notes.append(f"mode {row['mode']} (16-bit or float) scaled to 8 bit")
    elif row["mode"] in ("CMYK", "L", "1"):
        notes.append(f"mode {row['mode']} converted to RGB")
    if row["exif_orientation"] not in (0, 1):
        notes.append(f"EXIF orientation {row['exif_orientation']} applied")
    return "; ".join(notes)


def _to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=_SCHEMA)


_SCHEMA = pa.schema([
    ("path", pa.string()), ("relpath", pa.string()), ("domain", pa.string()), ("split", pa.string()),
    ("label", pa.int8()), ("format", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("mode", pa.string()), ("jpeg_quality", pa.int16()), ("exif", pa.bool_()), ("exif_orientation", pa.int16()),
    ("file_size", pa.int64()), ("mtime_ns", pa.int64()), ("ctime_ns", pa.int64()), ("sha1", pa.string()),
    ("pixel_sha1", pa.string()), ("phash", pa.string()), ("phash_flip", pa.string()),
    ("thumb", pa.binary()), ("error", pa.string()), ("warning", pa.string()),
], metadata={b"scan_version": str(SCAN_VERSION).encode()})


def write_table(rows: list[dict], path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(_to_table(rows), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_cache(path: Path) -> dict[str, dict]:
    """Cached rows by path; nothing when the cache is missing, unreadable or of another version."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return {}
    if (table.schema.metadata or {}).get(b"scan_version") != str(SCAN_VERSION).encode():
        return {}
    return {row["path"]: row for row in table.to_pylist()}


def _inspect(job: tuple[str, str]) -> dict:
    return inspect_image(*job)


def scan_layout(layout: DataLayout, cache_file: Path | None = None, workers: int | None = None,
                progress: bool = True) -> list[dict]:
    """One row per sample of ``layout`` (in the layout's order), from the cache where the file's
    size, mtime and ctime are unchanged, else inspected in a pool of ``workers`` processes."""
    samples = layout.all_samples()
    cached = read_cache(cache_file) if cache_file else {}
    rows: list[dict | None] = []
    todo: list[tuple[int, Sample]] = []
    for i, s in enumerate(samples):
        row = cached.get(s.path)
        try:
            st = os.stat(s.path)
        except OSError:
            st = None
        # ctime too: a chmod changes neither size nor mtime, and a file made unreadable (or
        # readable again) must not keep its clean (or its error) row
        fresh = row is not None and st is not None and (
            (row["file_size"], row["mtime_ns"], row["ctime_ns"]) == file_stamp(st))
        rows.append(row if fresh else None)
        if not fresh:
            todo.append((i, s))
    if todo:
        jobs = [(s.path, layout.relpath(s.path)) for _, s in todo]
        for (i, _), row in zip(todo, _run_pool(jobs, workers, progress)):
            rows[i] = row
    out = []
    for s, row in zip(samples, rows):
        out.append(row | {"relpath": layout.relpath(s.path), "domain": s.domain, "split": s.split, "label": s.label})
    if cache_file and todo:
        write_table(out, cache_file)
    return out


def _run_pool(jobs: list[tuple[str, str]], workers: int | None, progress: bool) -> list[dict]:
    from tqdm import tqdm

    workers = workers or min(len(jobs), os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="data check: scanning", unit="img", disable=not progress, smoothing=0.1)
    try:
        if workers <= 1 or len(jobs) < 64:  # a pool costs more than it saves on a few files
            results = []
            for job in jobs:
                results.append(_inspect(job))
                bar.update()
            return results
        with ProcessPoolExecutor(workers) as pool:
            results = []
            for row in pool.map(_inspect, jobs, chunksize=32):
                results.append(row)
                bar.update()
            return results
    finally:
        bar.close()

