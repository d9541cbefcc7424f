"""Training samples read by (epoch, index) keys, so that one DataLoader serves a whole stage.

Usage (``trueface.train.TrainingData``)::

    loader = DataLoader(EpochSeededDataset(dataset, seed, rank), sampler=EpochKeyedSampler(sampler),
                        num_workers=4, persistent_workers=True, ...)
    for epoch in ...:
        sampler.set_epoch(epoch)          # the wrapped sampler: its epoch goes into every key
        for images, labels, indices in loader: ...

Why: a DataLoader made afresh each epoch forks its workers from the training process each epoch,
and after a fork the kernel copies every page the trainer writes next (weights, gradients,
optimizer state, EMA) on its first write. On a 2-core CPU the first ResNet-50 step after a fork
took 1.65 s instead of 0.21 s, once per epoch (the demo's epochs are ten steps). Persistent
workers fork once per stage. Their random generators would then run on from one epoch into the
next, so a run resumed at epoch k would draw differently from one that got there: instead each
sample's draws are seeded from (seed, rank, epoch, index, occurrence). That also makes them
independent of how many workers there are and of which worker gets which batch. The occurrence
counts an image's draws within the rank's epoch (0, 1, ...): domain balancing draws a small
cell's images several times an epoch, and each repeat must get crops and flips of its own, or the
oversampling would add copies and no variety.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

_SALT = 0x5EED  # keeps these seeds apart from the main process's (seed, rank, epoch) ones
_MASK = (1 << 64) - 1


class EpochTransform(Protocol):
    def set_epoch(self, epoch: int) -> None: ...


class EpochSampler(Protocol):
    epoch: int

    def __iter__(self) -> Iterator[int]: ...

    def __len__(self) -> int: ...


def sample_seed(seed: int, rank: int, epoch: int, index: int, occurrence: int = 0) -> int:
    """A 64-bit seed mixed from the parts (splitmix64's finaliser after each): the same on every
    machine and Python version, and 2 us where numpy's SeedSequence takes 9 (once per image). An
    image's first draw of an epoch mixes four parts, as before occurrences were counted, so runs
    without repeats draw as they did."""
    h = _SALT
    for part in (seed, rank, epoch, index, occurrence)[:5 if occurrence else 4]:
        h = (h ^ (part & _MASK)) + 0x9E3779B97F4A7C15 & _MASK
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's CPU generator and Python's ``random`` (the two the per-sample transforms draw from)
    seeded for the block. In the training process (``loader_workers=0``) they are put back after
    it, since its own draws must not depend on how many samples it read; a loader worker draws
    nothing else, so it skips the 15 us that costs."""
    if get_worker_info() is not None:
        _seed(seed)
        yield
        return
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        _seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _seed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that reseeds CUDA too
    random.seed(seed)


class EpochKeyedSampler(Sampler):
    """``sampler``'s indices as (epoch, index, occurrence) keys, the epoch read from
    ``sampler.epoch`` when an epoch's iteration starts (in the training process, where
    ``set_epoch`` is called); occurrence: how often the index came before in this epoch."""

    def __init__(self, sampler: EpochSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return _keys(self.sampler.epoch, iter(self.sampler))

    def __len__(self) -> int:
        return len(self.sampler)


def _keys(epoch: int, indices: Iterator[int]) -> Iterator[tuple[int, int, int]]:
    drawn: dict[int, int] = {}
    for index in indices:
        occurrence = drawn.get(index, 0)
        drawn[index] = occurrence + 1
        yield epoch, index, occurrence


class EpochSeededDataset(Dataset):
    """``dataset[index]`` for a key (epoch, index, occurrence), with the epoch's transform (light
    or strong) and the sample's draws seeded from (seed, rank, epoch, index, occurrence)."""

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, index, occurrence = key
        transform: EpochTransform = self.dataset.transform
        transform.set_epoch(epoch)  # this process's copy: a worker's, or the trainer's with no workers
        with seeded(sample_seed(self.seed, self.rank, epoch, index, occurrence)):
            return self.dataset[index]
