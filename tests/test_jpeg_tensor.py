"""``trueface.jpeg_tensor`` against PIL's JPEG (libjpeg, PIL's defaults: 4:2:0), the codec the
per-sample path uses: the same quantisation tables, pixels within a grey level on average, the
same loss to the original (PSNR), per-image quality in one batch, odd image sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from trueface.jpeg_tensor import dct_matrix, jpeg_tensor, quant_tables


def textured_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, 3): smooth colour fields, sharp-edged rectangles and pixel noise, so every
    frequency band and both chroma and luma edges are in play."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        img = np.asarray(field).astype(np.float64)
        for _ in range(4):
            top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
            img[top:top + rng.integers(3, height // 2), left:left + rng.integers(3, width // 2)] = rng.integers(0, 256, 3)
        img += rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).round().astype(np.uint8))
    return np.stack(out)


def pil_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    decoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(decoded).astype(np.float64)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a - b) ** 2)))


def test_quantisation_tables_are_libjpegs():
    tables = quant_tables(torch.tensor([50, 75, 100, 1, 10]))
    assert tables[0, 0, 0, 0] == 16 and tables[0, 1, 0, 0] == 17 and tables[0, 0, 7, 7] == 99  # Annex K at 50
    assert tables[1, 0, 0, 0] == 8 and tables[1, 0, 0, 1] == 6  # scale 50%: (16*50+50)//100, (11*50+50)//100
    assert (tables[2] == 1).all()  # quality 100: every entry 1
    assert tables[3].max() == 255 and tables[3, 0, 0, 2] == 255  # quality 1: baseline caps at 255
    assert tables[4, 0, 0, 0] == 80  # quality 10: scale 500%
    d = dct_matrix(torch.device("cpu"))
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=d.dtype), atol=1e-12)  # orthonormal: JPEG's DCT


@pytest.mark.parametrize("quality", [20, 50, 75, 95])
def test_pixels_and_loss_match_pil_jpeg(quality):
    images = textured_images(6, 61, 83)  # sizes that are not multiples of 16: the edge padding runs
    ours = jpeg_tensor(as_tensor(images), torch.full((6,), quality)).permute(0, 2, 3, 1).numpy() * 255
    pil = pil_jpeg(images, quality)
    diff = np.abs(ours - pil)
    original = images.astype(np.float64)
    # measured on these (noisier than photos): mean 0.41-0.89 grey levels, p99 4-9, PSNR within
    # 0.03 dB (2026-12-06, ties rounded as libjpeg rounds them). What is left is libjpeg's integer
    # DCT (its coefficients land across a rounding step now and then).
    assert diff.mean() < 1.2, diff.mean()
    assert np.percentile(diff, 99) <= 12
    assert abs(psnr(ours, original) - psnr(pil, original)) < 0.15
    # and the loss is JPEG's at that quality, not a no-op (PIL itself loses 1-10 dB more at q20)
    assert psnr(ours, original) < 45


def test_each_image_uses_its_own_quality_in_one_batch():
    images = as_tensor(textured_images(4, 32, 48, seed=1))
    quality = torch.tensor([15, 90, 40, 70])
    together = jpeg_tensor(images, quality)
    for i, q in enumerate(quality.tolist()):
        assert torch.equal(together[i], jpeg_tensor(images[i:i + 1], torch.tensor([q]))[0])
    assert together.dtype == images.dtype and together.shape == images.shape
    assert 0 <= together.min() and together.max() <= 1


@pytest.mark.parametrize("quality", [10, 20, 50, 75, 95])
def test_flat_images_are_pils_pixel_for_pixel_ties_rounded_as_libjpeg_rounds_them(quality):
    # A flat block is all DC coefficient, and at most levels its quantised value or its decoded
    # samples fall exactly on a half: libjpeg rounds the one away from zero and the other up.
    # Rounded half to even instead, 114 of the 256 greys at quality 50 came back a level or two off.
    greys = np.repeat(np.arange(256, dtype=np.uint8), 16 * 16 * 3).reshape(256, 16, 16, 3)
    ours = jpeg_tensor(as_tensor(greys), torch.full((256,), quality)).permute(0, 2, 3, 1).numpy() * 255
    assert np.abs(ours - pil_jpeg(greys, quality)).max() < 0.01
    # colours too, where the colour conversion's arithmetic (libjpeg's is fixed point) can still
    # differ by one: measured, 255 or 256 of 256 exact at these qualities
    colours = np.broadcast_to(np.random.default_rng(0).integers(0, 256, (256, 1, 1, 3), dtype=np.uint8),
                              (256, 16, 16, 3)).copy()
    ours = jpeg_tensor(as_tensor(colours), torch.full((256,), quality)).permute(0, 2, 3, 1).numpy() * 255
    exact = (np.abs(ours - pil_jpeg(colours, quality)).reshape(256, -1).max(axis=1) < 0.01).sum()
    assert exact >= 250
