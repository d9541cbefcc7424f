"""RandAugment batched on the device (trueface.randaugment_batch) against torchvision's v2.RandAugment:
the same ops bit for bit, the same draws, and DeviceAugment running each sample's ops in order."""

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from trueface.augment import IMAGENET_MEAN, IMAGENET_STD, strong_params
from trueface.augment_device import DeviceAugment, HostMasks
from trueface.config.schema import AugmentConfig
from trueface.randaugment_batch import GEOMETRIC_CODES, OFF, OPS, BatchRandAugment, code_of

ALL_CODES = range(2 * len(OPS))


def _torchvision(image: torch.Tensor, code: int, ra: BatchRandAugment) -> torch.Tensor:
    """What v2.RandAugment does to one uint8 image once it has drawn ``code``'s op and sign
    (its forward's steps: the op's magnitude table at the image size, negated for a signed op)."""
    tv = v2.RandAugment(ra.num_ops, ra.magnitude)
    name = OPS[code // 2]
    table, signed = tv._AUGMENTATION_SPACE[name]
    values = table(tv.num_magnitude_bins, *image.shape[-2:])
    magnitude = 0.0 if values is None else float(values[tv.magnitude]) * (-1 if signed and code % 2 else 1)
    return tv._apply_image_or_video_transform(image, name, magnitude, interpolation=tv.interpolation, fill=tv._fill)


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    # values in [40, 200]: autocontrast and equalize have a range to stretch
    images = torch.randint(40, 201, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    images[0] = 77  # one flat image: autocontrast and equalize leave it alone
    images[1, 0] = 12  # one flat channel
    return images


@pytest.mark.parametrize("magnitude", [0, 9, 30])
def test_every_op_and_sign_is_torchvisions_bit_for_bit(magnitude):
    # 24 x 40: a height/width mix-up in the translations, the grid or the shears' centre shows
    ra, images = BatchRandAugment(2, magnitude), _images(5, 24, 40)
    for code in ALL_CODES:
        expected = torch.stack([_torchvision(im, code, ra) for im in images])
        if code in GEOMETRIC_CODES:
            out = ra.geometric(images, torch.full((len(images),), code))
        else:
            out = ra.colour(images, code)
        assert torch.equal(out, expected), (OPS[code // 2], code % 2)
        if magnitude == 30 and OPS[code // 2] != "Identity":  # every other op moves pixels at 30
            assert not torch.equal(out, images), OPS[code // 2]


def test_the_geometric_ops_take_each_samples_own_matrix():
    ra, images = BatchRandAugment(2, 9), _images(10, 20, 28, seed=1)
    codes = torch.tensor(list(GEOMETRIC_CODES))  # all ten in one batch
    out = ra.geometric(images, codes)
    for i, code in enumerate(codes.tolist()):
        assert torch.equal(out[i], _torchvision(images[i], code, ra)), code


@pytest.mark.parametrize("height, width", [(97, 131), (1024, 1024)])
def test_the_geometric_ops_match_at_odd_and_stage_two_sizes(height, width):
    # the grid's rounding at 1024 px is where an elementwise sum had already parted from torchvision's
    ra, images = BatchRandAugment(2, 17), _images(3, height, width, seed=3)[2:]  # a random one
    for code in GEOMETRIC_CODES:
        assert torch.equal(ra.geometric(images, torch.tensor([code])), _torchvision(images[0], code, ra)[None]), code


def test_draws_are_randaugments_draws():
    n, p, ra = 6000, 0.6, BatchRandAugment(3, 9)
    codes = ra.draw(n, p, torch.Generator().manual_seed(0))
    assert codes.shape == (n, 3) and codes.dtype == torch.int64
    on = codes[:, 0] != OFF
    assert torch.equal((codes != OFF).all(dim=1), on) and not (codes[~on] != OFF).any()  # all slots or none
    assert abs(on.float().mean().item() - p) <= 4 * np.sqrt(p * (1 - p) / n)
    drawn = codes[on].flatten()
    op, negated = drawn // 2, drawn % 2 == 1
    share = 1 / len(OPS)
    for i, name in enumerate(OPS):  # each op equally likely, in every slot alike
        of_op = op == i
        assert abs(of_op.float().mean().item() - share) <= 4 * np.sqrt(share * (1 - share) / len(drawn)), name
        signed = v2.RandAugment._AUGMENTATION_SPACE[name][1]
        rate = negated[of_op].float().mean().item()
        if signed:
            assert abs(rate - 0.5) <= 4 * np.sqrt(0.25 / int(of_op.sum())), name
        else:
            assert rate == 0, name
    assert torch.equal(ra.draw(50, p, torch.Generator().manual_seed(4)), ra.draw(50, p, torch.Generator().manual_seed(4)))


def test_device_augment_runs_each_samples_ops_in_the_drawn_order():
    # RandAugment alone on: the batch's output is each image through torchvision's ops in its own
    # drawn order, then the light path's float conversion and normalisation
    cfg = AugmentConfig(strength=1.0, randaugment_p=0.8, randaugment_ops=2, randaugment_magnitude=9, color_jitter_p=0,
                        grayscale_p=0, jpeg_p=0, blur_p=0, noise_p=0, erasing_p=0)
    aug, g = DeviceAugment(cfg), torch.Generator().manual_seed(3)
    images = _images(300, 24, 32, seed=2)
    before = images.clone()
    d = aug.draw(len(images), 24, 32, g)
    out = aug.apply(images, d, g)
    assert torch.equal(images, before)  # the caller's batch is not written to
    codes = d.randaugment_code
    assert set(codes[:, 0].tolist()) == {OFF, *ALL_CODES} - {code_of(name, True) for name in OPS
                                                              if not v2.RandAugment._AUGMENTATION_SPACE[name][1]}
    ra = BatchRandAugment(2, strong_params(cfg).randaugment_magnitude)
    expected = images.clone()
    for i in range(len(images)):
        for code in codes[i].tolist():
            if code != OFF:
                expected[i] = _torchvision(expected[i], code, ra)
    float_expected = aug.to_float(expected)
    assert torch.allclose(out, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(float_expected), atol=1e-6, rtol=0)
    assert np.array_equal(HostMasks.read(d).randaugment_codes, codes.numpy())


def test_randaugment_off_or_zero_ops_leaves_the_batch_alone():
    images = _images(8, 16, 16)
    for cfg in (AugmentConfig(randaugment_p=0.0), AugmentConfig(randaugment_ops=0)):
        aug = DeviceAugment(cfg)
        d = aug.draw(len(images), 16, 16, torch.Generator().manual_seed(0))
        assert not d.randaugment_on.any()
        assert aug._randaugment(images, d.randaugment_code, HostMasks.read(d).randaugment_codes) is images
