"""Batched strong augmentation on the training device (issue 11, part 2).

Usage::

    cpu_tf = Uint8TrainTransform(image_size=224, light_epochs=5, cfg=stage.augment)  # in the Dataset
    cpu_tf.set_epoch(epoch); u8 = cpu_tf(pil_image)        # uint8 CHW: crop and flip only
    aug = DeviceAugment(stage.augment)
    g = torch.Generator(device=device); g.manual_seed(seed)
    x = aug(u8_batch.to(device, non_blocking=True), g, strong=cpu_tf.is_strong)  # float NCHW, normalised
    x, targets, _ = mixup(x, targets, alpha, rng)          # trueface.augment.mixup, unchanged

What stays on the CPU side (``Uint8TrainTransform``, per sample, in the DataLoader workers):
decode, the crop (RandomResizedCrop when strong, Resize + CenterCrop when light) and the
horizontal flip, ending in a uint8 tensor (no float, no normalisation). The crop must run there
because images only share a size after it, so nothing before it can be batched.

What ``DeviceAugment`` does, batched, in the per-sample path's order: RandAugment on the uint8
pixels (``trueface.randaugment_batch``: each sample its own ops; it was the dearest op left in the
workers, 0.86 ms of the 2.1 ms an H200's host core spent per Stage I image), then on float [0, 1]
pixels colour jitter (brightness, contrast, saturation, hue in a per-sample random order, like
torchvision's ColorJitter), grayscale, JPEG re-encoding, Gaussian blur, Gaussian noise, then
normalisation (ImageNet mean/std), then random erasing with value 0 (after normalisation, as
``v2.RandomErasing(value=0)`` in the per-sample path). Every op has its own per-sample boolean
mask and per-sample magnitudes, drawn from the ranges ``trueface.augment.strong_params`` gives at
the configured strength, so the distributions are the per-sample path's. ``strong=False`` (the
light epochs) or strength 0 only normalises: the output equals the per-sample light path's in
float32 (a CPU or fp32 run); under CUDA autocast's float16 (``Runtime.augment_dtype``) it is that
rounded to float16 (within 0.0022).

Vectorised over the batch, except: RandAugment runs once per op slot for the geometric ops (one
resample with per-sample matrices) and once per other op and sign drawn (at most 13 sub-batches a
slot); colour jitter loops over its 4 positions x 4 ops (16 masked sub-batches, not samples); JPEG
on the CPU loops over the images (libjpeg takes one at a time).

One host read a batch: ``apply`` copies every mask and the jitter order to the host in one go
(``HostMasks``) and sizes each masked sub-batch from it, finding its indices on the device with
``nonzero_static``. ``nonzero`` must read its count back before it can size its output, a
synchronisation each: 21 a batch here until then (16 in colour jitter), each one stopping the
thread that queues the batch's work until the GPU had caught up with it. ``normalise`` keeps the
normalisation's mean and std on the device for the same reason.

JPEG (``jpeg_codec``): on CPU, torchvision.io.encode_jpeg / decode_jpeg, one image at a time
(libjpeg with PIL's defaults, 4:2:0 chroma: bit-identical to the per-sample path's PIL JPEG at
the same quality, as a test checks). On a GPU, ``trueface.jpeg_tensor``: JPEG's lossy steps
(YCbCr, 4:2:0, 8x8 DCT, libjpeg's quantisation tables, the inverse, fancy upsampling) as batched
tensor arithmetic; against PIL's JPEG its pixels differ by about half a grey level on average
and its PSNR to the original matches within 0.05 dB (tests/test_jpeg_tensor.py). nvJPEG
(torchvision.io on CUDA) was used until an H200 showed it took about 25 ms of the 35 ms this
class spent on a Stage I batch (200 images of 224 px): it takes one quality per call and
synchronises twice per image.

Given the same draws, pixels differ from the per-sample path by rounding only: the per-sample
path rounds to uint8 after every op, this path stays in float32 (JPEG rounds as it must), and its
hue shift runs through OpenCV's HSV where this one moves the hue round HSV's hexcone (within 1e-6
of torchvision's ``adjust_hue``). The per-sample path's hue shift is also whole steps of 1/256 turn
(torchvision's PIL arithmetic truncates it), this one's is the drawn shift itself: per-sample
shifts average 0.83x this path's in size at strength 0.2, 0.96x at 1 (a mean |shift| of 0.0086
against 0.0103 turn, and 0.048 against 0.050, on a random 16x16 image over 1,000 draws). Both blur with the same kernels (``trueface.augment.blur_kernels``:
a Gaussian of variance exactly sigma^2), a test checks the two blurs agree within a grey level.

Memory traffic: on a GPU these ops are small element-wise kernels whose time is their bytes over
the memory bandwidth, taken from the training step's. Counted op by op (``python -m jobs.benchmark
traffic``) on a Stage I batch (200 images of 224 px, the paper preset, the GPU's JPEG): 11.1 GB in
838 ops in float32, from 15.7 GB in 1,026 before 2026-12-06, when the JPEG, the hue and the colour
jitter's sub-batches were rewritten to read and write less (README, "fewer bytes an augmented
batch"); 8.1 GB in float16 (``dtype``), the type a CUDA run under autocast works in
(``Runtime.augment_dtype``): the model takes its input in 16 bits there anyway. Given the same
draws, float16's pixels are float32's within 0.03-0.05 of a grey level on average (the hue: up
to about 2 levels, its sixths of a turn up to 6 being float16's coarsest numbers here), except
where a JPEG block's coefficient rounds the other way (tests/test_augment_device.py).

Cost on a CPU (64 images of 224 px, Stage I defaults, one torch thread, 2-core machine shared
with another job, niced; medians of 5 runs): the per-sample strong path 8.0 ms an image; this
split 1.2 ms an image on the CPU side plus 7.9 ms for ``DeviceAugment`` on the CPU, so on a CPU it
saves nothing (``augment.device: cpu`` keeps the per-sample path); the gain is moving the 7.9 ms
to the GPU. (Measured before the per-sample noise became a table look-up and its blur and hue
moved to OpenCV; since then ``python -m jobs.benchmark input`` puts the per-sample path at about
3.8 ms an image, 2026-12-05.)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trueface.augment import IMAGENET_MEAN, IMAGENET_STD, StrongParams, TrainTransform, blur_kernels, strong_params
from trueface.config.choices import AUGMENT_DEVICES
from trueface.config.schema import AugmentConfig
from trueface.jpeg_tensor import jpeg_tensor
from trueface.randaugment_batch import OFF, BatchRandAugment, code_of

ERASE_RATIO = (0.3, 3.3)  # torchvision RandomErasing's aspect-ratio range, as the per-sample path
ERASE_ATTEMPTS = 10  # RandomErasing's tries before it gives up and leaves the image unchanged
IDENTITY_CODE = code_of("Identity")  # RandAugment's identity: nothing to run


def runs_on_device(setting: str, device: torch.device, key: str = "augment.device") -> bool:
    """Whether the strong ops run batched here (True) or per sample in the workers (False).

    ``gpu`` on a non-CUDA training device is a ValueError naming ``key``: silently falling back
    would change what a run measures.
    """
    if setting not in AUGMENT_DEVICES:
        raise ValueError(f"{key}: {setting!r} is not one of {', '.join(AUGMENT_DEVICES)}")
    if setting == "gpu" and device.type != "cuda":
        raise ValueError(f"{key}: gpu needs training on CUDA, but the device is {device}; use cpu or auto")
    return setting == "gpu" or (setting == "auto" and device.type == "cuda")


def _stays_on_cpu(op: object) -> bool:
    """The per-sample ops ``Uint8TrainTransform`` keeps: crops and flip."""
    return isinstance(op, (v2.Resize, v2.CenterCrop, v2.RandomResizedCrop, v2.RandomHorizontalFlip))


def _uint8_part(per_sample: v2.Compose) -> v2.Compose:
    return v2.Compose([op for op in per_sample.transforms if _stays_on_cpu(op)] + [v2.PILToTensor()])


class Uint8TrainTransform(TrainTransform):
    """The CPU side: ``TrainTransform``'s crop and flip (the very same op objects and parameters),
    ending in a uint8 CHW tensor; ``DeviceAugment`` does the rest on the batch."""

    def __init__(self, image_size: int, light_epochs: int, cfg: AugmentConfig) -> None:
        super().__init__(image_size, light_epochs, cfg)
        self.light, self.strong = _uint8_part(self.light), _uint8_part(self.strong)


@dataclass(frozen=True)
class Draws:
    """One batch's per-sample random choices, tensors of length N on the batch's device.

    Each ``*_on`` is the op's boolean mask; ``erase_on`` is False where RandomErasing would have
    found no rectangle in its 10 tries (it then leaves the image unchanged).
    """

    jitter_on: torch.Tensor
    jitter_factors: torch.Tensor  # (N, 4): brightness, contrast, saturation factors; hue shift
    jitter_order: torch.Tensor  # (N, 4): a permutation of 0..3 per sample
    gray_on: torch.Tensor
    jpeg_on: torch.Tensor
    jpeg_quality: torch.Tensor  # int64, in [q_min, q_max]
    blur_on: torch.Tensor
    blur_sigma: torch.Tensor
    noise_on: torch.Tensor
    erase_on: torch.Tensor
    erase_box: torch.Tensor  # (N, 4) int64: top, left, height, width
    randaugment_code: torch.Tensor  # (N, ops) int64: op * 2 + negated, OFF (-1) where RandAugment is off

    @property
    def randaugment_on(self) -> torch.Tensor:
        return (self.randaugment_code != OFF).any(dim=1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _coin(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def _jitter_ranges(p: StrongParams) -> list[tuple[float, float]]:
    """ColorJitter's factor ranges for (b, c, s, h): [max(0, 1 - v), 1 + v] and [-h, h]."""
    b, c, s, h = p.color_jitter
    return [(max(0.0, 1 - v), 1 + v) for v in (b, c, s)] + [(-h, h)]


def _erase_boxes(n: int, height: int, width: int, p: StrongParams, g: torch.Generator, device: torch.device):
    """RandomErasing's rectangle search, all samples and all 10 tries at once: area fraction
    U(scale), log aspect U(log 0.3, log 3.3), rounded sides, the first try that fits wins."""
    tries = (n, ERASE_ATTEMPTS)
    (s_lo, s_hi), (r_lo, r_hi) = p.erasing_scale, (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    area = height * width * (s_lo + (s_hi - s_lo) * torch.rand(tries, generator=g, device=device))
    aspect = torch.exp(r_lo + (r_hi - r_lo) * torch.rand(tries, generator=g, device=device))
    h = torch.round(torch.sqrt(area * aspect)).long()
    w = torch.round(torch.sqrt(area / aspect)).long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(dim=1, keepdim=True)  # index of the first True (0 if none)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (torch.rand(n, generator=g, device=device) * (height - h + 1)).long()
    left = (torch.rand(n, generator=g, device=device) * (width - w + 1)).long()
    return fits.any(dim=1), torch.stack([top, left, h, w], dim=1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's blend, ``f * x + (1 - f) * other`` clamped to [0, 1], f per sample: one lerp
    (the same up to rounding) where torchvision multiplies, multiplies and adds, each a pass over
    the images on a GPU."""
    return torch.lerp(other.expand_as(x), x, f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, F.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, F.rgb_to_grayscale(x), f)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``F.adjust_hue`` with a shift (turns) per sample (N,): the hue moved round HSV's hexcone,
    saturation and value kept, within 1e-6 of torchvision's (a test checks).

    Not torchvision's RGB -> HSV -> RGB: the hue alone is worked out, in sixths of a turn, and
    each channel comes back as V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6 with
    n = 5, 3, 1 for R, G, B and C = max - min (the textbook HSV -> RGB). About 30 reads and
    writes of the images' size against torchvision's 52: the hue of every jittered image runs on
    the GPU's memory bandwidth (counted op by op, 2026-12-06)."""
    low, high = torch.aminmax(x, dim=1)
    chroma = high.sub(low).clamp_min_(_NEAR_ZERO.get(x.dtype, 1e-30))  # grey: 0 chroma, any hue; 0/near 0 gives 0
    r, g, b = x.unbind(dim=1)
    # as torchvision's _rgb_to_hsv: the max at R -> (G - B) / C, at G -> 2 + (B - R) / C, else 4 + (R - G) / C
    at_r, at_g = high == r, high == g
    sixths = torch.where(at_r, g - b, torch.where(at_g, b - r, r - g)).div_(chroma)
    sixths.add_(torch.where(at_r, 0.0, torch.where(at_g, 2.0, 4.0))).add_(shift.view(-1, 1, 1) * 6).remainder_(6)
    k = (sixths.unsqueeze(1) + _hue_channel_offsets(x.device, x.dtype)).remainder_(6)
    return high.unsqueeze(1) - torch.minimum(k, 4 - k).clamp_(0, 1).mul_(chroma.unsqueeze(1))


# the grey's chroma in _hue: not 0, and so small that a grey keeps its value (to within this much:
# 6e-8, 1.5e-5 of a grey level, in float16). float16's smallest subnormal: its smallest normal,
# 6e-5, would move dark greys. Kernels do float16 arithmetic in float32, where it is normal.
_NEAR_ZERO = {torch.float16: 2.0**-24}


@functools.lru_cache(maxsize=8)
def _hue_channel_offsets(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """n for R, G, B in HSV -> RGB's k = (n + H) mod 6, kept on the device (built once: from host
    data on a GPU it would be a copy the host waits for)."""
    return torch.tensor([5.0, 3.0, 1.0], dtype=dtype, device=device).view(1, 3, 1, 1)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, active: tuple[bool, ...],
                  host_order: np.ndarray | None = None) -> torch.Tensor:
    """ColorJitter on float [0, 1] images with per-sample ``factors`` (N, 4) applied in per-sample
    ``order`` (N, 4); ops whose ``active`` is False are skipped, as ColorJitter skips a zero.
    ``host_order``: ``order`` on the host, where the caller has read it already; read here otherwise."""
    host_order = order.cpu().numpy() if host_order is None else host_order
    out = x.clone()
    everyone = torch.ones(len(x), dtype=torch.bool, device=x.device)
    jitter_in_place(out, everyone, factors, order, active, host_order)
    return out


def jitter_in_place(x: torch.Tensor, on: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                    active: tuple[bool, ...], host_order: np.ndarray) -> None:
    """``colour_jitter`` on the samples where ``on`` (N,) is True, in place on the whole batch;
    ``host_order`` is ``order`` on the host with -1 in the rows of the samples left alone. Each
    (position, op) copies out only its own samples: a sub-batch of the jittered ones copied out
    and back around the 16 would cost six more reads and writes of each."""
    ops = range(len(_JITTER_OPS))
    factors = factors.to(x.dtype)  # a float16 batch's sub-batches must come back float16 (index_copy_)
    hits = on[:, None, None] & (order[:, :, None] == torch.arange(len(ops), device=order.device))  # (N, 4, 4) at once
    counts = (host_order[:, :, None] == np.array(ops)).sum(axis=0)  # (position, op)
    for position in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            if active[op]:
                _apply_on(x, hits[:, position, op], int(counts[position, op]),
                          lambda s, i, op=op, fn=fn: fn(s, _jitter_factor(factors, i, op)))


def _jitter_factor(factors: torch.Tensor, idx: torch.Tensor, op: int) -> torch.Tensor:
    f = factors.index_select(0, idx)[:, op]
    return f if op == 3 else f.view(-1, 1, 1, 1)  # hue takes a shift per sample, the others a factor


def _apply_on(x: torch.Tensor, mask: torch.Tensor, count: int,
              op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """x[mask] = op(x[mask], indices), in place, where ``count`` (read on the host beforehand) is
    how many of ``mask`` are True; nothing runs when none is. ``nonzero_static`` is told the count,
    so it finds the indices without reading anything back from the device."""
    if count:
        idx = torch.nonzero_static(mask, size=count).squeeze(1)
        x.index_copy_(0, idx, op(x.index_select(0, idx), idx))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (``blur_kernels``, radius >= 3 sigma for
    every sample), edges replicated like PIL's; one grouped conv per direction."""
    n, c, height, width = x.shape
    kernel = blur_kernels(sigma, radius).to(x.dtype)[:, None].expand(n, c, -1).reshape(n * c, -1)  # (N*C, K)
    flat = x.reshape(1, n * c, height, width)
    flat = nnf.conv2d(nnf.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = nnf.conv2d(nnf.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, height, width)


def jpeg_roundtrip(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] images after a JPEG round trip at per-sample ``quality``, on x's device, by
    the codec ``jpeg_codec`` picks for that device."""
    return jpeg_codec(x.device)(x, quality)


def jpeg_codec(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """libjpeg on the CPU: bit-identical to the per-sample path's PIL JPEG (a test checks it).
    Elsewhere ``trueface.jpeg_tensor``: the same lossy steps as tensor arithmetic, batched, with
    per-image quality and no host round trip. nvJPEG (torchvision.io on CUDA) took 25 of the 35 ms
    this class spent on a Stage I batch on an H200, synchronising twice per image; it also encodes
    4:4:4 chroma where PIL and ``jpeg_tensor`` use 4:2:0."""
    return libjpeg_roundtrip if device.type == "cpu" else jpeg_tensor


def libjpeg_roundtrip(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """torchvision.io's libjpeg encode and decode, one CPU image at a time, at its own quality."""
    u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    out = torch.empty_like(x)
    with warnings.catch_warnings():  # torchvision 0.29 marks its codecs deprecated (-> TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        for i, q in enumerate(quality.tolist()):
            out[i] = decode_jpeg(encode_jpeg(u8[i].contiguous(), quality=int(q)), mode=ImageReadMode.RGB).to(x.dtype) / 255
    return out


def add_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``trueface.augment.AddGaussianNoise`` with a generator: on [0, 1] pixels, clamped."""
    return (x + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * std).clamp_(0, 1)


JpegRoundTrip = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (float images, quality) -> images

APPLY_STEPS = ("RandAugment", "to float", "colour jitter", "grayscale", "JPEG", "blur", "noise", "normalise and erase")


def _no_tick(step: str) -> None:
    pass


class DeviceAugment:
    """The strong ops of ``trueface.augment.strong_transform`` after its crop and flip, batched on
    the batch's device; built from ``strong_params(cfg)``. ``jpeg``: the JPEG round trip to use
    (``jpeg_roundtrip``'s signature) where not the batch's device's own (``jpeg_codec``):
    ``jobs.benchmark traffic`` counts the GPU's on a CPU. ``dtype``: the float type its ops work
    in and return, float32 or float16 (``Runtime.augment_dtype``: float16 on CUDA under autocast)."""

    def __init__(self, cfg: AugmentConfig, jpeg: JpegRoundTrip | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.params = strong_params(cfg)
        self.jpeg = jpeg or jpeg_roundtrip
        self.light_only = cfg.strength <= 0
        self.dtype = dtype  # the float type the ops work in and return (Runtime.augment_dtype)
        self.to_float = v2.ToDtype(dtype, scale=True)
        self.blur_radius = math.ceil(3 * self.params.blur_sigma[1])
        self.randaugment = BatchRandAugment(self.params.randaugment_ops, self.params.randaugment_magnitude)

    def __call__(self, images: torch.Tensor, generator: torch.Generator, strong: bool = True) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device -> normalised floats (N, 3, H, W) of ``dtype`` on that device.

        ``strong=False`` (light epochs) and strength 0 only normalise. ``generator`` must live on
        the images' device; a seeded one reproduces the batch exactly.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DeviceAugment takes a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        if generator.device.type != images.device.type:
            raise ValueError(f"DeviceAugment: the generator is on {generator.device}, the images on {images.device}; "
                             "create it with torch.Generator(device=images.device)")
        if not strong or self.light_only:
            return normalise(self.to_float(images))
        n, _, height, width = images.shape
        return self.apply(images, self.draw(n, height, width, generator), generator)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> Draws:
        """Every op's per-sample mask and magnitudes for a batch of n images of height x width."""
        p, g, dev = self.params, generator, generator.device
        ranges = _jitter_ranges(p)
        on, box = _erase_boxes(n, height, width, p, g, dev)
        return Draws(
            jitter_on=_coin(n, p.color_jitter_p, g, dev),
            jitter_factors=torch.stack([_uniform(n, lo, hi, g, dev) for lo, hi in ranges], dim=1),
            jitter_order=torch.rand(n, 4, generator=g, device=dev).argsort(dim=1),
            gray_on=_coin(n, p.grayscale_p, g, dev),
            jpeg_on=_coin(n, p.jpeg_p, g, dev),
            jpeg_quality=torch.randint(p.jpeg_quality[0], p.jpeg_quality[1] + 1, (n,), generator=g, device=dev),
            blur_on=_coin(n, p.blur_p, g, dev),
            blur_sigma=_uniform(n, *p.blur_sigma, g, dev),
            noise_on=_coin(n, p.noise_p, g, dev),
            erase_on=_coin(n, p.erasing_p, g, dev) & on,
            erase_box=box,
            randaugment_code=self.randaugment.draw(n, p.randaugment_p, g),  # last: the draws above keep their seeds
        )

    def apply(self, images: torch.Tensor, d: Draws, generator: torch.Generator,
              tick: Callable[[str], None] | None = None) -> torch.Tensor:
        """The ops of ``d`` on a uint8 batch, each only on its masked samples (noise values come
        from ``generator``); returns the normalised float batch. ``tick``, if given, is called
        with each step's name (``APPLY_STEPS``) as it is queued: ``jobs.benchmark gpu`` times
        the steps with it."""
        tick = tick or _no_tick
        host = HostMasks.read(d)
        x = self._randaugment(images, d.randaugment_code, host.randaugment_codes)
        tick("RandAugment")
        x = self.to_float(x).contiguous()
        tick("to float")
        active = tuple(v > 0 for v in self.params.color_jitter)
        jitter_in_place(x, d.jitter_on, d.jitter_factors, d.jitter_order, active, host.jittered_order())
        tick("colour jitter")
        _apply_on(x, d.gray_on, host.count("gray"), lambda s, i: F.rgb_to_grayscale(s, num_output_channels=3))
        tick("grayscale")
        _apply_on(x, d.jpeg_on, host.count("jpeg"), lambda s, i: self.jpeg(s, d.jpeg_quality.index_select(0, i)))
        tick("JPEG")
        _apply_on(x, d.blur_on, host.count("blur"),
                  lambda s, i: gaussian_blur(s, d.blur_sigma.index_select(0, i), self.blur_radius))
        tick("blur")
        _apply_on(x, d.noise_on, host.count("noise"), lambda s, i: add_noise(s, self.params.noise_std, generator))
        tick("noise")
        x = normalise(x).masked_fill_(_erase_mask(d, *x.shape[-2:])[:, None], 0.0)
        tick("normalise and erase")
        return x

    def _randaugment(self, images: torch.Tensor, codes: torch.Tensor, host_codes: np.ndarray) -> torch.Tensor:
        """RandAugment's op slots one after the other, each sample by its own code: the geometric
        codes in one resample, every other code drawn (identity aside) in a sub-batch of its own."""
        if not (host_codes != OFF).any():
            return images
        x = images.clone()  # the caller's batch stays as it was
        ra = self.randaugment
        for slot in range(codes.shape[1]):
            column, host_column = codes[:, slot], host_codes[:, slot]
            geometric = ra.is_geometric(host_column)
            _apply_on(x, ra.is_geometric(column), int(geometric.sum()),
                      lambda s, i, column=column: ra.geometric(s, column.index_select(0, i)))
            colour = ~geometric & (host_column != OFF) & (host_column != IDENTITY_CODE)
            for code in np.unique(host_column[colour]).tolist():
                _apply_on(x, column == code, int((host_column == code).sum()),
                          lambda s, i, code=code: ra.colour(s, code))
        return x


def normalise(x: torch.Tensor) -> torch.Tensor:
    """``trueface.augment.normalize`` (v2.Normalize's arithmetic, so the same bits) with the mean
    and std kept on x's device: v2.Normalize builds them from Python lists on every call, on a GPU
    a blocking copy that waits for everything queued before it."""
    mean, std = _mean_std(x.device, x.dtype)
    return x.sub(mean).div_(std)


@functools.lru_cache(maxsize=8)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(-1, 1, 1),
            torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(-1, 1, 1))


@dataclass(frozen=True)
class HostMasks:
    """A batch's op masks, jitter order and RandAugment codes on the host, read from the device in
    one copy: the masked ops take their sub-batch sizes from here (``_apply_on``)."""

    masks: dict[str, np.ndarray]  # op name -> (N,) bool
    jitter_order: np.ndarray  # (N, 4)
    randaugment_codes: np.ndarray  # (N, ops) int, OFF where off

    NAMES = ("jitter", "gray", "jpeg", "blur", "noise")

    @classmethod
    def read(cls, d: Draws) -> HostMasks:
        masks = torch.stack([d.jitter_on, d.gray_on, d.jpeg_on, d.blur_on, d.noise_on]).to(torch.uint8)
        codes = (d.randaugment_code.T + 1).to(torch.uint8)  # OFF (-1) -> 0: every code fits a byte
        host = torch.cat([masks, d.jitter_order.T.to(torch.uint8), codes]).cpu().numpy()  # the batch's one host read
        return cls(dict(zip(cls.NAMES, host[:5].astype(bool), strict=True)), host[5:9].T,
                   host[9:].T.astype(np.int64) - 1)

    def count(self, name: str) -> int:
        return int(self.masks[name].sum())

    def jittered_order(self) -> np.ndarray:
        """The jitter order, -1 in the rows of the samples not jittered (``jitter_in_place``)."""
        return np.where(self.masks["jitter"][:, None], self.jitter_order, -1)


def _erase_mask(d: Draws, height: int, width: int) -> torch.Tensor:
    """(N, H, W) True inside each erased sample's rectangle."""
    top, left, h, w = d.erase_box.unbind(dim=1)
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :] & d.erase_on[:, None, None]
