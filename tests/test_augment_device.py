"""The batched device augmentation against the per-sample path of trueface.augment, on the CPU.

Rates: each op's mask rate is within 4 binomial standard deviations of its probability at the
strength, the samples whose pixels changed are exactly the masked ones, and the changed fraction
is within 4 standard deviations (two samples) of the per-sample path's on the same images.
Magnitudes: a per-op statistic's distribution matches the per-sample path's on the same images by
a two-sample Kolmogorov-Smirnov test (p > 1e-3; with 400 + 400 samples that rejects a shift of
about a sixth of the statistic's spread, while uint8 rounding in the per-sample path moves each
statistic by under 1 % of it). That test passes magnitudes off by 25-60 %, so the ranges the
batched path draws its magnitudes from are also held exactly to the per-sample pipeline's ops at
strength 0.35, where rounding matters. Seeds are fixed, so every run sees the same draws.
"""

import importlib
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2.functional._color import _rgb_to_hsv
from torch.utils._python_dispatch import TorchDispatchMode

from trueface.augment import (
    IMAGENET_MEAN,
    ColorJitter,
    RandomJPEG,
    RandomResizedCrop,
    RandomGaussianBlur,
    blur_kernels,
    denormalize,
    light_transform,
    mixup,
    normalize,
    soft_targets,
    strong_params,
    strong_transform,
    to_normalized_tensor,
)
import trueface.augment_device as augment_device
from trueface.augment_device import (
    DeviceAugment,
    Uint8TrainTransform,
    colour_jitter,
    gaussian_blur,
    runs_on_device,
)
from trueface.config import ConfigError, load_config
from trueface.jpeg_tensor import jpeg_tensor
from trueface.config.schema import AugmentConfig
from trueface.precision import Runtime
from trueface.randaugment_batch import BatchRandAugment

N = 400
STRENGTH = 0.5  # every knob below is halved: a path that ignored strength fails the rates
ALL_OFF = dict(crop_scale_min=1.0, randaugment_p=0, color_jitter_p=0, grayscale_p=0, jpeg_p=0, blur_p=0,
               noise_p=0, erasing_p=0, strength=STRENGTH)


def _only(**on) -> AugmentConfig:
    """Every op off except ``on``; crop scale 1 makes the crop the whole image."""
    return AugmentConfig(**{**ALL_OFF, **on})


def _images(n=N, size=16, lo=48, hi=160, seed=0) -> torch.Tensor:
    """uint8 (n, 3, size, size) random images, mirror-symmetric so the per-sample flip is a no-op;
    values in [lo, hi] so brightness and contrast up to 1.4 do not clip."""
    half = np.random.default_rng(seed).integers(lo, hi + 1, (n, 3, size, size // 2), dtype=np.uint8)
    return torch.from_numpy(np.concatenate([half, half[..., ::-1]], axis=-1))


def _per_sample(cfg: AugmentConfig, images: torch.Tensor, seed=1) -> torch.Tensor:
    """trueface.augment.strong_transform on each image as a PIL image."""
    tf = strong_transform(images.shape[-1], cfg)
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])


def _batched(cfg: AugmentConfig, images: torch.Tensor, seed=2):
    """(output, draws) of DeviceAugment, drawing and applying with one seeded generator."""
    aug, g = DeviceAugment(cfg), torch.Generator().manual_seed(seed)
    d = aug.draw(len(images), *images.shape[-2:], g)
    return aug.apply(images, d, g), d


def _light(images: torch.Tensor) -> torch.Tensor:
    """The per-sample light path's float conversion and normalisation, image by image."""
    return torch.stack([normalize()(to_normalized_tensor()(im)) for im in images])


def _changed(out: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Samples whose pixels moved by more than 1.5 grey levels anywhere (the per-sample path
    rounds to whole levels, so both paths are judged at the same visibility)."""
    return (denormalize(out) - denormalize(_light(images))).abs().amax(dim=(1, 2, 3)) > 1.5 / 255


def test_all_ops_off_the_per_sample_path_is_the_light_path_on_these_images():
    # guards the comparisons below: crop (scale 1) and flip (symmetric images) change nothing
    images = _images(n=20)
    assert torch.equal(_per_sample(_only(), images), _light(images))


RATE_CASES = {  # the op's probability field, and its mask in Draws
    "randaugment": ("randaugment_p", "randaugment_on"),
    "colour_jitter": ("color_jitter_p", "jitter_on"),
    "grayscale": ("grayscale_p", "gray_on"),
    "jpeg": ("jpeg_p", "jpeg_on"),
    "blur": ("blur_p", "blur_on"),
    "noise": ("noise_p", "noise_on"),
    "erasing": ("erasing_p", "erase_on"),
}


@pytest.mark.parametrize("op", sorted(RATE_CASES))
def test_each_op_is_applied_at_its_rate(op):
    field, mask_name = RATE_CASES[op]
    cfg = _only(**{field: 0.8})
    p = getattr(strong_params(cfg), field)
    assert p == pytest.approx(0.4)
    images = _images()
    out, d = _batched(cfg, images)
    mask = getattr(d, mask_name)
    assert abs(mask.float().mean().item() - p) <= 4 * np.sqrt(p * (1 - p) / N)
    changed = _changed(out, images)
    assert not (changed & ~mask).any()  # nothing outside the mask moved
    if op not in ("blur", "randaugment"):  # a blur at sigma near 0.1 is invisible, in both paths; so are
        assert torch.equal(changed, mask)  # RandAugment's identity and its 7-bit posterize
    reference = _changed(_per_sample(cfg, images), images).float().mean().item()
    f = changed.float().mean().item()
    assert abs(f - reference) <= 4 * np.sqrt(2 * reference * (1 - reference) / N)


def _gray(x):
    return F.rgb_to_grayscale(x)


def _brightness_stat(out, src):
    return out.mean(dim=(1, 2, 3)) / src.mean(dim=(1, 2, 3))


def _contrast_stat(out, src):
    return _gray(out).std(dim=(1, 2, 3)) / _gray(src).std(dim=(1, 2, 3))


def _saturation_stat(out, src):
    return (out - _gray(out)).abs().mean(dim=(1, 2, 3)) / (src - _gray(src)).abs().mean(dim=(1, 2, 3))


def _hue_stat(out, src):
    """Circular mean of the per-pixel hue shift, in turns."""
    shift = 2 * np.pi * (_rgb_to_hsv(out)[:, 0] - _rgb_to_hsv(src)[:, 0])
    return torch.atan2(shift.sin().mean(dim=(1, 2)), shift.cos().mean(dim=(1, 2))) / (2 * np.pi)


def _noise_stat(out, src):
    return (out - src).std(dim=(1, 2, 3))


def _jpeg_stat(out, src):
    return ((out - src) ** 2).mean(dim=(1, 2, 3))


def _erased_stat(out, src):
    """Erased area fraction: value 0 after normalisation is the mean colour in pixels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return ((out - mean).abs() < 1e-6).all(dim=1).float().mean(dim=(1, 2))


def _change_stat(out, src):
    return (out - src).abs().mean(dim=(1, 2, 3))


def _line_spread_stat(out, src):
    """Standard deviation of the horizontal profile of a vertical line: sqrt(sigma^2 + 1/4)."""
    profile = out.mean(dim=(1, 2))
    w = profile / profile.sum(dim=1, keepdim=True)
    x = torch.arange(profile.shape[1], dtype=torch.float32)
    centre = (w * x).sum(dim=1, keepdim=True)
    return (w * (x - centre) ** 2).sum(dim=1).sqrt()


def _line_images(n=N, size=32) -> torch.Tensor:
    """A two-pixel white line on black, centred, so horizontally symmetric."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[..., size // 2 - 1: size // 2 + 1] = 255
    return images


MAGNITUDE_CASES = {  # config (op always on, at STRENGTH), statistic, images
    # PIL's RandAugment (per sample) against torchvision's tensor kernels (batched, on the device)
    "randaugment": (dict(randaugment_p=1.0, randaugment_magnitude=18), _change_stat, _images),
    "brightness": (dict(color_jitter_p=1.0, color_jitter=(0.8, 0, 0, 0)), _brightness_stat, _images),
    "contrast": (dict(color_jitter_p=1.0, color_jitter=(0, 0.8, 0, 0)), _contrast_stat, _images),
    "saturation": (dict(color_jitter_p=1.0, color_jitter=(0, 0, 0.8, 0)), _saturation_stat, _images),
    "hue": (dict(color_jitter_p=1.0, color_jitter=(0, 0, 0, 0.4)), _hue_stat, lambda: _images(lo=0, hi=255)),
    "jpeg": (dict(jpeg_p=1.0, jpeg_quality_min=20, jpeg_quality_max=90), _jpeg_stat, _images),
    "blur": (dict(blur_p=1.0, blur_sigma_max=4.0), _line_spread_stat, _line_images),
    "noise": (dict(noise_p=1.0, noise_std=0.06), _noise_stat, _images),
    "erasing": (dict(erasing_p=1.0, erasing_scale_max=0.6), _erased_stat, _images),
}


@pytest.mark.parametrize("op", sorted(MAGNITUDE_CASES))
def test_each_op_has_the_per_sample_paths_magnitude_distribution(op):
    # p is 0.5 at STRENGTH (magnitudes scaled too), so both sides are compared on the samples
    # they visibly changed, the same criterion as in the rate test
    on, stat, make = MAGNITUDE_CASES[op]
    cfg = _only(**on)
    images = make()
    src = images.float() / 255
    out, ref = _batched(cfg, images)[0], _per_sample(cfg, images)
    batched = stat(denormalize(out), src)[_changed(out, images)]
    reference = stat(denormalize(ref), src)[_changed(ref, images)]
    assert min(len(batched), len(reference)) > N // 3
    assert ks_2samp(batched.numpy(), reference.numpy()).pvalue > 1e-3
    # and the statistic really moved (a no-op on both sides would pass the test above)
    assert ks_2samp(batched.numpy(), stat(src, src).numpy()).pvalue < 1e-6


EXACT_STRENGTH = 0.35  # where rounding matters: RandAugment 13 x 0.35 = 4.55, JPEG 95 - 75 x 0.35 = 68.75
EXACT_CFG = AugmentConfig(strength=EXACT_STRENGTH, randaugment_magnitude=13, jpeg_quality_min=20,
                          color_jitter_p=1.0, erasing_p=1.0)


def _per_sample_ops(cfg: AugmentConfig) -> dict[type, object]:
    """The per-sample strong pipeline's ops by type, unwrapped from their RandomApply."""
    ops = {}
    for op in strong_transform(32, cfg).transforms:
        inner = op.transforms[0] if isinstance(op, v2.RandomApply) else op
        ops[type(inner)] = inner
    return ops


def _spans(values: torch.Tensor, lo: float, hi: float, name: str, reach: float = 0.02) -> None:
    """values lie in [lo, hi] (up to float32 rounding) and come within reach x (hi - lo) of each end."""
    v = values.double()
    eps = 1e-6 * max(1.0, abs(lo), abs(hi))
    assert v.min() >= lo - eps and v.max() <= hi + eps, f"{name}: drawn [{v.min():.5f}, {v.max():.5f}] outside [{lo}, {hi}]"
    assert v.min() <= lo + reach * (hi - lo) and v.max() >= hi - reach * (hi - lo), \
        f"{name}: drawn [{v.min():.5f}, {v.max():.5f}] does not span [{lo}, {hi}]"


def test_batched_draws_have_exactly_the_per_sample_paths_parameters_where_rounding_matters():
    # the KS test above passes magnitudes off by 25-60 % (and RandAugment 14 for 9): here every
    # magnitude range DeviceAugment draws from is held exactly to the per-sample pipeline's ops,
    # at a strength whose products are not whole numbers, over draws many enough to reach both ends
    ops = _per_sample_ops(EXACT_CFG)
    p = strong_params(EXACT_CFG)
    ra, jitter, jpeg = ops[v2.RandAugment], ops[ColorJitter], ops[RandomJPEG]
    blur, erasing = ops[RandomGaussianBlur], ops[v2.RandomErasing]
    # the per-sample path is strong_params, whose rounding is round(), not int(): 4.55 -> 5, 68.75 -> 69
    assert ra.magnitude == p.randaugment_magnitude == 5
    assert (jpeg.q_min, jpeg.q_max) == p.jpeg_quality == (69, 95)

    aug = DeviceAugment(EXACT_CFG)
    # RandAugment: the same op count, bins and magnitude, and every code's magnitude is
    # torchvision's table at that bin (signed ops negated), at a non-square size
    bra = aug.randaugment
    assert (bra.num_ops, bra.num_bins, bra.magnitude) == (ra.num_ops, ra.num_magnitude_bins, ra.magnitude)
    height, width = 24, 40
    names = list(v2.RandAugment._AUGMENTATION_SPACE)  # a code is op * 2 + negated, in torchvision's order
    for code in range(2 * len(names)):
        values_fn, signed = v2.RandAugment._AUGMENTATION_SPACE[names[code // 2]]
        values = values_fn(ra.num_magnitude_bins, height, width)
        expected = 0.0 if values is None else float(values[ra.magnitude]) * (-1 if signed and code % 2 else 1)
        assert bra.magnitude_of(code, height, width) == expected, f"RandAugment code {code}"

    n, size = 4000, 1024
    d = aug.draw(n, size, size, torch.Generator().manual_seed(5))
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    for i, (name, (lo, hi)) in enumerate(zip(("brightness", "contrast", "saturation", "hue"), ranges, strict=True)):
        _spans(d.jitter_factors[:, i], lo, hi, name)
    # JPEG quality: an integer, so both ends exactly
    assert (int(d.jpeg_quality.min()), int(d.jpeg_quality.max())) == (jpeg.q_min, jpeg.q_max)
    _spans(d.blur_sigma, blur.sigma_min, blur.sigma_max, "blur sigma")
    assert aug.blur_radius >= 3 * blur.sigma_max  # every sigma's kernel reaches 3 sigma, as per sample
    # erasing: each erased box's area fraction, whose sides were rounded, brackets a drawn area in
    # the per-sample RandomErasing's scale; at 1024 px the rounding is 0.4 % of the range
    assert augment_device.ERASE_RATIO == tuple(erasing.ratio)
    _, _, h, w = d.erase_box[d.erase_on].double().unbind(dim=1)
    assert len(h) > n * EXACT_STRENGTH * 0.9
    (s_lo, s_hi), pixels = erasing.scale, size * size
    most, least = (h + 0.5) * (w + 0.5) / pixels, (h - 0.5) * (w - 0.5) / pixels
    assert most.min() >= s_lo - 1e-6 and least.max() <= s_hi + 1e-6, \
        f"erased fraction [{least.min():.5f}, {most.max():.5f}] outside {erasing.scale}"
    fraction = h * w / pixels
    assert fraction.min() <= s_lo + 0.02 * (s_hi - s_lo) and fraction.max() >= s_hi - 0.02 * (s_hi - s_lo), \
        f"erased fraction [{fraction.min():.5f}, {fraction.max():.5f}] does not span {erasing.scale}"


def test_grayscale_is_the_per_sample_grayscale_to_a_grey_level():
    cfg = _only(grayscale_p=1.0)  # 0.5 at STRENGTH
    images = _images(lo=0, hi=255)
    out, d = _batched(cfg, images)
    reference = _per_sample(cfg, images)
    both = d.gray_on & (denormalize(reference).std(dim=1) < 1e-6).all(dim=(1, 2))
    assert both.sum() > N // 8
    assert (denormalize(out[both]) - denormalize(reference[both])).abs().max() <= 1.01 / 255
    assert (denormalize(out[both]).std(dim=1) < 1e-6).all()  # three equal channels


def test_jpeg_codec_is_libjpeg_on_the_cpu_and_the_tensor_jpeg_on_a_gpu():
    assert augment_device.jpeg_codec(torch.device("cpu")) is augment_device.libjpeg_roundtrip
    assert augment_device.jpeg_codec(torch.device("cuda", 0)) is jpeg_tensor


def test_the_gpus_tensor_jpeg_keeps_the_per_sample_rate_and_loss_distribution(monkeypatch):
    # the codec a GPU run uses, run here on the CPU: against the per-sample path's PIL JPEG
    monkeypatch.setattr(augment_device, "jpeg_codec", lambda device: jpeg_tensor)
    test_each_op_is_applied_at_its_rate("jpeg")
    test_each_op_has_the_per_sample_paths_magnitude_distribution("jpeg")


def test_jpeg_on_cpu_is_bit_identical_to_the_per_sample_pil_jpeg_at_one_quality():
    cfg = _only(jpeg_p=1.0, jpeg_quality_min=55, jpeg_quality_max=55, strength=1.0)
    images = _images(n=40, lo=0, hi=255)
    assert torch.equal(denormalize(_batched(cfg, images)[0]).mul(255).round(),
                       denormalize(_per_sample(cfg, images)).mul(255).round())


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0, 2.5])
def test_blur_kernel_variance_is_sigma_squared(sigma):
    # PIL's radius is the standard deviation for every sigma; a bare sampled Gaussian is too
    # narrow below 0.5 (variance 0.0000 at 0.1) and truncated at 3 sigma
    kernel = blur_kernels(torch.tensor([sigma]), radius=int(np.ceil(3 * 2.5)))[0]
    taps = torch.arange(len(kernel)) - len(kernel) // 2
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (kernel * taps**2).sum().item() == pytest.approx(sigma**2, rel=2e-3)


def test_the_gpu_path_runs_without_opencv_and_the_per_sample_path_says_how_to_get_it():
    # a bare GPU image (docker/gpu_check.sh) may lack OpenCV: only the per-sample blur and hue use it
    code = textwrap.dedent("""
        import sys
        sys.modules["cv2"] = None  # import cv2 raises ImportError, as where it is not installed
        import numpy as np, torch
        from PIL import Image
        from trueface.augment import RandomGaussianBlur
        from trueface.augment_device import DeviceAugment, Uint8TrainTransform
        from trueface.config.schema import AugmentConfig
        cfg = AugmentConfig(strength=1.0, color_jitter_p=1.0, blur_p=1.0)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
        tf = Uint8TrainTransform(32, light_epochs=0, cfg=cfg)
        batch = torch.stack([tf(img) for _ in range(4)])
        out = DeviceAugment(cfg)(batch, torch.Generator().manual_seed(0))
        print("gpu path", tuple(out.shape))
        from torchvision.transforms import v2
        op = tf.strong.transforms[0]
        torch.manual_seed(0)
        crop = op(img)  # OpenCV's resize where it is installed: torchvision's here
        torch.manual_seed(0)
        reference = v2.RandomResizedCrop(32, scale=op.scale, ratio=op.ratio)(img)
        print("crop as torchvision's:", np.array_equal(np.asarray(crop), np.asarray(reference)))
        try:
            RandomGaussianBlur(1.0, 1.0)(img)
        except ImportError as e:
            print("per-sample:", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "gpu path (4, 3, 32, 32)" in run.stdout and "crop as torchvision's: True" in run.stdout
    assert "per-sample: " in run.stdout and "pip install opencv-python-headless" in run.stdout


@pytest.mark.parametrize("sigma", [0.2, 0.8, 2.0])
def test_blur_is_the_per_sample_blur_up_to_rounding(sigma):
    # one kernel for both paths: only the per-sample path's uint8 arithmetic tells them apart
    images = _images(n=4, size=24, lo=0, hi=255)
    per_sample = torch.stack([torch.from_numpy(np.array(
        RandomGaussianBlur(sigma, sigma)(Image.fromarray(img.permute(1, 2, 0).numpy())))).permute(2, 0, 1)
        for img in images]).float()
    batched = gaussian_blur(images.float(), torch.full((4,), sigma), radius=6)
    assert (per_sample - batched).abs().max().item() <= 0.75  # rounding, in OpenCV's fixed point too
    assert (batched - images.float()).abs().mean().item() > 2  # the blur did blur


def test_colour_jitter_is_torchvisions_functionals_in_the_drawn_order():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[0.7, 1.3, 0.6, 0.1], [1.2, 0.8, 1.4, -0.2]] * 3)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 1, 2, 0], [0, 2, 3, 1]])
    fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    out = colour_jitter(x, factors, order, active=(True, True, True, True))
    for i in range(len(x)):
        expected = x[i]
        for op in order[i].tolist():
            expected = fns[op](expected, factors[i, op].item())
        assert torch.allclose(out[i], expected, atol=1e-5), i
    # an inactive op is skipped, as ColorJitter skips a zero magnitude
    only_hue = colour_jitter(x, factors, order, active=(False, False, False, True))
    assert torch.allclose(only_hue[1], F.adjust_hue(x[1], -0.2), atol=1e-5)


# Ops that read tensor values back to the host: on a GPU each one waits for the device to catch
# up (nonzero sizes its output by its count).
HOST_READING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "equal", "unique_dim",
                    "_unique2", "_unique", "unique_consecutive", "_assert_async"}


class _OpLog(TorchDispatchMode):
    """Records every aten op's name, and every indexing op given a boolean mask (it calls nonzero inside)."""

    def __init__(self):
        super().__init__()
        self.names, self.masked_indexing = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.append(name)
        if name.startswith("index") and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                            for a in args for t in (a if isinstance(a, (list, tuple)) else [a])):
            self.masked_indexing.append(name)
        return func(*args, **(kwargs or {}))


def test_the_gpu_path_reads_the_device_once_a_batch(monkeypatch):
    # As on a GPU (the tensor JPEG; the CPU's libjpeg reads each image's quality by design), with
    # every op drawn for some samples and left out for others: draw and apply queue no op that reads
    # values back, and the masks come to the host in one HostMasks.read. Nor, once a first batch has
    # filled the per-device caches (JPEG tables, normalisation constants, the HSV table), does a
    # batch build a tensor from Python data (lift_fresh): on a GPU a copy from pageable memory.
    monkeypatch.setattr(augment_device, "jpeg_codec", lambda device: jpeg_tensor)
    reads = []
    real_read = augment_device.HostMasks.read.__func__
    monkeypatch.setattr(augment_device.HostMasks, "read",
                        classmethod(lambda cls, d: reads.append(1) or real_read(cls, d)))
    aug, g = DeviceAugment(load_config("demo").stage1.augment), torch.Generator().manual_seed(3)
    images = _images(n=64, size=32)
    aug(images, torch.Generator().manual_seed(0))
    reads.clear()
    with _OpLog() as log:
        d = aug.draw(len(images), 32, 32, g)
        out = aug.apply(images, d, g)
        aug(images, g, strong=False)  # a light epoch's batch
    for mask in (d.randaugment_on, d.jitter_on, d.gray_on, d.jpeg_on, d.blur_on, d.noise_on, d.erase_on):
        assert 0 < int(mask.sum()) < len(images)  # every masked path ran, on a part of the batch
    assert sorted(set(log.names) & HOST_READING_OPS) == [] and log.masked_indexing == []
    assert "lift_fresh" not in log.names
    assert "nonzero_static" in log.names and reads == [1]  # the strong batch's; a light one reads nothing
    assert torch.equal(out, _batched(load_config("demo").stage1.augment, images, seed=3)[0])  # as without the log


class _DeviceKernels(TorchDispatchMode):
    """Names the ops that compute on ``device`` tensors: everything but views and copies from the host."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.names = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        source = args[1] if name == "copy_" else args[0] if name == "_to_copy" else None  # copy_(self, src)
        from_host = source is not None and source.device.type == "cpu"
        if any(t.device == self.device for t in tensors) and not func.is_view and not from_host:
            self.names.append(name)
        return out


@pytest.mark.parametrize("constant", ["randaugment_batch._base_grid", "randaugment_batch._theta_table",
                                      "randaugment_batch._signed", "randaugment_batch._sharpness_kernel",
                                      "jpeg_tensor._base_tables", "jpeg_tensor.dct_kron",
                                      "augment_device._hue_channel_offsets", "augment_device._mean_std"])
def test_the_per_device_constants_are_copied_from_the_host_never_built_by_device_kernels(constant):
    # The augmentation runs a batch ahead on a side stream (trueface.augment_ahead), the step on
    # its own: a cached constant built by kernels on the device is whole only on the stream that
    # queued them, and the other may read it first. Copied from the host (a copy the host waits
    # for), it is whole on every stream. "meta" stands for the GPU: its tensors show where ops run.
    module, name = constant.split(".")
    build = getattr(importlib.import_module(f"trueface.{module}"), name)
    meta = torch.device("meta")
    args = {"_base_grid": (meta, 24, 40), "_theta_table": (BatchRandAugment(2, 9), meta, 24, 40),
            "_hue_channel_offsets": (meta, torch.float16), "_mean_std": (meta, torch.float16)}.get(name, (meta,))
    build.cache_clear()
    with _DeviceKernels(meta) as log:
        built = build(*args)
    assert log.names == []
    assert all(t.device == meta for t in torch.utils._pytree.tree_leaves(built))
    host = build(*(torch.device("cpu") if a is meta else a for a in args))
    assert [t.shape for t in torch.utils._pytree.tree_leaves(built)] == [t.shape for t in torch.utils._pytree.tree_leaves(host)]


def test_normalise_is_torchvisions_bit_for_bit():
    # the same arithmetic as v2.Normalize, with its constants kept on the device instead of built
    # from Python lists on every call
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment_device.normalise(x), normalize()(x))


def test_hue_is_torchvisions_adjust_hue_on_greys_ties_and_the_wraparound():
    # The hexcone formula against torchvision's RGB -> HSV -> RGB, image by image: greys (no
    # chroma, any hue), 0/1 colours (channels tie for the max: the tie decides the sector),
    # 8-bit levels, random colours; shifts of 0, +-half a turn and in between.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g)
    x[:8] = x[:8, :1]
    x[8:16] = torch.randint(0, 2, (8, 3, 16, 16), generator=g).float()
    x[16:24] = (x[16:24] * 255).round() / 255
    shift = torch.rand(64, generator=g) - 0.5
    shift[:4], shift[4:6], shift[6:8], shift[24:26] = 0.0, 0.5, -0.5, 0.0
    out = augment_device._hue(x, shift)
    expected = torch.stack([F.adjust_hue(image, s.item()) for image, s in zip(x, shift, strict=True)])
    assert (out - expected).abs().max().item() < 2e-6
    assert torch.equal(out[:8], x[:8])  # greys stay grey
    assert (out[26:] - x[26:]).abs().amax(dim=(1, 2, 3)).min().item() > 0.05  # a shift moves colours
    # in float16 (a CUDA run's type, Runtime.augment_dtype) too: greys stay grey (not 0/0; within
    # float16's smallest step, 6e-8), and the hue, worked out in sixths of a turn up to 6 (float16's
    # steps there: 1/256, at full chroma 0.5 of a level a rounding), within 2 levels (1.6 here)
    half = augment_device._hue(x.half(), shift.half())
    assert half.dtype == torch.float16 and (half[:8].float() - x[:8].half().float()).abs().max().item() <= 2**-24
    assert (half.float() - expected).abs().max().item() < 2 / 255


def test_colour_jitter_reads_the_order_itself_when_not_handed_it():
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([[0.7, 1.3, 0.6, 0.1]] * 8)
    order = torch.rand(8, 4, generator=torch.Generator().manual_seed(2)).argsort(dim=1)
    active = (True, True, True, True)
    assert torch.equal(colour_jitter(x, factors, order, active), colour_jitter(x, factors, order, active, order.numpy()))


def _uint8_batch(tf, pils, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    return torch.stack([tf(p) for p in pils])


def test_light_epochs_and_strength_zero_are_exactly_the_per_sample_light_path():
    rng = np.random.default_rng(3)
    pils = [Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)) for _ in range(12)]
    torch.manual_seed(7)
    random.seed(7)
    reference = torch.stack([light_transform(24)(p) for p in pils])
    g = torch.Generator().manual_seed(0)
    light_epoch = Uint8TrainTransform(24, light_epochs=2, cfg=AugmentConfig())  # epoch 0: light
    u8 = _uint8_batch(light_epoch, pils, 7)
    assert u8.dtype == torch.uint8 and u8.shape == (12, 3, 24, 24)
    assert torch.allclose(DeviceAugment(AugmentConfig())(u8, g, strong=False), reference, atol=1e-6, rtol=0)
    zero = AugmentConfig(strength=0.0)
    strong_zero = Uint8TrainTransform(24, light_epochs=0, cfg=zero)
    assert strong_zero.is_strong
    u8 = _uint8_batch(strong_zero, pils, 7)
    out = DeviceAugment(zero)(u8, g, strong=True)
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    assert torch.allclose(out, _light(u8), atol=1e-6, rtol=0)


def test_cpu_side_keeps_only_crop_and_flip_with_the_per_sample_parameters():
    cfg = AugmentConfig(crop_scale_min=0.5, strength=0.7)
    tf = Uint8TrainTransform(32, light_epochs=0, cfg=cfg)
    ops = tf.strong.transforms
    assert [type(op) for op in ops] == [RandomResizedCrop, v2.RandomHorizontalFlip, v2.PILToTensor]
    p = strong_params(cfg)
    assert tuple(ops[0].scale) == p.crop_scale and tuple(ops[0].ratio) == p.crop_ratio
    x = tf(Image.fromarray(np.zeros((50, 40, 3), np.uint8)))
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)


def test_output_type_shape_device_seed_and_mixup():
    images = _images(n=16)
    aug = DeviceAugment(AugmentConfig())
    a = aug(images, torch.Generator().manual_seed(5))
    assert a.dtype == torch.float32 and a.shape == images.shape and a.device == images.device
    assert torch.equal(a, aug(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(images, torch.Generator().manual_seed(6)))
    targets = soft_targets(torch.arange(16) % 2, 2, 0.1)
    mixed, mixed_targets, lam = mixup(a, targets, 0.4, np.random.default_rng(0))
    assert mixed.shape == a.shape and 0 < lam < 1 and not torch.equal(mixed, a)
    assert torch.allclose(mixed_targets.sum(dim=1), torch.ones(16))
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float(), torch.Generator())
    with pytest.raises(ValueError, match="generator is on cpu, the images on meta"):
        aug(images.to("meta"), torch.Generator())


def test_a_cuda_run_under_autocast_augments_in_float16_every_other_run_in_float32():
    policy = {(device, precision): Runtime(torch.device(device), precision, None).augment_dtype
              for device in ("cuda", "cpu") for precision in ("bf16", "fp16", "fp32")}
    assert policy == {("cuda", "bf16"): torch.float16, ("cuda", "fp16"): torch.float16,
                      ("cuda", "fp32"): torch.float32, ("cpu", "bf16"): torch.float32,
                      ("cpu", "fp16"): torch.float32, ("cpu", "fp32"): torch.float32}


@pytest.mark.parametrize("op", [*sorted(RATE_CASES), "all"])
def test_float16_gives_the_float32_pixels_for_the_same_draws(op):
    # The same seed draws the same ops and magnitudes in either type (the noise too), so float16
    # is held to float32's pixels: within a fraction of a grey level on average, as the model's
    # bf16 input rounds by up to half a level itself (the per-sample path rounds to whole levels
    # after every op). With every op on, JPEG may round a block's coefficient the other way
    # where its input moved by that fraction, so there the mean alone is held.
    cfg = AugmentConfig() if op == "all" else _only(**{RATE_CASES[op][0]: 0.8})
    images = _images(n=64, size=32, lo=0, hi=255)
    out32, out16 = (DeviceAugment(cfg, dtype=dtype)(images, torch.Generator().manual_seed(2))
                    for dtype in (torch.float32, torch.float16))
    assert out32.dtype == torch.float32 and out16.dtype == torch.float16 and out16.isfinite().all()
    levels = (denormalize(out32) - denormalize(out16.float())).abs() * 255
    assert levels.mean().item() < (0.3 if op == "all" else 0.06)
    if op != "all":
        assert levels.max().item() < 2.0


def test_augment_device_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [runs_on_device(s, cpu) for s in ("cpu", "auto")] == [False, False]
    assert [runs_on_device(s, cuda) for s in ("cpu", "gpu", "auto")] == [False, True, True]
    with pytest.raises(ValueError, match=r"stage1\.augment\.device: gpu needs training on CUDA"):
        runs_on_device("gpu", cpu, "stage1.augment.device")
    # auto by default: batched on a GPU run, per sample on a CPU one
    assert load_config(None).stage1.augment.device == load_config("paper").stage2.augment.device == "auto"
    assert load_config(None, ["stage2.augment.device=cpu"]).stage2.augment.device == "cpu"
    with pytest.raises(ConfigError, match=r"stage2\.augment\.device: must be one of"):
        load_config(None, ["stage2.augment.device=tpu"])
