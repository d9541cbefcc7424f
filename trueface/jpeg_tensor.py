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
   ``jpeg_quality_scaling`` does (baseline: entries 1-255), rounding to the nearest integer,
   a half away from zero as libjpeg rounds it;
5. the inverse: dequantise, inverse DCT, +128, round (a half up, as libjpeg) and clamp to 0-255;
6. chroma upsampled by libjpeg's "fancy" (triangular) filter: 3/4 of the nearer and 1/4 of the
   farther sample in each direction, edges repeated, which is bilinear at align_corners=False;
7. YCbCr -> RGB, rounded and clamped, back to [0, 1].

It differs from libjpeg where libjpeg uses integer arithmetic: its "islow" DCT and IDCT are
fixed-point approximations and its chroma averaging alternates a rounding bias, so a
coefficient near a quantisation boundary can land on the other side. Measured against PIL's
JPEG on the same images by ``tests/test_jpeg_tensor.py``: see its figures there; flat images,
all ties, come out as PIL's pixel for pixel.
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
# libjpeg's rounding of ties, which its integer arithmetic meets exactly and float arithmetic
# meets within 1e-13: a quantised coefficient's half away from zero (jcdctmgr.c adds q/2 to the
# magnitude), an output sample's half up (jidctint.c's DESCALE). A nudge of 1e-9 of each
# coefficient's size, and 1e-4 of a grey level on each sample, tips them as libjpeg does; nearer
# the half than that without being on it, a value almost never is. Measured against PIL's JPEG on
# 16 faces140k-mini faces at quality 20: the mean pixel difference 0.22 -> 0.13 grey levels.
AWAY_FROM_ZERO = 1 + 1e-9
HALF_UP = 1e-4


def quant_tables(quality: torch.Tensor) -> torch.Tensor:
    """(N, 2, 8, 8) float: the luma and chroma tables libjpeg uses at each quality (1-100):
    scale 5000/q below 50, else 200 - 2q (percent); entry (T * scale + 50) // 100 in 1..255."""
    q = quality.clamp(1, 100).to(torch.float64)
    scale = torch.where(q < 50, torch.floor(5000 / q), 200 - 2 * q)
    base = _base_tables(quality.device)
    return torch.floor((base * scale.view(-1, 1, 1, 1) + 50) / 100).clamp_(1, 255).float()


# Built once per device: a tensor made from host data on a GPU is a copy the host waits for,
# and this runs on every batch. Every constant here is built on the host and copied (never by
# kernels on the device): once the copy returns it is whole for every stream, the augmentation's
# side stream and the step's alike.
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


# JFIF's RGB -> YCbCr (ITU T.871): each row's (R, G, B) weights
TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168735892, -0.331264108, 0.5), (0.5, -0.418687589, -0.081312411))
# the way back: R = Y + 1.402 Cr, G = Y - 0.344136286 Cb - 0.714136286 Cr, B = Y + 1.772 Cb
CR_TO_R, CB_TO_G, CR_TO_G, CB_TO_B = 1.402, -0.344136286, -0.714136286, 1.772


def rgb_to_ycbcr(p: torch.Tensor) -> torch.Tensor:
    """JFIF YCbCr of 0-255 RGB (N, 3, H, W), rounded as libjpeg's 8-bit samples and level-shifted
    by -128 as JPEG's DCT takes them: every plane in -128..127."""
    r, g, b = p.unbind(dim=1)
    ycc = torch.empty_like(p)
    y, cb, cr = ycc.unbind(dim=1)
    for out, (wr, wg, wb) in zip((y, cb, cr), TO_YCBCR, strict=True):
        torch.mul(b, wb, out=out).add_(r, alpha=wr).add_(g, alpha=wg)  # three passes, no temporaries
    y.sub_(128)
    return ycc.round_().clamp_(-128, 127)


def ycbcr_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """0-255 RGB (N, 3, H, W), rounded and clamped, from Y (N, H, W) in 0-255 and Cb, Cr (N, H, W)
    level-shifted (-128..127)."""
    rgb = torch.empty((y.shape[0], 3, *y.shape[1:]), dtype=y.dtype, device=y.device)
    r, g, b = rgb.unbind(dim=1)
    torch.add(y, cr, alpha=CR_TO_R, out=r)
    torch.add(y, cb, alpha=CB_TO_G, out=g).add_(cr, alpha=CR_TO_G)
    torch.add(y, cb, alpha=CB_TO_B, out=b)
    return rgb.round_().clamp_(0, 255)


def _to_blocks(planes: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W), H and W multiples of 8 -> float64 (N, C*H/8*W/8, 64): each 8x8 block a row,
    in one copy (the layout change and the conversion together)."""
    n, c, h, w = planes.shape
    blocks = torch.empty((n, c, h // BLOCK, w // BLOCK, BLOCK, BLOCK), dtype=torch.float64, device=planes.device)
    blocks.copy_(planes.view(n, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(3, 4))
    return blocks.view(n, -1, BLOCK * BLOCK)


def _from_blocks(blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``_to_blocks`` undone into a new tensor shaped and typed as ``like`` (N, C, H, W)."""
    n, c, h, w = like.shape
    planes = torch.empty_like(like)
    planes.view(n, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).copy_(
        blocks.view(n, c, h // BLOCK, w // BLOCK, BLOCK, BLOCK).transpose(3, 4))
    return planes


def compress_planes(planes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Level-shifted planes (N, C, H, W), H and W multiples of 8, through DCT, quantisation with
    each image's ``table`` (N, 8, 8) and back: what the decoder reads out, rounded, clamped and
    still level-shifted."""
    # The 2-D DCT of a block as one product with the 64x64 matrix kron(D, D), the quantisation
    # folded into it: coefficient / q = block @ (K.T / q) per image, and dequantised, back
    # through (q * K). Two batched matrix products and a rounding are the whole codec, where
    # 8x8 products and a separate divide, round and multiply read every coefficient six times.
    # float64: a coefficient off by 1e-3 of its size (TF32 matmuls, where a user enables them)
    # would cross quantisation boundaries, and autocast leaves float64 alone.
    k = dct_kron(planes.device)
    q = table.reshape(-1, 1, BLOCK * BLOCK).double()  # (N, 1, 64)
    coef = torch.bmm(_to_blocks(planes), k.T * (AWAY_FROM_ZERO / q)).round_()
    # + HALF_UP on every sample, through the DC coefficients alone (a 64th of them): the inverse
    # turns DC into DC * q_DC / 8 on each of the block's samples
    coef[..., 0].add_(q[..., 0].reciprocal().mul_(8 * HALF_UP))
    blocks = torch.bmm(coef, q.transpose(1, 2) * k)
    return _from_blocks(blocks, planes).round_().clamp_(-128, 127)


@functools.lru_cache(maxsize=8)
def dct_kron(device: torch.device) -> torch.Tensor:
    """kron(D, D) (64 x 64, float64): a row-major 8x8 block's coefficients are kron(D, D) @ block."""
    d = dct_matrix(torch.device("cpu"))
    return torch.kron(d, d).to(device)  # a host copy, ready for every stream: see _base_tables


def jpeg_tensor(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """x (N, 3, H, W) float in [0, 1] after a JPEG round trip at ``quality`` (N,) per image,
    4:2:0 chroma as PIL saves by default; float [0, 1] out, on x's device.

    Written for a GPU's memory bandwidth: it reads and writes the images' size about 42 times
    (74 before 2026-12-06; ``trueface.bench.traffic``), see ``compress_planes``."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % MCU, -width % MCU
    p = torch.mul(x.float(), 255).round_()  # x in [0, 1]; rgb_to_ycbcr's clamp catches stray values
    p = nnf.pad(p, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else p
    ycc = rgb_to_ycbcr(p)
    tables = quant_tables(quality)
    luma = compress_planes(ycc[:, :1], tables[:, 0]).add_(128)
    chroma = nnf.avg_pool2d(ycc[:, 1:], 2).round_()  # h2v2 downsampling: the mean of each 2x2
    chroma = nnf.interpolate(compress_planes(chroma, tables[:, 1]), scale_factor=2, mode="bilinear",
                             align_corners=False).round_()
    rgb = ycbcr_to_rgb(luma[:, 0], chroma[:, 0], chroma[:, 1])
    return rgb[..., :height, :width].div(255).to(x.dtype)
