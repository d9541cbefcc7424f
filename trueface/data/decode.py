"""Decode an image file to RGB the same way whatever its format, or say in words why it can't be.

Usage::

    img = load_rgb("face.png", decode_size=224)   # RGB PIL image; ImageReadError when unusable
    img = to_rgb(Image.open("16bit.png"))          # the one conversion of valid oddities
    img = prepare_rgb(img, decode_size=224)        # load_rgb's steps after the file is open

Every file goes through the same steps: open, load fully, apply the EXIF orientation, ``to_rgb``,
then (with ``decode_size``) shrink by a power of two with ``Image.reduce``. There is no JPEG-only
path: the original draft-decoded JPEGs (``Image.draft``, DCT scaling inside libjpeg) and fully
decoded everything else, so where reals are JPEG and fakes PNG (DESIGN.md flaw 5) the two classes
were downscaled by different filters, a difference a classifier can learn instead of the faces.
The price is the draft's speed-up: a big JPEG is now decoded at full size before ``reduce``. That
only matters for files at least twice the training size; below that nothing is reduced anyway.

An unusable file raises ``ImageReadError`` whose ``reason`` says what is wrong (truncated, not an
image, zero bytes, decompression bomb, permission denied, missing, broken link); the data check
puts that reason in its report's ``error`` column.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: First bytes of the formats PIL reads that real data sets hold; a file that starts like one of
#: these but does not open is damaged, not "not an image".
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
KNOWN_FORMATS = "JPEG/PNG/WebP/GIF/BMP/TIFF"


class ImageReadError(RuntimeError):
    """An image file could not be read or decoded. ``str()`` is ``"<path>: <reason>"``;
    ``path`` and ``reason`` are kept apart for reports. ``ImageReadError(message)`` alone (no
    reason) still works and keeps the message as it is."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason if reason is not None else ""
        super().__init__(f"{self.path}: {reason}" if reason is not None else self.path)

    def __reduce__(self):  # keep path and reason apart across a process pool
        return type(self), (self.path, self.reason) if self.reason else (self.path,)


def load_rgb(path: str | os.PathLike, decode_size: int | None = None) -> Image.Image:
    """``path`` as an RGB image, by the same steps for every format (see the module docstring).

    ``decode_size``: when the shorter side is at least twice it, shrink by the largest power of
    two that keeps the shorter side >= ``decode_size`` (``Image.reduce``, a box average), so
    the resize that follows has less to do; None decodes at full size. Multi-frame files (GIF,
    animated PNG/WebP) give their first frame. Raises ``ImageReadError`` naming the file and the
    cause.
    """
    _check_file(path)
    return _decode(path, path, decode_size, lambda: _file_head(path))


def decode_bytes(data: bytes, name: str, decode_size: int | None = None) -> Image.Image:
    """``load_rgb`` of a file's bytes already in memory (read from an object store, say); ``name``
    stands for the path in errors."""
    if not data:
        raise ImageReadError(name, "zero-byte file")
    return _decode(io.BytesIO(data), name, decode_size, lambda: bytes(data[:16]))


def _decode(source, name, decode_size: int | None, head) -> Image.Image:
    """Open ``source`` (a path or a file object) and run ``prepare_rgb``; every failure becomes an
    ImageReadError naming ``name``. ``head()`` gives the first bytes, to tell damaged from foreign."""
    try:
        with Image.open(source) as img:
            img.load()
            return prepare_rgb(img, decode_size)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, _bomb_reason(exc)) from exc
    except PermissionError as exc:
        raise ImageReadError(name, "permission denied") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(name, _unidentified_reason(head())) from exc
    # PIL's decoders raise many types on damaged data (OSError, SyntaxError, EOFError, ValueError,
    # struct.error, zlib.error...): the file is untrusted input, so all of them mean "corrupt".
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(name, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc


def prepare_rgb(img: Image.Image, decode_size: int | None = None) -> Image.Image:
    """``load_rgb``'s steps after the file is open and loaded: EXIF orientation, ``to_rgb``, the
    power-of-two reduce. Used on its own for images already in memory (trueface.data.normalize)."""
    name = getattr(img, "filename", "") or "<image in memory>"
    try:
        # exif_transpose copies even an upright image: only call it when there is something to do.
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 -- PIL's EXIF parser raises assorted types on bad data
        raise ImageReadError(name, f"corrupt EXIF metadata, orientation unknown ({type(exc).__name__}: {exc})") from exc
    try:
        rgb = to_rgb(img)
    except ValueError as exc:
        raise ImageReadError(name, str(exc)) from exc
    return reduce_for(rgb, decode_size)


def reduce_for(img: Image.Image, decode_size: int | None) -> Image.Image:
    """Shrink by the largest power of two f with ``min(size) >= f * decode_size`` (nothing when
    f would be 1 or ``decode_size`` is None)."""
    if not decode_size:
        return img
    factor = 1
    while min(img.size) >= 2 * factor * decode_size:
        factor *= 2
    return img.reduce(factor) if factor > 1 else img


def to_rgb(img: Image.Image) -> Image.Image:
    """The one conversion to 8-bit RGB of every valid-but-odd image:

    - alpha (RGBA, LA, PA, P with transparency) is composited over black: out = colour * alpha /
      255, rounded. Deterministic and independent of the file (a random or file-chosen background
      would be a per-class cue), and the same as a premultiplied image's colour channels, so
      premultiplied modes (RGBa, La) just keep theirs;
    - palette (P) without transparency: its colours;
    - 16-bit grey (I;16, I;16B, I;16L, I) is scaled, value / 257 rounded (65535 -> 255, 32896 ->
      128), never clipped at 255 as ``convert`` does; "I" is taken as 16-bit, values outside
      [0, 65535] clipped. 16-bit RGB PNGs already open as 8-bit RGB (PIL keeps the high byte);
    - float (F) is clipped to [0, 255] and rounded (NaN -> 0);
    - L, 1 (0 -> 0, 1 -> 255) are replicated into three channels;
    - CMYK, YCbCr, LAB, HSV and the rest: PIL's own conversion (PIL reads the inverted CMYK that
      Adobe writes in JPEGs from the APP14 marker; ICC profiles are not applied).
    Raises ValueError for a mode PIL cannot convert to RGB.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBa", "La"):
        return Image.merge("RGB", (img.getchannel(0),) * 3 if mode == "La" else img.split()[:3])
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        return _over_black(img.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        if mode != "F":
            values = np.clip(values, 0, 65535) / 257
        gray = np.clip(np.nan_to_num(np.rint(values), nan=0.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported colour mode {mode}: PIL cannot convert it to RGB ({exc})") from exc


def _over_black(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba).astype(np.uint32)
    # (c * a + 127) // 255 is c * a / 255 rounded: c * a / 255 is never exactly k + 0.5.
    rgb = (pixels[..., :3] * pixels[..., 3:] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _check_file(path: str | os.PathLike) -> None:
    """The causes the file system tells before PIL is involved."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise ImageReadError(path, f"file not found: broken symbolic link to {os.readlink(p)}")
    if not p.exists():
        raise ImageReadError(path, "file not found")
    if p.is_dir():
        raise ImageReadError(path, "is a folder, not a file")
    if p.stat().st_size == 0:
        raise ImageReadError(path, "zero-byte file")
    if not os.access(p, os.R_OK):
        raise ImageReadError(path, "permission denied")


def _bomb_reason(exc: Exception) -> str:
    # PIL's text: "Image size (N pixels) exceeds limit of M pixels, could be decompression bomb..."
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(exc))
    if not found:
        return f"decompression bomb ({exc})"
    pixels, limit = found.groups()
    return f"decompression bomb: {pixels} pixels, over PIL's limit of {limit}"


def _file_head(path: str | os.PathLike) -> bytes | str:
    """The file's first 16 bytes, or why they cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(16)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"


def _unidentified_reason(head: bytes | str) -> str:
    if isinstance(head, str):  # the reason it could not be read
        return head
    for magic, fmt in SIGNATURES.items():
        if head.startswith(magic):
            return f"truncated or corrupt image data ({fmt} header present, but PIL cannot read the file)"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "truncated or corrupt image data (WebP header present, but PIL cannot read the file)"
    return f"not an image ({KNOWN_FORMATS} header not found; starts with {head[:8]!r})"
