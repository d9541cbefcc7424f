"""trueface.data.decode: one decoding path for every format, valid oddities converted one way,
unusable files refused with the cause in words."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from trueface.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from trueface.data import dataset
from trueface.data.decode import ImageReadError, load_rgb, reduce_for, to_rgb


def rgb(path: Path, decode_size: int | None = None) -> np.ndarray:
    out = load_rgb(path, decode_size)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def natural_image(size: int = 512, seed: int = 0) -> Image.Image:
    """Smooth colour regions plus fine grain: something to downscale, unlike a flat test card."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.7))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# --- valid oddities ---------------------------------------------------------------------------

def test_alpha_is_composited_over_black(tmp_path):
    px = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0], [255, 255, 255, 1]]], np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    # colour * alpha / 255, rounded: 200*128/255 = 100.4 -> 100, 100*128/255 = 50.2 -> 50, 50*128/255 = 25.1 -> 25
    assert rgb(tmp_path / "a.png").tolist() == [[[200, 100, 50], [100, 50, 25], [0, 0, 0], [1, 1, 1]]]
    Image.fromarray(np.array([[[200, 128], [90, 0]]], np.uint8), "LA").save(tmp_path / "la.png")
    assert rgb(tmp_path / "la.png").tolist() == [[[100, 100, 100], [0, 0, 0]]]


def test_palette_with_and_without_transparency(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([200, 100, 50, 10, 20, 30, 0, 255, 0])
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png")
    assert rgb(tmp_path / "p.png").tolist() == [[[200, 100, 50], [10, 20, 30], [0, 255, 0]]]
    img.save(tmp_path / "p_key.png", transparency=1)  # one fully transparent entry
    assert rgb(tmp_path / "p_key.png").tolist() == [[[200, 100, 50], [0, 0, 0], [0, 255, 0]]]
    img.save(tmp_path / "p_alpha.png", transparency=bytes([255, 128, 0]))  # alpha per entry (tRNS)
    assert rgb(tmp_path / "p_alpha.png").tolist() == [[[200, 100, 50], [5, 10, 15], [0, 0, 0]]]


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = rgb(tmp_path / "g16.png")
    assert got[..., 0].tolist() == [[0, 1, 4, 128, 255]]  # 1000 / 257 = 3.9 -> 4; convert("RGB") gave 255
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    assert np.asarray(to_rgb(big_endian))[..., 0].tolist() == [[0, 1, 4, 128, 255]]
    wide = Image.fromarray(np.array([[-5, 32896, 70000]], np.int32))  # mode I: taken as 16-bit, clipped
    assert np.asarray(to_rgb(wide))[..., 0].tolist() == [[0, 128, 255]]


def test_float_is_clipped_and_rounded():
    img = Image.fromarray(np.array([[-3.2, 12.6, 300.0, np.nan]], np.float32))
    assert img.mode == "F"
    assert np.asarray(to_rgb(img))[..., 0].tolist() == [[0, 13, 255, 0]]


def test_grayscale_and_bilevel_are_replicated(tmp_path):
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(tmp_path / "l.png")
    assert rgb(tmp_path / "l.png").tolist() == [[[0] * 3, [77] * 3, [255] * 3]]
    Image.fromarray(np.array([[True, False, True]])).save(tmp_path / "one.png")
    assert Image.open(tmp_path / "one.png").mode == "1"
    assert rgb(tmp_path / "one.png").tolist() == [[[255] * 3, [0] * 3, [255] * 3]]


def test_adobe_cmyk_jpeg_matches_its_rgb_source(tmp_path):
    source = natural_image(64)
    source.convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    # libjpeg writes Adobe's inverted CMYK with an APP14 "Adobe" marker; PIL must undo the inversion
    assert b"Adobe" in (tmp_path / "c.jpg").read_bytes()
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    diff = np.abs(rgb(tmp_path / "c.jpg") - np.asarray(source).astype(int))
    assert diff.max() <= 4 and diff.mean() < 1.0  # measured 1 and 0.3; an inverted read is ~100 off


def test_exif_orientation_is_applied(tmp_path):
    blocks = np.random.default_rng(1).integers(0, 256, (2, 4, 3), dtype=np.uint8)
    src = np.kron(blocks, np.ones((8, 8, 1), np.uint8))  # 16 x 32 px of 8x8 flat blocks: JPEG keeps them
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(src).save(tmp_path / "r.jpg", quality=100, subsampling=0, exif=exif.tobytes())
    out = load_rgb(tmp_path / "r.jpg")
    assert out.size == (16, 32)  # width and height swapped
    got = np.asarray(out).astype(int)
    assert np.abs(got - np.rot90(src, k=-1)).max() <= 3
    assert np.abs(got - np.rot90(src, k=1)).max() > 50  # the other way round is far off


# --- one path for every format --------------------------------------------------------------

@pytest.mark.parametrize("short,decode_size,factor", [
    (447, 224, 1), (448, 224, 2), (895, 224, 2), (896, 224, 4), (300, 100, 2), (512, None, 1), (40, 32, 1)])
def test_reduce_factor(short, decode_size, factor):
    img = Image.new("RGB", (short * 2, short))
    assert reduce_for(img, decode_size).size == (-(-short * 2 // factor), -(-short // factor))


def draft_decode(path: Path, decode_size: int | None) -> Image.Image:
    """The old load_rgb: JPEG-only draft (DCT scaling), full decode for everything else."""
    with Image.open(path) as img:
        if decode_size and img.format == "JPEG":
            img.draft("RGB", (decode_size, decode_size))
        return img.convert("RGB")


def pixels(tensor: torch.Tensor) -> torch.Tensor:
    """eval_transform's output back on [0, 1] pixels."""
    return tensor * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


# Measured on this 512 px source, PNG vs JPEG q100 4:4:4, as [0, 1] pixels after eval_transform:
#   new path: max 2/255 (0.0078) at every size, mean 0.0012 (no reduce), 0.0009 (/2), 0.0006 (/4), 0.0009 (full)
#   old path: the same without reduce; with JPEG draft max 4-5/255, mean 0.0031 (/2) and 0.0036 (/4)
MAX_TOL, MEAN_TOL = 3 / 255, 0.002


@pytest.mark.parametrize("image_size,decode_size,decoded_side", [
    (320, 320, 512),  # 512 < 2 x 320: no reduce
    (224, 224, 256),  # reduce by 2
    (128, 128, 128),  # reduce by 4
    (224, None, 512),  # full decode
])
def test_png_and_jpeg_take_the_same_path(tmp_path, image_size, decode_size, decoded_side):
    img = natural_image(512)
    img.save(tmp_path / "x.png")
    img.save(tmp_path / "x.jpg", quality=100, subsampling=0)
    assert load_rgb(tmp_path / "x.png", decode_size).size == (decoded_side, decoded_side)
    assert load_rgb(tmp_path / "x.jpg", decode_size).size == (decoded_side, decoded_side)
    tf = eval_transform(image_size)
    png, jpeg = (pixels(tf(load_rgb(tmp_path / name, decode_size))) for name in ("x.png", "x.jpg"))
    diff = (png - jpeg).abs()
    assert diff.max() <= MAX_TOL and diff.mean() <= MEAN_TOL, (diff.max(), diff.mean())
    if decoded_side < 512:  # the old JPEG-only draft: the two formats drifted apart
        old = (pixels(tf(draft_decode(tmp_path / "x.png", decode_size)))
               - pixels(tf(draft_decode(tmp_path / "x.jpg", decode_size)))).abs()
        assert old.mean() > MEAN_TOL and old.mean() > 2 * diff.mean()


# --- unusable files ---------------------------------------------------------------------------

def refused(path: Path, cause: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        load_rgb(path, 32)
    assert str(info.value).startswith(f"{path}: ") and info.value.path == str(path)
    assert cause in info.value.reason, info.value.reason
    return info.value


def test_truncated_files(tmp_path):
    buf = io.BytesIO()
    natural_image(64).save(buf, "JPEG", quality=90)
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    refused(tmp_path / "t.jpg", "truncated or corrupt image data")
    buf = io.BytesIO()
    natural_image(64).save(buf, "PNG")
    (tmp_path / "head.png").write_bytes(buf.getvalue()[:40])  # PIL cannot even identify it
    refused(tmp_path / "head.png", "truncated or corrupt image data (PNG header present")


def test_zero_bytes_text_and_bomb(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    refused(tmp_path / "empty.jpg", "zero-byte file")
    (tmp_path / "notes.jpg").write_text("hello, not a face\n")
    refused(tmp_path / "notes.jpg",
            "not an image (JPEG/PNG/WebP/GIF/BMP/TIFF header not found; starts with b'hello, n')")
    # 20000 x 20000 claimed in IHDR, a few bytes on disk: PIL refuses at open, nothing is allocated
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IEND", b""))
    limit = 2 * Image.MAX_IMAGE_PIXELS  # PIL warns above MAX_IMAGE_PIXELS and refuses above twice it
    refused(tmp_path / "bomb.png", f"decompression bomb: 400000000 pixels, over PIL's limit of {limit}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_permissions(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "locked.png")
    (tmp_path / "locked.png").chmod(0)
    try:
        refused(tmp_path / "locked.png", "permission denied")
    finally:
        (tmp_path / "locked.png").chmod(0o644)


def test_missing_file_and_broken_link(tmp_path):
    refused(tmp_path / "gone.png", "file not found")
    (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    refused(tmp_path / "link.png", f"file not found: broken symbolic link to {tmp_path / 'target.png'}")


def test_the_error_survives_a_process_boundary_and_old_imports_still_work(tmp_path):
    err = pickle.loads(pickle.dumps(refused(tmp_path / "gone.png", "file not found")))
    assert (err.path, err.reason) == (str(tmp_path / "gone.png"), "file not found")
    assert dataset.load_rgb is load_rgb and dataset.ImageReadError is ImageReadError
