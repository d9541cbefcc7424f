"""The stage's one training loader (``TrainingData.epoch``, ``trueface.data.epoch_keys``): its
workers fork once per stage, every epoch still gets its own transform (light, then strong) and
its own draws, and an epoch's samples are the same however many workers read them and whether the
run got there by training or by resuming, while the training process's own generators are left
as they were."""

from __future__ import annotations

import os
import random

import pytest
import torch

from trueface.config import load_config
from trueface.data.epoch_keys import EpochKeyedSampler, EpochSeededDataset, sample_seed, seeded
from trueface.data.sampler import BalancedSampler
from trueface.precision import Runtime
from trueface.train import TrainingData

CPU = Runtime.create("cpu", "fp32")
IMAGES = 24
MICRO = 4


class EpochSwitch:
    """A transform's light/strong switch: light before ``light_epochs``."""

    def __init__(self, light_epochs: int) -> None:
        self.light_epochs, self.epoch = light_epochs, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def is_strong(self) -> bool:
        return self.epoch >= self.light_epochs


class DrawingDataset(torch.utils.data.Dataset):
    """Each sample: (its transform's strength, a draw from torch and one from ``random``, the
    reading process's pid), its label and its index."""

    def __init__(self, light_epochs: int = 1) -> None:
        self.transform = EpochSwitch(light_epochs)
        self.labels = [i % 2 for i in range(IMAGES)]
        self.domains = ["a" if i < IMAGES // 2 else "b" for i in range(IMAGES)]

    def __len__(self) -> int:
        return IMAGES

    def __getitem__(self, index: int):
        row = [float(self.transform.is_strong), torch.rand(()).item(), random.random(), float(os.getpid())]
        return torch.tensor(row, dtype=torch.float64), self.labels[index], index


def training_data(workers: int, light_epochs: int = 1) -> tuple[TrainingData, object]:
    cfg = load_config("demo", [f"data.loader_workers={workers}", "seed=5"])
    ds = DrawingDataset(light_epochs)
    sampler = BalancedSampler(ds.labels, ds.domains, "domain_class", None, 0, 1, cfg.seed)
    return TrainingData(ds, sampler, None), cfg


def read_epochs(data: TrainingData, cfg, epochs) -> dict[int, torch.Tensor]:
    """epoch -> (samples, 4 + 1) rows: what each sample drew, and its index."""
    out = {}
    for epoch in epochs:
        loader, _ = data.epoch(epoch, MICRO, cfg, CPU, rank=0)
        out[epoch] = torch.cat([torch.cat([x, i[:, None].double()], 1) for x, _, i in loader])
    return out


def draws(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, [0, 1, 2, 4]]  # all but the pid


def test_workers_fork_once_a_stage_and_every_epoch_draws_anew_with_its_own_transform():
    data, cfg = training_data(workers=2, light_epochs=2)
    try:
        seen = read_epochs(data, cfg, range(4))
        loader = data.loader
        assert data.epoch(4, MICRO, cfg, CPU, rank=0)[0] is loader  # one loader for the stage
    finally:
        data.close()
    pids = {int(p) for rows in seen.values() for p in rows[:, 3].tolist()}
    assert len(pids) == 2 and os.getpid() not in pids  # the same two worker processes all four epochs
    assert [rows[:, 0].unique().tolist() for rows in seen.values()] == [[0.0], [0.0], [1.0], [1.0]]  # light, strong
    for column in (1, 2):  # torch's draws and random's
        values = [rows[:, column] for rows in seen.values()]
        assert all(v.unique().numel() == IMAGES for v in values)  # each sample its own draw
        assert not any(torch.equal(a, b) for a in values for b in values if a is not b)  # each epoch anew
    assert data.loader is None
    for pid in pids:  # close() stopped them, though this test still holds the loader
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_an_epochs_samples_are_the_same_for_any_number_of_workers_and_when_resumed():
    runs = {}
    for workers in (0, 1, 2):
        data, cfg = training_data(workers)
        try:
            runs[workers] = read_epochs(data, cfg, range(3))
        finally:
            data.close()
    resumed, cfg = training_data(workers=2)  # a run resumed at epoch 2: a fresh loader, forked then
    try:
        runs["resumed"] = read_epochs(resumed, cfg, [2])
    finally:
        resumed.close()
    for epoch in range(3):
        assert torch.equal(draws(runs[0][epoch]), draws(runs[1][epoch]))
        assert torch.equal(draws(runs[0][epoch]), draws(runs[2][epoch]))
    assert torch.equal(draws(runs["resumed"][2]), draws(runs[0][2]))


def test_the_draws_are_the_samples_seed_and_the_trainers_generators_are_left_alone():
    ds = DrawingDataset()
    keyed = EpochSeededDataset(ds, seed=5, rank=1)
    torch.manual_seed(123)
    random.seed(123)
    expected_torch, expected_random = torch.rand(()).item(), random.random()
    torch.manual_seed(123)
    random.seed(123)
    row, _, index = keyed[(3, 7, 0)]  # read in the training process, as with loader_workers=0
    assert index == 7 and (torch.rand(()).item(), random.random()) == (expected_torch, expected_random)
    torch.manual_seed(sample_seed(5, 1, 3, 7))
    random.seed(sample_seed(5, 1, 3, 7))
    assert row[1:3].tolist() == [torch.rand(()).item(), random.random()]
    assert keyed[(3, 7, 0)][0][1] != EpochSeededDataset(ds, seed=5, rank=0)[(3, 7, 0)][0][1]  # ranks draw apart
    assert keyed[(3, 7, 0)][0][1] != keyed[(4, 7, 0)][0][1] and keyed[(3, 7, 0)][0][1] != keyed[(3, 8, 0)][0][1]
    # an image's second and third draw in the epoch: draws of their own, each reproducible
    repeats = [keyed[(3, 7, k)][0][1].item() for k in range(3)]
    assert len(set(repeats)) == 3 and keyed[(3, 7, 2)][0][1].item() == repeats[2]


def test_an_error_inside_the_seeded_block_still_puts_the_generators_back():
    torch.manual_seed(1)
    random.seed(1)
    before = torch.get_rng_state(), random.getstate()
    with pytest.raises(OSError):
        with seeded(99):
            raise OSError("unreadable")
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_the_keyed_sampler_reads_the_epoch_when_its_iteration_starts():
    sampler = BalancedSampler([0, 1] * 4, ["a"] * 8, "class", None, 0, 1, 0)
    keyed = EpochKeyedSampler(sampler)
    sampler.set_epoch(3)
    keys = iter(keyed)
    sampler.set_epoch(4)  # an epoch set later does not reach an iteration already started
    assert [k for k in keys] == [(3, i, 0) for i in sampler.epoch_indices(3).tolist()]
    assert len(keyed) == len(sampler) == 8


def test_an_image_drawn_several_times_in_an_epoch_gets_a_key_for_each_draw():
    # 2 reals against 6 fakes, balanced by class: each real is drawn about 3 times an epoch
    sampler = BalancedSampler([0, 0] + [1] * 6, ["a"] * 8, "class", None, 0, 1, 0)
    sampler.set_epoch(1)
    keys = list(EpochKeyedSampler(sampler))
    indices = sampler.epoch_indices(1).tolist()
    assert [index for _, index, _ in keys] == indices and {epoch for epoch, _, _ in keys} == {1}
    for index in set(indices):
        assert [k for _, i, k in keys if i == index] == list(range(indices.count(index)))
    assert max(indices.count(0), indices.count(1)) >= 2  # the case this is for: a repeated image
