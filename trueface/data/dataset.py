"""Decode labelled images for training and evaluation.

Usage: ``ds = ImageDataset(samples, transform, decode_size=224)``; ``x, label, index = ds[0]``

``load`` (default ``load_rgb``) turns a path into the decoded image; a ``PreparedImages``
(trueface.data.prepared) serves the same pixels from the prepared cache.

Files are decoded by ``trueface.data.decode.load_rgb`` (the same steps for every format); one that
cannot be decoded raises ``ImageReadError`` naming it and the cause, rather than a bare PIL error
from inside a DataLoader worker. Both names are re-exported here for existing imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from trueface.data.decode import ImageReadError, load_rgb
from trueface.data.layout import Sample

__all__ = ["ImageDataset", "ImageReadError", "load_rgb"]  # the last two re-exported from trueface.data.decode


class ImageDataset(Dataset):
    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        decode_size: int | None = None,
        load: Callable[[str, int | None], Image.Image] = load_rgb,
    ) -> None:
        if not samples:
            raise ValueError("ImageDataset needs at least one sample")
        self.samples = list(samples)
        self.transform = transform
        self.decode_size = decode_size
        self.load = load

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        return self.transform(self.load(sample.path, self.decode_size)), sample.label, index

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def domains(self) -> list[str]:
        return [s.domain for s in self.samples]
