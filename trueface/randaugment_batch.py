"""RandAugment on a uint8 batch on the training device, each sample with its own ops (issue 11).

Usage (``trueface.augment_device.DeviceAugment`` does this for every strong batch)::

    ra = BatchRandAugment(num_ops=2, magnitude=9)
    codes = ra.draw(n, p=0.5, generator=g)   # (N, 2) int64 on g's device: op * 2 + negated; OFF where off
    # then for each slot k in turn, on sub-batches (DeviceAugment gathers them without host reads):
    out = ra.geometric(sub_batch, sub_codes)  # the samples whose codes[:, k] is_geometric: one resample
    out = ra.colour(sub_batch, code)          # the samples whose codes[:, k] == code: one op and sign

Why on the device: RandAugment was the dearest op left in the DataLoader workers once the other
strong ops moved to the GPU (0.86 ms of the 2.1 ms a worker spent per Stage I image on an H200's
host cores), and the loader was one of the two ceilings that held Stage I at 0.63x of the model.

The draws are ``v2.RandAugment``'s: per sample, the whole RandAugment on with probability p (the
per-sample path's ``RandomApply``), then ``num_ops`` ops drawn uniformly from its 14, one after the
other; a signed op's magnitude is negated with probability 1/2. A code is ``op * 2 + negated``
(``OPS`` order). The magnitudes are torchvision's own table (31 bins) at ``magnitude`` and the
image size, and the ops are torchvision's uint8 tensor kernels with RandAugment's defaults (nearest
resampling, fill 0), so given the draws the result is bit for bit what ``v2.RandAugment`` does to
a uint8 tensor: tests check every op and sign on the CPU at 24 x 40 px, and the geometric ones at
97 x 131 and 1024 px too. On a GPU the matrix product that places the resampling grid may round
differently from the CPU's (or run in TF32, where a run allows that for matmuls), which can move
the nearest-neighbour pick of a pixel that sits near half-way. It stays a matrix product, as in
torchvision: the same sum written elementwise already differed in 1e-5 of a 1024-px rotation's
pixels on the CPU.

Three ops are rebuilt so that a batch reads nothing back from the device and copies nothing to it:
torchvision builds each affine matrix from a Python list (a blocking copy on a GPU), so the five
geometric ops are one grid sample with per-sample matrices from a table kept on the device;
sharpness builds its kernel the same way (kept on the device here); autocontrast assigns through a
boolean mask (a ``nonzero``, which reads its count back), replaced by ``torch.where``.

Against the per-sample path, which runs RandAugment on PIL images, the same draws give pixels that
differ where PIL's kernels round differently from torchvision's tensor kernels; a test compares the
two paths' distributions of the pixel change (Kolmogorov-Smirnov).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import RandAugment
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._geometry import _get_inverse_affine_matrix

#: torchvision's ops, in its order (a code's op is its index here).
OPS: tuple[str, ...] = tuple(RandAugment._AUGMENTATION_SPACE)
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
NUM_BINS = 31  # v2.RandAugment's default number of magnitude bins, which strong_transform keeps
OFF = -1  # the code of a sample whose RandAugment is off (the per-sample path's RandomApply)


def code_of(op: str, negated: bool = False) -> int:
    return OPS.index(op) * 2 + int(negated)


def _geometric_codes() -> range:
    codes = sorted(code_of(op, negated) for op in GEOMETRIC for negated in (False, True))
    if codes != list(range(codes[0], codes[-1] + 1)):  # is_geometric tests a range
        raise RuntimeError(f"torchvision's RandAugment ops moved: {OPS}")
    return range(codes[0], codes[-1] + 1)


GEOMETRIC_CODES = _geometric_codes()


class BatchRandAugment:
    """``v2.RandAugment(num_ops, magnitude)`` for uint8 (N, 3, H, W) batches, per-sample ops."""

    def __init__(self, num_ops: int, magnitude: int, num_bins: int = NUM_BINS) -> None:
        self.num_ops, self.magnitude, self.num_bins = num_ops, magnitude, num_bins

    def draw(self, n: int, p: float, generator: torch.Generator) -> torch.Tensor:
        """(n, num_ops) codes on the generator's device: ``OFF`` for every slot of a sample whose
        RandAugment is off, else ``op * 2 + negated`` (negated only for signed ops)."""
        g, dev = generator, generator.device
        on = torch.rand(n, generator=g, device=dev) < p
        op = torch.randint(len(OPS), (n, self.num_ops), generator=g, device=dev)
        negated = (torch.rand(n, self.num_ops, generator=g, device=dev) <= 0.5) & _signed(dev)[op].bool()
        return torch.where(on[:, None], op * 2 + negated, OFF)

    @staticmethod
    def is_geometric(codes: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Which codes are geometric, on the device (a tensor) or the host (an array) alike."""
        return (codes >= GEOMETRIC_CODES.start) & (codes < GEOMETRIC_CODES.stop)

    def magnitude_of(self, code: int, height: int, width: int) -> float:
        """The code's magnitude as ``v2.RandAugment`` computes it for an image of this size."""
        return _magnitudes(self.num_bins, self.magnitude, height, width)[code]

    def geometric(self, images: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Each image resampled by its code's affine map (``codes`` all geometric, on the device):
        torchvision's ``_affine_grid`` and ``_apply_grid_transform`` with a matrix per sample."""
        n, _, height, width = images.shape
        theta = _theta_table(self, images.device, height, width).index_select(0, codes - GEOMETRIC_CODES.start)
        grid = _base_grid(images.device, height, width).expand(n, -1, -1).bmm(theta).view(n, height, width, 2)
        out = nnf.grid_sample(images.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return out.round_().to(images.dtype)

    def colour(self, images: torch.Tensor, code: int) -> torch.Tensor:
        """Every image through the (non-geometric) op and sign of ``code``."""
        name = OPS[code // 2]
        m = self.magnitude_of(code, *images.shape[-2:])
        if name == "Identity":
            return images
        if name == "Brightness":
            return F.adjust_brightness(images, 1.0 + m)
        if name == "Color":
            return F.adjust_saturation(images, 1.0 + m)
        if name == "Contrast":
            return F.adjust_contrast(images, 1.0 + m)
        if name == "Sharpness":
            return _sharpness(images, 1.0 + m)
        if name == "Posterize":
            return F.posterize(images, int(m))
        if name == "Solarize":
            return F.solarize(images, 255 * m)
        if name == "AutoContrast":
            return _autocontrast(images)
        if name == "Equalize":
            return F.equalize(images)
        raise ValueError(f"not a colour op of RandAugment: {name} (code {code})")

    def inverse_matrix(self, code: int, height: int, width: int) -> list[float]:
        """The inverse affine matrix torchvision's ``affine``/``rotate`` builds for this code, with
        the arguments ``v2.RandAugment`` passes them (shears about the top-left corner)."""
        name, m = OPS[code // 2], self.magnitude_of(code, height, width)
        if name == "Rotate":
            return _get_inverse_affine_matrix([0.0, 0.0], -(m % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
        shear = {"ShearX": [math.degrees(math.atan(m)), 0.0], "ShearY": [0.0, math.degrees(math.atan(m))]}
        translate = {"TranslateX": [float(int(m)), 0.0], "TranslateY": [0.0, float(int(m))]}
        center = [-0.5 * width, -0.5 * height] if name in shear else [0.0, 0.0]
        return _get_inverse_affine_matrix(center, 0.0, translate.get(name, [0.0, 0.0]), 1.0,
                                          shear.get(name, [0.0, 0.0]))


@functools.lru_cache(maxsize=64)
def _magnitudes(num_bins: int, magnitude: int, height: int, width: int) -> tuple[float, ...]:
    """Every code's magnitude at one image size, computed once: torchvision builds its tables
    with torch ops on every draw."""
    out = []
    for code in range(2 * len(OPS)):
        values_fn, signed = RandAugment._AUGMENTATION_SPACE[OPS[code // 2]]
        values = values_fn(num_bins, height, width)
        value = 0.0 if values is None else float(values[magnitude])
        out.append(-value if signed and code % 2 else value)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _signed(device: torch.device) -> torch.Tensor:
    """1 for the ops whose magnitude takes a sign (uint8: indexing a bool table looks like masking)."""
    return torch.tensor([RandAugment._AUGMENTATION_SPACE[op][1] for op in OPS], dtype=torch.uint8, device=device)


@functools.lru_cache(maxsize=32)
def _theta_table(ra: BatchRandAugment, device: torch.device, height: int, width: int) -> torch.Tensor:
    """(10, 3, 2): every geometric code's matrix, transposed and scaled as ``_affine_grid`` does
    (in float32 on the CPU: the same IEEE arithmetic as on any device)."""
    thetas = torch.tensor([ra.inverse_matrix(code, height, width) for code in GEOMETRIC_CODES],
                          dtype=torch.float32).view(-1, 2, 3)
    return thetas.transpose(1, 2).div(torch.tensor([0.5 * width, 0.5 * height])).to(device)


@functools.lru_cache(maxsize=8)
def _base_grid(device: torch.device, height: int, width: int) -> torch.Tensor:
    """``_affine_grid``'s (1, H*W, 3) base grid: pixel centres about the image centre, then 1."""
    base = torch.empty(1, height, width, 3)
    base[..., 0].copy_(torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width))
    base[..., 1].copy_(torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height).unsqueeze_(-1))
    base[..., 2].fill_(1)
    # built on the host (half-integers: exact anywhere) and copied: the copy returns when the grid
    # is on the device, so any stream may read it; built by kernels, only the stream that queued
    # them would be sure to see it whole (the augmentation runs on a side stream ahead of the step)
    return base.view(1, height * width, 3).to(device)


@functools.lru_cache(maxsize=8)
def _sharpness_kernel(device: torch.device) -> torch.Tensor:
    a, b = 1.0 / 13.0, 5.0 / 13.0
    return torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=torch.float32, device=device).expand(3, 1, 3, 3)


def _sharpness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's ``adjust_sharpness_image`` on uint8 (N, 3, H, W), its kernel kept on the device."""
    out = images.to(torch.float32, copy=True)
    blurred = nnf.conv2d(out, _sharpness_kernel(images.device), groups=3).round_()
    inner = out[..., 1:-1, 1:-1]  # the border keeps its pixels, as PIL's and torchvision's
    inner.add_(blurred.sub_(inner), alpha=1.0 - factor)
    return out.clamp_(0, 255).to(images.dtype)


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ``autocontrast_image`` on uint8, its boolean-mask assignments as ``torch.where``."""
    x = images.to(torch.float32)
    minimum = x.amin(dim=(-2, -1), keepdim=True)
    maximum = x.amax(dim=(-2, -1), keepdim=True)
    flat = maximum == minimum  # a one-level channel is left as it is
    inv_scale = torch.where(flat, 1.0, (maximum - minimum).mul_(1.0 / 255))
    return x.sub_(torch.where(flat, 0.0, minimum)).div_(inv_scale).clamp_(0, 255).to(images.dtype)
