import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trueface import augment
from trueface.augment import (
    AddGaussianNoise,
    ColorJitter,
    RandomGaussianBlur,
    RandomJPEG,
    TrainTransform,
    light_transform,
    mixup,
    soft_targets,
    strong_params,
    strong_transform,
)
from trueface.config.schema import AugmentConfig


def _image(seed=0, size=48):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def _run(tf, img, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    return tf(img)


def test_light_for_warmup_epochs_then_strong():
    tf = TrainTransform(32, light_epochs=2, cfg=AugmentConfig())
    img = _image()
    tf.set_epoch(1)
    assert not tf.is_strong
    assert torch.equal(_run(tf, img, 0), _run(light_transform(32), img, 0))
    tf.set_epoch(2)
    assert tf.is_strong
    outs = [_run(tf, img, s) for s in range(4)]
    lights = [_run(light_transform(32), img, s) for s in range(4)]
    assert any(not torch.equal(o, l) for o, l in zip(outs, lights))


def test_strength_zero_is_light_only():
    cfg = AugmentConfig(strength=0.0)
    img = _image(1)
    for seed in range(5):
        assert torch.equal(_run(strong_transform(32, cfg), img, seed), _run(light_transform(32), img, seed))


def test_each_op_has_its_own_probability():
    # blur alone at p=0: a strong pipeline with everything else off leaves sharp images sharp
    off = AugmentConfig(randaugment_p=0, color_jitter_p=0, grayscale_p=0, jpeg_p=0, blur_p=0, noise_p=0,
                        erasing_p=0, crop_scale_min=1.0)
    img = _image(2)
    base = [_run(light_transform(32), img, s) for s in range(6)]
    outs = [_run(strong_transform(32, off), img, s) for s in range(6)]
    # with every op off only crop/flip remain: each output is the light output or its mirror
    for o, b in zip(outs, base):
        assert torch.allclose(o, b, atol=1e-5) or torch.allclose(o, b.flip(-1), atol=1e-5)
    blur_on = AugmentConfig(**{**off.__dict__, "blur_p": 1.0})
    blurred = _run(strong_transform(32, blur_on), img, 0)
    assert blurred.diff(dim=-1).abs().mean() < base[0].diff(dim=-1).abs().mean()


# Every knob differs from the defaults and from the others, so a knob that is swapped with
# another, or not scaled, or not passed to its op, changes some assertion below.
DISTINCT = AugmentConfig(
    crop_scale_min=0.5, randaugment_p=0.9, randaugment_ops=3, randaugment_magnitude=10,
    color_jitter_p=0.7, color_jitter=(0.4, 0.3, 0.2, 0.1), grayscale_p=0.2, jpeg_p=0.6,
    jpeg_quality_min=40, jpeg_quality_max=90, blur_p=0.8, blur_kernel=3, blur_sigma_max=2.5,
    noise_p=0.3, noise_std=0.04, erasing_p=0.45, erasing_scale_max=0.3,
)


def _expected(cfg, s):
    """The promise, written out independently of trueface.augment: probabilities and magnitudes
    times s; ranges with an identity end move from it (crop 1, ratio 1, JPEG q_max, sigma 0.1)."""
    return dict(
        crop_scale=(1 - (1 - cfg.crop_scale_min) * s, 1.0),
        crop_ratio=(1 - 0.25 * s, 1 + s / 3),
        randaugment_p=cfg.randaugment_p * s,
        randaugment_ops=cfg.randaugment_ops,  # a count, deliberately not scaled
        randaugment_magnitude=round(cfg.randaugment_magnitude * s),
        color_jitter_p=cfg.color_jitter_p * s,
        color_jitter=tuple(v * s for v in cfg.color_jitter),
        grayscale_p=cfg.grayscale_p * s,
        jpeg_p=cfg.jpeg_p * s,
        jpeg_quality=(round(cfg.jpeg_quality_max - (cfg.jpeg_quality_max - cfg.jpeg_quality_min) * s), cfg.jpeg_quality_max),
        blur_p=cfg.blur_p * s,
        blur_sigma=(0.1, 0.1 + (cfg.blur_sigma_max - 0.1) * s),
        noise_p=cfg.noise_p * s,
        noise_std=cfg.noise_std * s,
        erasing_p=cfg.erasing_p * s,
        erasing_scale=(0.02, max(0.02, cfg.erasing_scale_max * s)),
    )


def _built(tf):
    """The effective parameters read back from the ops of a built strong pipeline."""
    ops = tf.transforms
    assert [type(op) for op in ops] == [
        augment.RandomResizedCrop, v2.RandomHorizontalFlip, v2.RandomApply, v2.RandomApply, v2.RandomGrayscale,
        v2.RandomApply, v2.RandomApply, augment.ToFloatImage, v2.RandomApply, v2.Normalize, v2.RandomErasing,
    ]
    crop, _, ra, cj, gray, jpeg, blur, _, noise, _, erase = ops
    inner = [type(a.transforms[0]) for a in (ra, cj, jpeg, blur, noise)]
    assert inner == [v2.RandAugment, ColorJitter, RandomJPEG, RandomGaussianBlur, AddGaussianNoise]
    jitter = cj.transforms[0]
    return dict(
        crop_scale=tuple(crop.scale),
        crop_ratio=tuple(crop.ratio),
        randaugment_p=ra.p,
        randaugment_ops=ra.transforms[0].num_ops,
        randaugment_magnitude=ra.transforms[0].magnitude,
        color_jitter_p=cj.p,
        # ColorJitter stores factor ranges: (1 - b, 1 + b) for b, c, s and (-h, h) for hue
        color_jitter=(jitter.brightness[1] - 1, jitter.contrast[1] - 1, jitter.saturation[1] - 1, jitter.hue[1]),
        grayscale_p=gray.p,
        jpeg_p=jpeg.p,
        jpeg_quality=(jpeg.transforms[0].q_min, jpeg.transforms[0].q_max),
        blur_p=blur.p,
        blur_sigma=(blur.transforms[0].sigma_min, blur.transforms[0].sigma_max),
        noise_p=noise.p,
        noise_std=noise.transforms[0].std,
        erasing_p=erase.p,
        erasing_scale=tuple(erase.scale),
    )


def _approx(params):
    return {k: pytest.approx(v, abs=1e-9) for k, v in params.items()}


@pytest.mark.parametrize("s", [0.3, 0.5, 1.0])
def test_strength_scales_every_probability_and_magnitude(s):
    cfg = AugmentConfig(**{**DISTINCT.__dict__, "strength": s})
    expected = _expected(cfg, s)
    assert asdict(strong_params(cfg)) == _approx(expected)
    # the wiring: each built op received its parameter
    assert _built(strong_transform(32, cfg)) == _approx(expected)


def test_strength_half_moves_every_knob_off_its_full_value():
    # guards the test itself: at 0.5 no knob but the op count may equal its full-strength value,
    # so one that ignored strength could not pass the equality above
    half, full = _expected(DISTINCT, 0.5), _expected(DISTINCT, 1.0)
    assert [k for k in half if half[k] == full[k]] == ["randaugment_ops"]


def test_strength_zero_is_exactly_the_light_pipeline():
    assert repr(strong_transform(32, AugmentConfig(**{**DISTINCT.__dict__, "strength": 0.0}))) == repr(light_transform(32))


def test_blur_honours_sigma_max_above_kernel_half(monkeypatch):
    # Stage I: kernel 3, sigma_max 2.0; a cap at kernel / 2 made every sigma <= 1.5
    cfg = AugmentConfig(randaugment_p=0, color_jitter_p=0, grayscale_p=0, jpeg_p=0, blur_p=1.0, noise_p=0, erasing_p=0)
    assert cfg.blur_sigma_max > cfg.blur_kernel / 2
    sigmas = []
    real_kernels = augment.blur_kernels

    def recording_kernels(sigma, radius):
        sigmas.append(sigma.item())
        return real_kernels(sigma, radius)

    monkeypatch.setattr(augment, "blur_kernels", recording_kernels)
    tf = strong_transform(16, cfg)
    img = _image(3, size=16)
    for seed in range(200):
        _run(tf, img, seed)
    assert len(sigmas) == 200  # blur p 1: every sample blurred
    assert 0.1 <= min(sigmas) and max(sigmas) <= cfg.blur_sigma_max
    assert max(sigmas) > cfg.blur_kernel / 2 and max(sigmas) > 0.95 * cfg.blur_sigma_max


@pytest.mark.parametrize("sigma", [0.5, 2.0, 3.0])
def test_blur_spreads_a_line_by_the_drawn_sigma(sigma):
    # sigma is the standard deviation and nothing truncates it: a one-pixel line comes out with a
    # profile of that standard deviation (kernel 3 would have clipped it near 1.5; a bare sampled
    # Gaussian would leave 0.5 near 0.4)
    line = np.zeros((8, 64), np.uint8)
    line[:, 32] = 255
    out = np.asarray(RandomGaussianBlur(sigma, sigma)(Image.fromarray(line)), dtype=float)[4]
    w = out / out.sum()
    x = np.arange(64)
    std = np.sqrt((w * (x - (w * x).sum()) ** 2).sum())
    assert std == pytest.approx(sigma, rel=0.03)


def _faces(n=6, size=64):
    """Smooth colourful images (hue matters on them; random noise would be all edges)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        r, g, b = (np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + 2 * i))
        out.append(Image.fromarray((np.stack([r, g, b], -1) * 110 + 128).astype(np.uint8)))
    return out


@pytest.mark.parametrize("factor", [-0.4, -0.1, -0.05, 0.05, 0.3])
def test_hue_is_torchvisions_shift_up_to_the_hsv_rounding(factor):
    # the OpenCV shift turns hue as far as torchvision's PIL one: pixels agree but for the two 8-bit
    # HSV round trips' rounding (about 1 level on these saturated images, 0.3 on faces; either
    # round trip alone moves pixels by up to 7), far below what the shift itself moves
    for img in _faces():
        ours = np.asarray(augment.adjust_hue(img, factor), dtype=float)
        theirs = np.asarray(F.adjust_hue(img, factor), dtype=float)
        moved = np.abs(theirs - np.asarray(img, dtype=float)).mean()
        assert np.abs(ours - theirs).mean() < 1.5
        assert np.abs(ours - theirs).max() <= 12
        assert moved > 5 * np.abs(ours - theirs).mean()


def test_colour_jitter_uses_the_fast_hue_on_pil_only_and_torchvisions_draws():
    img, jitter = _faces(1)[0], ColorJitter(hue=(0.2, 0.2))
    assert np.array_equal(np.asarray(jitter(img)), np.asarray(augment.adjust_hue(img, 0.2)))
    tensor = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert torch.equal(jitter(tensor), F.adjust_hue(tensor, 0.2))
    # the same factors and order as v2.ColorJitter from the same seed: only the hue kernel differs
    ours, theirs = ColorJitter(0.4, 0.4, 0.4, 0.0), v2.ColorJitter(0.4, 0.4, 0.4, 0.0)
    for seed in range(5):
        assert np.array_equal(np.asarray(_run(ours, img, seed)), np.asarray(_run(theirs, img, seed)))


def test_mixup_targets_are_the_same_mix_as_the_images():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).clone()
    y = soft_targets(torch.tensor([0, 1, 1, 0]), 2, 0.1)
    assert torch.allclose(y[0], torch.tensor([0.95, 0.05]))
    mx, my, lam = mixup(x, y, 0.2, np.random.default_rng(0))
    assert 0 <= lam <= 1
    assert torch.allclose(my.sum(1), torch.ones(4))
    # recover the partner of each sample from the image values and check the target mix
    partner = ((mx[:, 0, 0, 0] - lam * x[:, 0, 0, 0]) / (1 - lam)).round().long()
    assert torch.allclose(my, lam * y + (1 - lam) * y[partner], atol=1e-5)
    same, ysame, lam1 = mixup(x, y, 0.0, np.random.default_rng(0))
    assert lam1 == 1.0 and torch.equal(same, x) and torch.equal(ysame, y)


@pytest.mark.parametrize("n", [2, 3, 12])
def test_mixup_pairs_every_image_with_another(n):
    """A micro-batch of 3 (Stage II's 12 on 4 workers) left a third of its images unmixed when an
    image could draw itself; each image is now mixed, and every image is some image's partner."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = soft_targets(torch.arange(n) % 2, 2, 0.0)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        mx, _, lam = mixup(x, y, 100.0, rng)  # lambda near 0.5: the partner reads back exactly
        partner = ((mx[:, 0, 0, 0] - lam * x[:, 0, 0, 0]) / (1 - lam)).round().long()
        assert (partner != torch.arange(n)).all() and sorted(partner.tolist()) == list(range(n))
        seen.add(tuple(partner.tolist()))
    assert len(seen) == (1 if n == 2 else 2 if n == 3 else 200)  # every cycle through the batch is drawn


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_to_float_image_is_torchvisions_conversion_bit_for_bit_and_contiguous(mode):
    img = _image(4, size=20).convert(mode)
    reference = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])(img)
    out = augment.ToFloatImage()(img)
    assert out.shape == reference.shape and torch.equal(out, reference)
    assert out.is_contiguous() and type(out) is torch.Tensor
    as_tensor = torch.from_numpy(np.array(_image(4, size=20))).permute(2, 0, 1)
    assert torch.equal(augment.ToFloatImage()(as_tensor), v2.ToDtype(torch.float32, scale=True)(as_tensor))
    with pytest.raises(TypeError, match="uint8"):
        augment.ToFloatImage()(as_tensor.float())


def test_gaussian_noise_is_normal_with_the_configured_std_fresh_each_call_and_seeded():
    from scipy.stats import kstest

    x = torch.full((3, 64, 64), 0.5)
    noise = AddGaussianNoise(0.03)
    torch.manual_seed(0)
    first, second = noise(x) - x, noise(x) - x
    assert first.mean().abs() < 0.03 * 4 / 110  # 4 standard errors over 12,288 values
    assert first.std().item() == pytest.approx(0.03, rel=0.03)
    assert kstest((first / 0.03).flatten().numpy(), "norm").pvalue > 1e-3
    assert not torch.equal(first, second)  # a new draw per image
    assert abs(np.corrcoef(first.flatten(), second.flatten())[0, 1]) < 0.05
    torch.manual_seed(0)
    assert torch.equal(noise(x) - x, first)  # torch's seed fixes it (DataLoader workers seed torch)
    # clamped to [0, 1] where the noise would leave it
    edge = noise(torch.ones(3, 8, 8))
    assert edge.max() == 1.0 and edge.min() < 1.0


def test_noise_table_is_unit_normal_quantiles():
    table = AddGaussianNoise.table
    assert table.dtype == np.float32 and len(table) == 2**16
    assert float(table.std()) == pytest.approx(1.0, abs=1e-6) and abs(float(table.mean())) < 1e-6
    assert np.all(np.diff(table) > 0) and 4.2 < table.max() < 4.4  # sorted; truncated at about 4.3 sigma


def _faces_or_smooth(count: int) -> list[Image.Image]:
    """Real faces where faces140k-mini is at hand (256 px JPEGs), else ``_faces``' smooth 256 px images."""
    from tests.conftest import MINI_140K

    files = sorted(MINI_140K.glob("train/*/*.jpg"))[:count] if MINI_140K.is_dir() else []
    return [Image.open(f).convert("RGB") for f in files] if files else _faces(count, size=256)


def test_the_crop_draws_as_torchvisions_and_resizes_in_opencv_within_its_antialiasing():
    images = _faces_or_smooth(24)
    ours = augment.RandomResizedCrop(224, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
    theirs = v2.RandomResizedCrop(224, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
    torch.manual_seed(3)
    fast = [np.asarray(ours(im), dtype=np.int16) for im in images]
    torch.manual_seed(3)
    reference = [np.asarray(theirs(im), dtype=np.int16) for im in images]
    diff = np.stack([np.abs(a - b) for a, b in zip(fast, reference)])
    assert all(a.shape == (224, 224, 3) for a in fast)
    # Stage I's crops (198-256 px to 224) take OpenCV's bilinear resize: the same crops (a shifted
    # window would differ by tens of levels everywhere), without torchvision's slight antialiasing
    assert 0 < diff.mean() < 1.0 and np.percentile(diff, 99) <= 6 and diff.max() <= 40
    # shrunk more than LINEAR_CROP_MAX_SCALE: torchvision's own pixels, antialiasing and all
    small = augment.RandomResizedCrop(64, scale=(0.6, 1.0), antialias=True)
    torch.manual_seed(4)
    a = np.asarray(small(images[0]))
    torch.manual_seed(4)
    assert np.array_equal(a, np.asarray(v2.RandomResizedCrop(64, scale=(0.6, 1.0), antialias=True)(images[0])))
