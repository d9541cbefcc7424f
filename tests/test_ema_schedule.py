import math

import pytest
import torch
from torch import nn

from trueface.ema import ModelEma, ema_decay_at
from trueface.schedule import lr_at


def test_ema_decay_warms_up():
    assert ema_decay_at(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999, True) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.9999, True) == 0.9999
    assert ema_decay_at(0, 0.9999, False) == 0.9999


def test_ema_averages_parameters_and_float_buffers_and_copies_int_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    assert ema.update(model, step=1) == 0.5
    after = ema.state_dict()
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(after[k], 0.5 * before[k] + 0.5 * v), k
    assert torch.allclose(after["1.running_mean"], torch.full((2,), 2.0))
    assert after["1.num_batches_tracked"].item() == 7
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_update_is_two_ops_however_many_layers():
    # one foreach op for the floats and one for the integer buffers: on a GPU each op is a kernel
    # launch on the training loop's thread, and a ResNet-50 has 53 BatchNorm layers
    from tests.test_augment_device import _OpLog

    for layers in (1, 6):
        model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(2, 2), nn.BatchNorm1d(2))])
        ema = ModelEma(model, decay=0.5, warmup=False)
        ema.update(model, step=1)  # lists the tensor pairs once
        with torch.no_grad():
            model[1].num_batches_tracked.fill_(3)
        with _OpLog() as ops:
            ema.update(model, step=2)
        assert sorted(ops.names) == ["_foreach_copy_", "_foreach_lerp_"], layers
        assert ema.module[1].num_batches_tracked.item() == 3


def test_lr_warmup_then_cosine():
    total, warm, base, final = 100, 10, 1.0, 0.01
    lrs = [lr_at(s, total, warm, base, final) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(final)
    assert lr_at(0, 10, 0, 1.0, 0.0) == pytest.approx(1.0)
