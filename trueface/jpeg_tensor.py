"""What a JPEG encode and decode does to pixels, as tensor arithmetic: batched, one quality per
image, on any device, with no bytes and no host round trip.

Usage::

    y = jpeg_tensor(x, quality)   # x: float (N, 3, H, W) in [0, 1]; quality: int tensor (N,), 1-100

Why: on an H200, torchvision's nvJPEG round trip took about 25 ms of the 35 ms ``DeviceAugment``
spent on a Stage I batch (200 images of 224 px): its encoder takes one quality per call and
synchronises twice per image, and its bytes go through the host to be decoded. The entropy
coding (Huffman) is lossless, so the decoded pixels depend only on the lossy steps, which this
module does as libjpeg does them with PIL's defaults (the per-sample path's ``JPEG`` op):

1. RGB -> YCbCr (JFIF, full range), each plane rounded to integers as libjpeg's 8-bit samples;
2. 4:2:0 chroma: Cb and Cr averaged over 2x2 pixels (libjpeg's h2v2 downsampling);
3. each plane padded to whole blocks by repeating its last row and column (libjpeg pads the
   image to whole 16x16 units the same way), shifted by -128, 8x8 DCT (orthonormal DCT-II,
   which is JPEG's);
4. quantisation with the standard tables of ITU T.81 Annex K scaled by the quality as libjpeg's
   ``jpeg_quality_scaling`` does (baseline: entries 1-255), rounding to the nearest integer;
5. the inverse: dequantise, inverse DCT, +128, round and clamp to 0-255;
6. chroma upsampled by libjpeg's "fancy" (triangular) filter: 3/4 of the nearer and 1/4 of the
   farther sample in each direction, edges repeated, which is bilinear at align_corners=False;
7. YCbCr -> RGB, rounded and clamped, back to [0, 1].

It differs from libjpeg where libjpeg uses integer arithmetic: its "islow" DCT and IDCT are
fixed-point approximations and its chroma averaging alternates a rounding bias, so a
coefficient near a quantisation boundary can land on the other side. Measured against PIL's
JPEG on the same images by ``tests/test_jpeg_tensor.py``: see its figures there.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as nnf

# ITU T.81 Annex K.1: the luminance and chrominance quantisation tables at quality 50, in
# row-major order (natural, not zig-zag).
LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)
CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)
BLOCK = 8
MCU = 16  # 4:2:0: one unit is 16x16 luma pixels, 8x8 of each chroma plane


def quant_tables(quality: torch.Tensor) -> torch.Tensor:
    """(N, 2, 8, 8) float: the luma and chroma tables libjpeg uses at each quality (1-100):
    scale 5000/q below 50, else 200 - 2q (percent); entry (T * scale + 50) // 100 in 1..255."""
    q = quality.clamp(1, 100).to(torch.float64)
    scale = torch.where(q < 50, torch.floor(5000 / q), 200 - 2 * q)
    base = _base_tables(quality.device)
    return torch.floor((base * scale.view(-1, 1, 1, 1) + 50) / 100).clamp_(1, 255).float()


# Built once per device: a tensor made from host data on a GPU is a copy the host waits for,
# and this runs on every batch.
@functools.lru_cache(maxsize=8)
def _base_tables(device: torch.device) -> torch.Tensor:
    return torch.tensor([LUMA_TABLE, CHROMA_TABLE], dtype=torch.float64).view(1, 2, 8, 8).to(device)


@functools.lru_cache(maxsize=8)
def dct_matrix(device: torch.device) -> torch.Tensor:
    """The 8x8 orthonormal DCT-II matrix D (float64): coefficients = D @ block @ D.T."""
    k = torch.arange(BLOCK, dtype=torch.float64).view(-1, 1)
    n = torch.arange(BLOCK, dtype=torch.float64).view(1, -1)
    d = torch.cos((2 * n + 1) * k * math.pi / (2 * BLOCK)) * math.sqrt(2 / BLOCK)
    d[0] /= math.sqrt(2)
    return d.to(device)


def rgb_to_ycbcr(p: torch.Tensor) -> torch.Tensor:
    """JFIF YCbCr of 0-255 RGB (N, 3, H, W), rounded as libjpeg's 8-bit samples."""
    r, g, b = p.unbind(dim=1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128
    return torch.stack((y, cb, cr), dim=1).round_().clamp_(0, 255)


def ycbcr_to_rgb(ycc: torch.Tensor) -> torch.Tensor:
    y, cb, cr = ycc.unbind(dim=1)
    cb, cr = cb - 128, cr - 128
    rgb = torch.stack((y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb), dim=1)
    return rgb.round_().clamp_(0, 255)


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """(N, H, W) with H, W multiples of 8 -> (N, H/8, W/8, 8, 8)."""
    n, h, w = plane.shape
    return plane.view(n, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(2, 3)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    n, bh, bw = blocks.shape[:3]
    return blocks.transpose(2, 3).reshape(n, bh * BLOCK, bw * BLOCK)


def compress_plane(plane: torch.Tensor, table: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One 0-255 plane (N, H, W), H and W multiples of 8, through DCT, quantisation with the
    per-image ``table`` (N, 8, 8) and back: what the decoder reads out, rounded and clamped."""
    # float64: a coefficient off by 1e-3 of its size (TF32 matmuls, where a user enables them)
    # would cross quantisation boundaries; the blocks are 8x8, so the cost is small anyway
    blocks = _blocks(plane - 128).double()
    q = table.view(-1, 1, 1, BLOCK, BLOCK).double()
    coef = torch.round(d @ blocks @ d.T / q) * q
    return _unblocks(d.T @ coef @ d).float().add_(128).round_().clamp_(0, 255)


def jpeg_tensor(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """x (N, 3, H, W) float in [0, 1] after a JPEG round trip at ``quality`` (N,) per image,
    4:2:0 chroma as PIL saves by default; float [0, 1] out, on x's device."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % MCU, -width % MCU
    p = (x * 255).round_().clamp_(0, 255)
    p = nnf.pad(p, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else p
    ycc = rgb_to_ycbcr(p.float())
    tables, d = quant_tables(quality), dct_matrix(x.device)
    luma = compress_plane(ycc[:, 0], tables[:, 0], d)
    chroma = nnf.avg_pool2d(ycc[:, 1:], 2).round_()  # h2v2 downsampling: the mean of each 2x2
    chroma = torch.stack([compress_plane(chroma[:, c], tables[:, 1], d) for c in range(2)], dim=1)
    chroma = nnf.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).round_()
    rgb = ycbcr_to_rgb(torch.cat((luma.unsqueeze(1), chroma), dim=1))
    return (rgb[..., :height, :width] / 255).to(x.dtype)
