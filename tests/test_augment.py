import random

import numpy as np
import pytest
import torch
from PIL import Image

from trueface.augment import TrainTransform, light_transform, mixup, soft_targets, strong_transform
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


def test_strength_scales_magnitudes():
    half = strong_transform(32, AugmentConfig(strength=0.5))
    crop = half.transforms[0]
    assert crop.scale[0] == pytest.approx(0.8)


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
