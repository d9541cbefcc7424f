"""Per-sample augmentation (light and strong, with a strength knob) and batch MixUp.

Usage::

    tf = TrainTransform(image_size=224, light_epochs=5, cfg=stage.augment)
    tf.set_epoch(epoch); x = tf(pil_image)          # light before light_epochs, strong after
    images, targets, lam = mixup(images, soft_targets, alpha=0.2, rng=np.random.default_rng(0))

Strong augmentation follows the paper (RandomResizedCrop, flip, RandAugment, colour jitter +
grayscale, JPEG, Gaussian blur, Gaussian noise, random erasing) but every op has its own
probability (the original blurred every sample, flaw 6), and ``strength`` in [0, 1] scales every
probability and magnitude together, so Tune can search one number. ``strength == 0`` is exactly
the light pipeline. Ops on uint8 pixels run on PIL images or their numpy view, the float ones on
tensors. ``strong_params`` states what each config value becomes at a strength.

Two ops run in OpenCV, the costliest two of the per-sample path in issue 11's profile (one core,
224 px): the hue shift (PIL's HSV round trip, 1.8-2.7 ms an image, against 0.2 ms) and the blur
(PIL's GaussianBlur, 1.9 ms whatever the sigma, against 0.4 ms). Both do what torchvision's do:
the hue turns by the same 1/255 steps in an 8-bit HSV; the blur is a Gaussian of variance exactly
sigma^2, the kernel the batched path (``trueface.augment_device``) uses too. The crop's bilinear
resize runs there too where it shrinks little (``RandomResizedCrop``: 0.59 -> 0.38 ms for the op),
which the loader workers of the batched path also run; without OpenCV it stays torchvision's.

Blur honours ``blur_sigma_max`` exactly: the sigma is the kernel's standard deviation and its
support follows the sigma, so ``blur_kernel`` (3 or 7) only records the original's kernel size;
capping sigma at kernel / 2 silently turned Stage I's 2.0 into 1.5.
"""

from __future__ import annotations

import functools
import io
import math
import random
import statistics
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trueface.config.schema import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.cache
def _opencv() -> ModuleType:
    """OpenCV, imported on first use, so a GPU machine whose batched path never blurs or shifts hue
    per sample runs without it (``docker/gpu_check.sh`` on a bare image). One OpenCV thread: each
    DataLoader worker augments one image at a time, and OpenCV's own pool would compete with the
    other workers and torch for the same cores."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError("the per-sample blur and hue shift need OpenCV, a trueface dependency: "
                          "pip install opencv-python-headless (or reinstall trueface)") from e
    cv2.setNumThreads(1)
    return cv2


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


def normalize(inplace: bool = False) -> v2.Normalize:
    """ImageNet normalisation. The pipelines below normalise in place: their input is the fresh
    tensor ``ToFloatImage`` (or the noise) just made, and skipping the copy saves 41 us of a
    224-px image's 214 on one core (issue 11's profile)."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD, inplace=inplace)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo ``normalize`` for display (TensorBoard grids); values clamped to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def eval_transform(image_size: int) -> v2.Compose:
    """Resize the short side, centre crop: what validation, test and prediction see."""
    return v2.Compose(
        [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), to_normalized_tensor(), normalize(inplace=True)]
    )


def light_transform(image_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomHorizontalFlip(),
            to_normalized_tensor(),
            normalize(inplace=True),
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


def blur_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 2 radius + 1) 1-D kernels whose variance is exactly sigma^2 for every sigma (sigma is the
    standard deviation, as PIL's GaussianBlur radius is). A sampled Gaussian falls short for sigma below
    about 0.5 (at 0.2 its side taps are 4e-6: no blur, where PIL gives them 0.02) and where the
    radius truncates it, so the missing variance d is added by a [d/2, 1 - d, d/2] step."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma.view(-1, 1).float() ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    deficit = (sigma.view(-1, 1).float() ** 2 - (kernel * taps**2).sum(dim=1, keepdim=True)).clamp_(0, 0.5)
    padded = nnf.pad(kernel, (1, 1))
    kernel = (1 - deficit) * kernel + deficit / 2 * (padded[:, :-2] + padded[:, 2:])
    return kernel / kernel.sum(dim=1, keepdim=True)


class RandomGaussianBlur:
    """Gaussian blur with sigma drawn uniformly from [sigma_min, sigma_max], applied exactly: the
    kernel's variance is sigma^2 (``blur_kernels``, radius 3 sigma), edges replicated. OpenCV's
    separable filter, rounded to uint8 once."""

    def __init__(self, sigma_min: float, sigma_max: float) -> None:
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = random.uniform(self.sigma_min, self.sigma_max)
        kernel = blur_kernels(torch.tensor([sigma]), radius=max(1, math.ceil(3 * sigma)))[0].numpy()
        cv2 = _opencv()
        out = cv2.sepFilter2D(np.asarray(img), -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
        return Image.fromarray(out, img.mode)


def adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's hue shift on an RGB PIL image, through OpenCV's 8-bit full-range HSV.

    The same arithmetic as ``F.adjust_hue`` on PIL: hue as a byte, moved by
    ``uint8(hue_factor * 255)`` modulo 256. The HSV conversions round differently from PIL's;
    either round trip alone moves a pixel by up to 6-7 grey levels (means 0.19 PIL, 0.08 OpenCV, on
    faces140k-mini). About 10x faster than PIL's (issue 11's profile)."""
    cv2 = _opencv()
    hsv = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2HSV_FULL)
    # through int32, as torchvision does: a negative float cast straight to uint8 is undefined in C
    # (it wraps on x86, gives 0 on ARM, so half the hue draws did nothing there)
    hsv[..., 0] += np.int32(hue_factor * 255).astype(np.uint8)  # wraps modulo 256, as torchvision's
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL), "RGB")


class ColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` (same draws, same random order) whose hue shift on an RGB PIL image is
    ``adjust_hue``; every other op and input type is torchvision's own."""

    def _call_kernel(self, functional: Any, inpt: Any, *args: Any, **kwargs: Any) -> Any:
        if functional is F.adjust_hue and isinstance(inpt, Image.Image) and inpt.mode == "RGB":
            return adjust_hue(inpt, *args, **kwargs)
        return super()._call_kernel(functional, inpt, *args, **kwargs)


LINEAR_CROP_MAX_SCALE = 1.25  # RandomResizedCrop in OpenCV up to this shrink each way; PIL's antialiasing beyond


class RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` (the same draws) whose crop and bilinear resize of an RGB PIL image
    run in OpenCV where the crop is at most ``LINEAR_CROP_MAX_SCALE`` times the output each way,
    as every Stage I crop is (224 px from a 198-256 px square of a 256 px face at the paper's
    scale 0.6-1): the crop and resize 0.21 against 0.45 ms an image on one core, the whole op with
    its draws 0.38 against 0.59 ms (faces140k-mini). Both interpolate bilinearly between the same
    pixel centres; torchvision's also widens its filter when it shrinks (antialiasing), which at
    these scales moves pixels by 0.29 grey levels on average and up to 25 at sharp edges. A crop
    shrunk further (a small training size from a large decode) goes to torchvision, where the
    antialiasing matters, and so does every crop where OpenCV is not installed."""

    def _call_kernel(self, functional: Any, inpt: Any, *args: Any, **kwargs: Any) -> Any:
        if functional is F.resized_crop and isinstance(inpt, Image.Image) and inpt.mode == "RGB" \
                and _mode_name(kwargs.get("interpolation")) == "bilinear" and not args:
            out_h, out_w = kwargs["size"]
            top, left, height, width = (kwargs[k] for k in ("top", "left", "height", "width"))
            cv2 = _opencv_if_installed()
            if cv2 is not None and height <= LINEAR_CROP_MAX_SCALE * out_h and width <= LINEAR_CROP_MAX_SCALE * out_w:
                crop = np.asarray(inpt)[top:top + height, left:left + width]
                return Image.fromarray(cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_LINEAR), "RGB")
        return super()._call_kernel(functional, inpt, *args, **kwargs)


@functools.cache
def _opencv_if_installed() -> ModuleType | None:
    """OpenCV, or None where it is missing: the crop then takes torchvision's path, so the loader
    workers of a GPU image without OpenCV (docker/gpu_check.sh) still crop."""
    try:
        return _opencv()
    except ImportError:
        return None


def _mode_name(interpolation: Any) -> str:
    """'bilinear' for ``InterpolationMode.BILINEAR`` and for the plain string torchvision may hand on."""
    return str(getattr(interpolation, "value", interpolation))


NOISE_BITS = 16


def _normal_quantiles(bits: int = NOISE_BITS) -> np.ndarray:
    """The 2**bits quantiles of N(0, 1) at (k + 0.5) / 2**bits, rescaled to unit variance: a random
    16-bit index into them is a normal draw, truncated at +-4.3 sigma (probability 1.7e-5)."""
    # Python's NormalDist, not torch.special.ndtri: this runs at import, and a torch op over 65,536
    # values would start an OpenMP thread pool on the importing thread. A Ray Train worker imports
    # this module on its main thread and trains on another; libgomp then counts both pools'
    # threads against the cores and throttles its spin-waits (measured 0.66x the engine's step rate
    # on a 2-core AMX CPU; tests/test_thread_pools.py checks no import starts a pool). 9 ms;
    # agrees with ndtri to 2e-15.
    levels = 2**bits
    inv_cdf = statistics.NormalDist().inv_cdf
    table = np.array([inv_cdf((k + 0.5) / levels) for k in range(levels)])
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
        RandomResizedCrop(image_size, scale=p.crop_scale, ratio=p.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandAugment(p.randaugment_ops, p.randaugment_magnitude)], p=p.randaugment_p),
        v2.RandomApply([ColorJitter(*p.color_jitter)], p=p.color_jitter_p),
        v2.RandomGrayscale(p=p.grayscale_p),
        v2.RandomApply([RandomJPEG(*p.jpeg_quality)], p=p.jpeg_p),
        v2.RandomApply([RandomGaussianBlur(*p.blur_sigma)], p=p.blur_p),
    ]
    tensor_ops = [
        to_normalized_tensor(),
        v2.RandomApply([AddGaussianNoise(p.noise_std)], p=p.noise_p),
        normalize(inplace=True),
        v2.RandomErasing(p=p.erasing_p, scale=p.erasing_scale, value=0),
    ]
    return v2.Compose(pil_ops + tensor_ops)


class TrainTransform:
    """Light augmentation for the first ``light_epochs`` epochs, strong afterwards.

    The training loader's workers outlive the epochs: each sample's key carries its epoch, and
    ``trueface.data.epoch_keys.EpochSeededDataset`` calls ``set_epoch`` on the worker's copy.
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
    """MixUp with one lambda per batch (the paper's): x = l*x + (1-l)*x[partner], same for targets.

    Each image's partner is another image: a random permutation would pair an image with itself
    with chance 1/n, leaving a third of a micro-batch of 3 unmixed (a worker's share of Stage II's
    batch of 12). The partners follow one random cycle through the batch.
    Returns (images, targets, lambda); alpha <= 0 returns the inputs unchanged with lambda 1.
    ``rng`` is the rank's seeded generator, so a run is reproducible.
    """
    if alpha <= 0 or len(images) < 2:
        return images, targets, 1.0
    lam = float(rng.beta(alpha, alpha))
    order = rng.permutation(len(images))
    partner = np.empty_like(order)
    partner[order] = np.roll(order, 1)
    perm = torch.from_numpy(partner)
    if images.is_cuda:  # pinned, so the copy does not wait for the kernels queued before it
        perm = perm.pin_memory()
    perm = perm.to(images.device, non_blocking=True)
    mixed = images * lam + images[perm] * (1 - lam)
    return mixed, targets * lam + targets[perm] * (1 - lam), lam
