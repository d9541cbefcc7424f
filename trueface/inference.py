"""Scoring: P(fake) for samples or a batch, the same way for validation, test and prediction.

Usage::

    scores = predict_scores(model, samples, image_size=224, runtime=runtime, cfg=cfg)   # float64, in order
    probs = score_batch(model, images, runtime, hflip=True)

With several data-parallel ranks, each scores every ``world_size``-th sample and the scores are
gathered back into the samples' order, so every rank returns the full array (no padding, no
duplicates, whatever the number of samples).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from trueface.augment import eval_transform
from trueface.config import Config
from trueface.data.dataset import ImageDataset, load_rgb
from trueface.data.layout import Sample
from trueface.data.prepared import PreparedImages
from trueface.distributed import DistInfo, gather_objects
from trueface.host_memory import freeze_inherited_objects
from trueface.model import fake_probability
from trueface.precision import Runtime


def decode_size(cfg: Config, image_size: int) -> int | None:
    """The size an image may be reduced to by a power of two before resizing (``data.decode_draft``; the
    same step for every format, see trueface.data.decode), else None (full size)."""
    return image_size if cfg.data.decode_draft else None


def image_loader(cfg: Config, image_size: int):
    """How a stage's datasets read an image: ``load_rgb``, or with ``data.prepared: uint8`` the
    prepared cache at the stage's decode size (the same pixels; files it lacks are decoded)."""
    if cfg.data.prepared == "none":
        return load_rgb
    return PreparedImages.open(cfg.data.cache_dir, decode_size(cfg, image_size))


@torch.no_grad()
def predict_scores(model: nn.Module, samples: Sequence[Sample], image_size: int, runtime: Runtime,
                   cfg: Config, di: DistInfo | None = None) -> np.ndarray:
    """P(fake) for every sample, in order. Ranks share the work and gather the scores."""
    di = di or DistInfo()
    mine = list(range(di.rank, len(samples), di.world_size))
    scores = np.empty(0, dtype=np.float64)
    if mine:
        ds = ImageDataset([samples[i] for i in mine], eval_transform(image_size), decode_size(cfg, image_size),
                          image_loader(cfg, image_size))
        loader = DataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=cfg.data.loader_workers,
                            pin_memory=runtime.device.type == "cuda", worker_init_fn=freeze_inherited_objects)
        scores = _score_loader(model, loader, runtime, cfg.eval.hflip_tta)
    if di.world_size == 1:
        return scores
    full = np.empty(len(samples), dtype=np.float64)
    for idx, sc in gather_objects((mine, scores), di):
        full[idx] = sc
    return full


def _score_loader(model: nn.Module, loader: DataLoader, runtime: Runtime, hflip: bool) -> np.ndarray:
    was_training = model.training
    model.eval()
    chunks = []
    for images, _, _ in loader:
        chunks.append(score_batch(model, images, runtime, hflip))
    model.train(was_training)
    return torch.cat(chunks).double().numpy() if chunks else np.empty(0)


@torch.no_grad()
def score_batch(model: nn.Module, images: torch.Tensor, runtime: Runtime, hflip: bool) -> torch.Tensor:
    """P(fake) of a batch (on the CPU), optionally averaged with the mirrored images: the same
    test-time augmentation for validation, test and prediction (the original's differed)."""
    images = images.to(runtime.device, non_blocking=True, memory_format=torch.channels_last)
    with runtime.autocast():
        logits = model(images)
        flipped = model(torch.flip(images, dims=[3])) if hflip else None
    # The softmax runs outside autocast, in float64 (fake_probability): bf16 scores tie.
    probs = fake_probability(logits)
    if flipped is not None:
        probs = (probs + fake_probability(flipped)) / 2
    return probs.cpu()
