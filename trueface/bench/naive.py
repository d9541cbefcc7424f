"""The naive reference input pipeline, as the original research code did it (``jobs.benchmark input``).

Usage::

    naive = NaivePipeline(image_size=224, cfg=config.stage1.augment, strong=True)
    x = naive(path)               # float CHW tensor, normalised: what one training sample costs
    names = [name for name, _ in naive.ops]

What makes it naive, on purpose, so the benchmark shows what the project's path saves:

- every file is decoded at full size by PIL (no power-of-two reduce before the resize);
- strong: EVERY op always runs (p=1), torchvision transforms one sample at a time, in the order
  RandomResizedCrop, horizontal flip, RandAugment, ColorJitter, JPEG re-encode, Gaussian blur
  (torchvision's, with the configured kernel), then float conversion, Gaussian noise,
  normalisation and RandomErasing, all on the CPU. Magnitudes are the configured ones
  (``trueface.augment.strong_params`` at the config's strength); only the probabilities are
  ignored. Grayscale is left out: at p=1 every image would be grey, which no run wants;
- light: resize, centre crop, flip, to float, normalise (torchvision v2, as the project's light
  path; only the decode differs).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from trueface.augment import normalize, strong_params
from trueface.config.schema import AugmentConfig

#: The strong ops the naive pipeline applies to every sample, in order (see ``naive_strong_ops``).
STRONG_OPS = ("RandomResizedCrop", "HorizontalFlip", "RandAugment", "ColorJitter", "JPEG", "GaussianBlur",
              "ToFloat", "GaussianNoise", "Normalize", "RandomErasing")


def naive_decode(path: str | os.PathLike) -> Image.Image:
    """Full-size RGB decode, as a plain training script does it."""
    with Image.open(path) as img:
        return img.convert("RGB")


def naive_strong_ops(image_size: int, cfg: AugmentConfig) -> list[tuple[str, Callable]]:
    """(name, op) for every strong op, each always applied, at ``cfg``'s magnitudes."""
    p = strong_params(cfg)
    ops = [
        v2.RandomResizedCrop(image_size, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p=1.0),
        v2.RandAugment(p.randaugment_ops, p.randaugment_magnitude),
        v2.ColorJitter(*p.color_jitter),
        v2.JPEG(list(p.jpeg_quality)),
        v2.GaussianBlur(cfg.blur_kernel, sigma=p.blur_sigma),
        v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
        v2.GaussianNoise(sigma=p.noise_std),
        normalize(),
        v2.RandomErasing(p=1.0, scale=p.erasing_scale, value=0),
    ]
    return list(zip(STRONG_OPS, ops))


def naive_light_ops(image_size: int) -> list[tuple[str, Callable]]:
    ops = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.RandomHorizontalFlip(),
           v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]), normalize()]
    return list(zip(("Resize", "CenterCrop", "HorizontalFlip", "ToFloat", "Normalize"), ops))


class NaivePipeline:
    """Path -> normalised float tensor: ``naive_decode`` then the light or the always-on strong ops."""

    def __init__(self, image_size: int, cfg: AugmentConfig, strong: bool) -> None:
        self.ops = naive_strong_ops(image_size, cfg) if strong else naive_light_ops(image_size)

    def transform(self, img: Image.Image) -> torch.Tensor:
        for _, op in self.ops:
            img = op(img)
        return img

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        return self.transform(naive_decode(path))
