"""A data root with every kind of bad and odd input the data check must handle, each planted once.

``write_corpus(root)`` returns ``Corpus``: the root, and for each planted file its relative path and
the words the check's finding must contain (errors), or the conversion it must report (oddities).
The healthy part is one domain ``faces`` with distinct random images in every split and class.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64  # every healthy image; the tests train at 48 px so 40 px images are "smaller than the crop"


@dataclass
class Corpus:
    root: Path
    errors: dict[str, str] = field(default_factory=dict)  # relpath -> words of its error finding
    warnings: dict[str, str] = field(default_factory=dict)  # relpath -> words of its warning finding
    oddities: dict[str, str] = field(default_factory=dict)  # relpath -> words of its conversion note
    layout_problems: dict[str, str] = field(default_factory=dict)  # relpath (folder or file) -> words

    @property
    def excluded(self) -> set[str]:
        """What on_bad_image=skip must leave out: scanned files with an error (layout problems are
        never samples)."""
        return {p for p in self.errors if p not in self.layout_problems}


def _image(rng: np.random.Generator, size: int = SIZE, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A PNG whose header claims 20000 x 20000 pixels (over twice PIL's limit): refused at open,
    without the memory a real one would take."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_corpus(root: Path, per_class: int = 6) -> Corpus:
    rng = np.random.default_rng(7)
    corpus = Corpus(root)
    for split in ("train", "valid", "test"):
        for label in ("real", "fake"):
            folder = root / "faces" / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{split}_{label}_{i}.jpg").write_bytes(_jpeg_bytes(_image(rng)))
    train = root / "faces" / "train"

    def put(rel: str, data: bytes) -> str:
        (root / rel).write_bytes(data)
        return rel

    good = _jpeg_bytes(_image(rng))
    corpus.errors[put("faces/train/real/truncated.jpg", good[: len(good) // 2])] = "truncated"
    corpus.errors[put("faces/train/fake/zero.jpg", b"")] = "zero-byte"
    corpus.errors[put("faces/train/real/text.jpg", b"just some text, not an image\n")] = "not an image"
    corpus.errors[put("faces/train/fake/bomb.png", bomb_png())] = "decompression bomb"
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny, format="PNG")
    corpus.errors[put("faces/train/fake/tiny.png", tiny.getvalue())] = "1x1"
    small = io.BytesIO()
    _image(rng, 40).save(small, format="PNG")
    corpus.warnings[put("faces/train/real/small.png", small.getvalue())] = "smaller than the 48 px crop"
    corpus.errors[put("faces/train/real/noperm.jpg", _jpeg_bytes(_image(rng)))] = "permission denied"
    os.chmod(root / "faces/train/real/noperm.jpg", 0)

    (train / "real" / "broken.jpg").symlink_to(root / "nowhere.jpg")
    corpus.errors["faces/train/real/broken.jpg"] = "broken symbolic link"
    corpus.layout_problems["faces/train/real/broken.jpg"] = "broken symbolic link"
    outside = root.parent / f"{root.name}-outside.jpg"
    outside.write_bytes(_jpeg_bytes(_image(rng)))
    (train / "fake" / "escape.jpg").symlink_to(outside)
    corpus.errors["faces/train/fake/escape.jpg"] = "outside the data root"
    corpus.layout_problems["faces/train/fake/escape.jpg"] = "outside the data root"
    name = os.fsencode(str(train / "real")) + b"/caf\xe9.jpg"  # Latin-1 bytes: not UTF-8
    with open(name, "wb") as f:
        f.write(_jpeg_bytes(_image(rng)))
    bad_name = "faces/train/real/caf\\xe9.jpg"
    corpus.errors[bad_name] = "not valid UTF-8"
    corpus.layout_problems[bad_name] = "not valid UTF-8"

    # Valid oddities: converted alike for both classes.
    def png(img: Image.Image, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    rgba = _image(rng).convert("RGBA")
    rgba.putalpha(128)
    corpus.oddities[put("faces/train/fake/alpha.png", png(rgba))] = "mode RGBA"
    corpus.oddities[put("faces/train/real/palette.png", png(_image(rng).convert("P")))] = "mode P"
    sixteen = Image.fromarray((rng.integers(0, 65536, (SIZE, SIZE))).astype(np.uint16))
    corpus.oddities[put("faces/train/fake/sixteen.png", png(sixteen))] = "16-bit"
    corpus.oddities[put("faces/train/real/gray.jpg", _jpeg_bytes(_image(rng, mode="L")))] = "mode L"
    corpus.oddities[put("faces/train/fake/cmyk.jpg", _jpeg_bytes(_image(rng).convert("CMYK")))] = "mode CMYK"
    rotated = _image(rng)
    exif = rotated.getexif()
    exif[0x0112] = 6
    corpus.oddities[put("faces/train/real/rotated.jpg", _jpeg_bytes(rotated, exif=exif.tobytes()))] = "orientation 6"

    # Duplicates: the same bytes under both labels, and in train and test.
    same = _jpeg_bytes(_image(rng))
    corpus.errors[put("faces/train/real/both_labels.jpg", same)] = "also labelled fake"
    corpus.errors[put("faces/train/fake/both_labels.jpg", same)] = "also labelled real"
    leak = _jpeg_bytes(_image(rng))
    corpus.errors[put("faces/train/real/leak.jpg", leak)] = "also in test/"
    put("faces/test/real/leak.jpg", leak)  # the test copy stays: the train one is left out

    # A near duplicate: a smooth picture in valid/, and a smaller, harder-compressed copy in test/.
    picture = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    corpus.warnings[put("faces/valid/real/near.jpg", _jpeg_bytes(picture))] = "near duplicate (perceptual hash"
    copy = io.BytesIO()
    picture.resize((SIZE - 8, SIZE - 8), Image.Resampling.BILINEAR).save(copy, format="JPEG", quality=40)
    put("faces/test/real/near_copy.jpg", copy.getvalue())

    # Layout: an unknown label folder, a domain with an empty class folder, one without valid/.
    (train / "unknown").mkdir()
    (train / "unknown" / "x.jpg").write_bytes(_jpeg_bytes(_image(rng)))
    corpus.layout_problems["faces/train/unknown"] = "unknown label folder"
    for split in ("train", "valid", "test"):
        for label in ("real", "fake"):
            (root / "onesided" / split / label).mkdir(parents=True)
            if label == "real":
                (root / "onesided" / split / label / "r.jpg").write_bytes(_jpeg_bytes(_image(rng)))
    for split in ("train", "valid", "test"):  # a one-class split is an error: it is left out
        corpus.errors[f"onesided/{split}"] = corpus.layout_problems[f"onesided/{split}"] = "has no usable fake"
    for split in ("train", "test"):
        for label in ("real", "fake"):
            folder = root / "novalid" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{label}{i}.jpg").write_bytes(_jpeg_bytes(_image(rng)))
    corpus.layout_problems["novalid/valid"] = "no valid/ split"
    return corpus
