"""Per-sample augmentation (light and strong, with a strength knob) and batch MixUp.

Usage::

    tf = TrainTransform(image_size=224, light_epochs=5, cfg=stage.augment)
    tf.set_epoch(epoch); x = tf(pil_image)          # light before light_epochs, strong after
    images, targets = mixup(images, soft_targets, alpha=0.2, generator=g)

Strong augmentation follows the paper (RandomResizedCrop, flip, RandAugment, colour jitter +
grayscale, JPEG, Gaussian blur, Gaussian noise, random erasing) but every op has its own
probability (the original blurred every sample, flaw 6), and ``strength`` in [0, 1] scales every
probability and magnitude together, so Tune can search one number. ``strength == 0`` is exactly
the light pipeline. Cheap ops run on PIL images (blur and JPEG are several times faster there).
``strong_params`` states what each config value becomes at a strength.

Blur honours ``blur_sigma_max`` exactly: PIL's GaussianBlur radius IS the sigma and its support
follows the sigma, so ``blur_kernel`` (3 or 7) only records the original's kernel size; capping
sigma at kernel / 2 silently turned Stage I's 2.0 into 1.5.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

from trueface.config.schema import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ToFloatImage:
    """PIL image or uint8 CHW tensor -> float32 CHW in [0, 1], contiguous.

    The values of ``v2.ToImage()`` then ``v2.ToDtype(float32, scale=True)``, bit for bit, without
    the channels-last strides ToImage leaves on a PIL image's pixels: Normalize and the noise on
    those strides cost about 0.4 ms more per 224-px image on one core (issue 11's profile).
    """

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, Image.Image):
            pixels = np.array(img)
            img = torch.from_numpy(pixels if pixels.ndim == 3 else pixels[:, :, None]).permute(2, 0, 1)
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8:
            raise TypeError(f"ToFloatImage takes a PIL image or a uint8 tensor, got {type(img).__name__}")
        return img.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)

    def __repr__(self) -> str:
        return "ToFloatImage()"


def to_normalized_tensor() -> ToFloatImage:
    return ToFloatImage()


def normalize() -> v2.Normalize:
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize`` for display (TensorBoard grids); values clamped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def eval_transform(image_size: int) -> v2.Compose:
    """Resize the short side, centre crop: what validation, test and prediction see."""
    return v2.Compose(
        [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), to_normalized_tensor(), normalize()]
    )


def light_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomHorizontalFlip(),
            to_normalized_tensor(),
            normalize(),
        ]
    )


class RandomJPEG:
    """Re-encode as JPEG at a random quality in [q_min, q_max] (PIL: fast, exact)."""

    def __init__(self, q_min: int, q_max: int) -> None:
        self.q_min, self.q_max = q_min, q_max

    def __call__(self, img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=random.randint(self.q_min, self.q_max))
        buf.seek(0)
        return Image.open(buf).convert("RGB")


class RandomGaussianBlur:
    """Gaussian blur with sigma drawn uniformly from [sigma_min, sigma_max], applied exactly:
    PIL's GaussianBlur radius is the standard deviation and its support grows with it."""

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma_min, self.sigma_max)))


NOISE_BITS = 16


def _normal_quantiles(bits: int = NOISE_BITS) -> np.ndarray:
    """The 2**bits quantiles of N(0, 1) at (k + 0.5) / 2**bits, rescaled to unit variance: a random
    16-bit index into them is a normal draw, truncated at +-4.3 sigma (probability 1.7e-5)."""
    levels = 2**bits
    table = torch.special.ndtri((torch.arange(levels, dtype=torch.float64) + 0.5) / levels).numpy()
    return (table / table.std()).astype(np.float32)


class AddGaussianNoise:
    """Additive Gaussian noise on [0, 1] pixels, clamped, before normalisation.

    The normal values are looked up, not computed: random 16-bit integers index the 65,536
    quantiles of N(0, 1) (``_normal_quantiles``). On one core a 224-px image's 150,528 values take
    about 0.4 ms this way and 5.8 ms with ``torch.randn_like`` (issue 11's profile: it was the
    costliest strong op). The integers come from a numpy generator seeded by one draw from torch's
    RNG, so seeded runs repeat and each DataLoader worker (seeded by torch) draws its own noise.
    """

    table = _normal_quantiles()

    def __init__(self, std: float) -> None:
        self.std = std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,)))
        index = np.frombuffer(np.random.default_rng(seed).bytes(2 * x.numel()), dtype=np.uint16)
        noise = torch.from_numpy(np.take(self.table, index)).view(x.shape)
        return noise.mul_(self.std).add_(x).clamp_(0, 1)


CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range at strength 1
BLUR_SIGMA_MIN = 0.1


@dataclass(frozen=True)
class StrongParams:
    """The effective parameters of every strong op at one strength (see ``strong_params``)."""

    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    randaugment_p: float
    randaugment_ops: int
    randaugment_magnitude: int
    color_jitter_p: float
    color_jitter: tuple[float, float, float, float]
    grayscale_p: float
    jpeg_p: float
    jpeg_quality: tuple[int, int]
    blur_p: float
    blur_sigma: tuple[float, float]
    noise_p: float
    noise_std: float
    erasing_p: float
    erasing_scale: tuple[float, float]


def strong_params(cfg: AugmentConfig) -> StrongParams:
    """What each config value becomes at strength s = ``cfg.strength``.

    Every probability, and every magnitude whose zero means "no change" (colour jitter, RandAugment
    magnitude, noise std, erased area), is multiplied by s. A range that must keep an identity end
    moves from that end towards the configured one by s: crop scale and ratio from 1, JPEG quality
    from jpeg_quality_max, blur sigma from 0.1. RandAugment's op count is not scaled (its
    probability and magnitude are). The erased area keeps torchvision's usual 0.02 minimum.
    """
    s = cfg.strength
    return StrongParams(
        crop_scale=(1 - (1 - cfg.crop_scale_min) * s, 1.0),
        crop_ratio=(1 - (1 - CROP_RATIO[0]) * s, 1 + (CROP_RATIO[1] - 1) * s),
        randaugment_p=cfg.randaugment_p * s,
        randaugment_ops=cfg.randaugment_ops,
        randaugment_magnitude=round(cfg.randaugment_magnitude * s),
        color_jitter_p=cfg.color_jitter_p * s,
        color_jitter=tuple(v * s for v in cfg.color_jitter),
        grayscale_p=cfg.grayscale_p * s,
        jpeg_p=cfg.jpeg_p * s,
        jpeg_quality=(round(cfg.jpeg_quality_max - (cfg.jpeg_quality_max - cfg.jpeg_quality_min) * s), cfg.jpeg_quality_max),
        blur_p=cfg.blur_p * s,
        blur_sigma=(BLUR_SIGMA_MIN, BLUR_SIGMA_MIN + (cfg.blur_sigma_max - BLUR_SIGMA_MIN) * s),
        noise_p=cfg.noise_p * s,
        noise_std=cfg.noise_std * s,
        erasing_p=cfg.erasing_p * s,
        erasing_scale=(0.02, max(0.02, cfg.erasing_scale_max * s)),
    )


def strong_transform(image_size: int, cfg: AugmentConfig) -> v2.Compose:
    """The strong pipeline at ``cfg.strength``, built from ``strong_params``; strength 0 returns
    the light pipeline."""
    if cfg.strength <= 0:
        return light_transform(image_size)
    p = strong_params(cfg)
    pil_ops = [
        v2.RandomResizedCrop(image_size, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandAugment(p.randaugment_ops, p.randaugment_magnitude)], p=p.randaugment_p),
        v2.RandomApply([v2.ColorJitter(*p.color_jitter)], p=p.color_jitter_p),
        v2.RandomGrayscale(p=p.grayscale_p),
        v2.RandomApply([RandomJPEG(*p.jpeg_quality)], p=p.jpeg_p),
        v2.RandomApply([RandomGaussianBlur(*p.blur_sigma)], p=p.blur_p),
    ]
    tensor_ops = [
        to_normalized_tensor(),
        v2.RandomApply([AddGaussianNoise(p.noise_std)], p=p.noise_p),
        normalize(),
        v2.RandomErasing(p=p.erasing_p, scale=p.erasing_scale, value=0),
    ]
    return v2.Compose(pil_ops + tensor_ops)


class TrainTransform:
    """Light augmentation for the first ``light_epochs`` epochs, strong afterwards.

    The DataLoader re-forks its workers every epoch (persistent_workers=False), so calling
    ``set_epoch`` on the dataset's transform in the main process reaches the workers.
    """

    def __init__(self, image_size: int, light_epochs: int, cfg: AugmentConfig) -> None:
        self.light_epochs = light_epochs
        self.light = light_transform(image_size)
        self.strong = strong_transform(image_size, cfg)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def is_strong(self) -> bool:
        return self.epoch >= self.light_epochs

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return (self.strong if self.is_strong else self.light)(img)


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing (the smoothing mass spread over all classes)."""
    one_hot = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    return one_hot * (1 - smoothing) + smoothing / num_classes


def mixup(
    images: torch.Tensor, targets: torch.Tensor, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp with one lambda per batch (the paper's): x = l*x + (1-l)*x[perm], same for targets.

    Returns (images, targets, lambda); alpha <= 0 returns the inputs unchanged with lambda 1.
    ``rng`` is the rank's seeded generator, so a run is reproducible.
    """
    if alpha <= 0 or len(images) < 2:
        return images, targets, 1.0
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
    mixed = images * lam + images[perm] * (1 - lam)
    return mixed, targets * lam + targets[perm] * (1 - lam), lam
