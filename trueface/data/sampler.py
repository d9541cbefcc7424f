"""Epoch samplers that balance domains and classes and shard the epoch across workers.

Usage::

    sampler = BalancedSampler(labels, domains, mode="domain_class", rank=r, world_size=w, seed=0)
    sampler.set_epoch(epoch); loader = DataLoader(ds, sampler=sampler, ...)
    print(sampler.plan().describe())   # draws and effective repetitions per (domain, class)

The original drew its tiny DALL-E split a third of the time with replacement and ignored the
classes inside a domain (flaw 3). Here every (domain, class) cell gets the same share of the
epoch, drawn WITHOUT replacement from an endless stream of fresh permutations of the cell: a
small cell is repeated about evenly, a large cell is sub-sampled, and the next epoch continues
where this one stopped, so over epochs every image is seen as often as any other. Within one
epoch an image is drawn m, m+1 or m+2 times, m the number of whole permutations inside the
epoch's slice of the stream: the slice may also end one permutation and begin the next, each
holding the image once. With k = draws // cell size, m is k or k - 1; epoch 0 starts at a
permutation's start, so there each image is drawn k or k+1 times. A sub-sampled cell can thus
draw an image twice in a later epoch.

The epoch's index list is a pure function of (seed, epoch), identical on every rank; rank r takes
positions r, r + W, r + 2W, ... so the ranks' shards are disjoint and cover the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

MODES = ("none", "class", "domain_class")


@dataclass(frozen=True)
class CellPlan:
    domain: str
    label: int
    size: int
    draws: int

    @property
    def repetitions(self) -> float:
        """How many times each image of the cell is seen per epoch on average."""
        return self.draws / self.size


@dataclass(frozen=True)
class EpochPlan:
    mode: str
    samples_per_epoch: int
    cells: tuple[CellPlan, ...]

    def describe(self) -> str:
        lines = [f"sampling: {self.mode}, {self.samples_per_epoch} samples per epoch"]
        for c in self.cells:
            label = {-1: "all", 0: "real", 1: "fake"}[c.label]
            name = f"{c.domain}/{label}" if c.domain else label
            lines.append(
                f"  {name:<32} {c.size:>7} images  {c.draws:>7} draws/epoch  x{c.repetitions:.2f}"
            )
        return "\n".join(lines)


class BalancedSampler(Sampler[int]):
    def __init__(
        self,
        labels: Sequence[int],
        domains: Sequence[str],
        mode: str = "domain_class",
        samples_per_epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"sampling mode {mode!r} unknown; use one of {MODES}")
        if len(labels) != len(domains) or not len(labels):
            raise ValueError(f"need one domain per label and at least one sample, got {len(labels)} labels, {len(domains)} domains")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.mode, self.rank, self.world_size, self.seed = mode, rank, world_size, seed
        self.epoch = 0
        self._cells = _group(labels, domains, mode)
        self._total = samples_per_epoch or self._natural_size()
        self._draws = _split_evenly(self._total, len(self._cells))

    def _natural_size(self) -> int:
        if self.mode == "none":
            return sum(len(ix) for ix in self._cells.values())
        sizes = sorted(len(ix) for ix in self._cells.values())
        return len(sizes) * sizes[len(sizes) // 2]  # cells x median cell

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def epoch_size(self) -> int:
        """Draws in an epoch over all ranks, before the padding that evens the ranks' shares."""
        return self._total

    def plan(self) -> EpochPlan:
        cells = tuple(
            CellPlan(domain, label, len(ix), draws)
            for ((domain, label), ix), draws in zip(self._cells.items(), self._draws)
        )
        return EpochPlan(self.mode, self._total, cells)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Every rank's indices for ``epoch``, in order: the same array on every rank."""
        parts = [
            _stream_slice(ix, draws, epoch, self.seed, cell_id)
            for cell_id, (ix, draws) in enumerate(zip(self._cells.values(), self._draws))
        ]
        order = np.random.default_rng([self.seed, epoch, 0x5A]).permutation(self._total)
        return np.concatenate(parts)[order]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        padded = math.ceil(len(indices) / self.world_size) * self.world_size
        # Pad by wrapping so every rank gets the same number of batches (DDP needs it).
        indices = np.resize(indices, padded)
        return iter(indices[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return math.ceil(self._total / self.world_size)


def _group(labels: Sequence[int], domains: Sequence[str], mode: str) -> dict[tuple[str, int], np.ndarray]:
    keys: dict[tuple[str, int], list[int]] = {}
    for i, (label, domain) in enumerate(zip(labels, domains)):
        key = {"none": ("", -1), "class": ("", int(label)), "domain_class": (domain, int(label))}[mode]
        keys.setdefault(key, []).append(i)
    return {k: np.asarray(v, dtype=np.int64) for k, v in sorted(keys.items())}


def _split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _stream_slice(indices: np.ndarray, draws: int, epoch: int, seed: int, cell_id: int) -> np.ndarray:
    """Positions [epoch*draws, (epoch+1)*draws) of the cell's endless stream of permutations."""
    n = len(indices)
    start, stop = epoch * draws, (epoch + 1) * draws
    out = []
    for block in range(start // n, (stop - 1) // n + 1 if draws else start // n):
        perm = indices[np.random.default_rng([seed, cell_id, block]).permutation(n)]
        lo, hi = max(start - block * n, 0), min(stop - block * n, n)
        out.append(perm[lo:hi])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)
