"""The bytes the GPU's batched augmentation moves: ``python -m jobs.benchmark traffic``.

Usage::

    python -m jobs.benchmark traffic            # the gpu part's batches: 200 x 224 px and 12 x 1024 px
    python -m jobs.benchmark traffic --quick    # the gpu part's CPU sizes: seconds

On a GPU ``DeviceAugment``'s ops are memory-bound, so their time is about the bytes they read
and write over the memory bandwidth, and the training step loses that time. This part counts
those bytes op by op (``trueface.bench.traffic``), on the CPU of any machine, for each stage's
strong augmentation (the paper preset) on the ``gpu`` part's batch and image size, with the JPEG
round trip a GPU runs (``trueface.jpeg_tensor``), over as many batches as 200
images take (each image draws its own ops). Counted in float16, the type a CUDA run under bf16
or fp16 autocast augments in (``Runtime.augment_dtype``), against float32 (fp32 training, and
every run before 2026-12-06) on the same images and draws. No timing and no GPU needed: a change
to the augmentation shows its GPU cost here before any GPU is at hand. ``jobs.benchmark gpu``
prints the count of the run's own type on the device, with the bandwidth it takes there.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from trueface.augment_device import DeviceAugment
from trueface.bench.gpu import CPU_QUICK, CUDA_FULL, SEED, STAGE_NAMES, StageSize
from trueface.bench.report import Bench, Row, machine_context
from trueface.bench.traffic import H100_BYTES_PER_S, Traffic, count_traffic
from trueface.config import load_config
from trueface.jpeg_tensor import jpeg_tensor
from trueface.precision import Runtime

MIN_IMAGES = 200  # per stage, over as many seeds as that takes: each sample draws its own ops
# the type a CUDA run under bf16 autocast (its auto precision) augments in: float16
CUDA_DTYPE = Runtime(torch.device("cuda"), "bf16", None).augment_dtype


def run(args: argparse.Namespace) -> Bench:
    quick = getattr(args, "quick", False)
    sizes = CPU_QUICK if quick else CUDA_FULL
    cfg = load_config("paper")
    bench = Bench("traffic", {**machine_context(), "preset": "paper", "jpeg": "trueface.jpeg_tensor (the GPU's)"})
    for stage, size in sizes.items():
        batches = 1 if quick else math.ceil(MIN_IMAGES / size.batch)
        augments = {dtype: DeviceAugment(cfg.stage(stage).augment, jpeg=jpeg_tensor, dtype=dtype)
                    for dtype in (CUDA_DTYPE, torch.float32)}
        counts = {dtype: [count_batch(augment, size, seed) for seed in range(batches)] for dtype, augment in augments.items()}
        print(f"{STAGE_NAMES[stage]}: counted {batches} batch(es) in each type", flush=True)
        bench.add(traffic_row(STAGE_NAMES[stage], size, counts[CUDA_DTYPE], counts[torch.float32]))
    return bench


def count_batch(augment: DeviceAugment, size: StageSize, seed: int) -> Traffic:
    """One strong batch of ``size`` random uint8 images through ``augment``, counted."""
    generator = torch.Generator().manual_seed(SEED + seed)
    images = torch.randint(0, 256, (size.batch, 3, size.image, size.image), dtype=torch.uint8, generator=generator)
    return count_traffic(lambda: augment(images, generator))


def traffic_row(stage: str, size: StageSize, counts: list[Traffic], reference: list[Traffic]) -> Row:
    """``counts`` in float16 (a CUDA run's) against ``reference``, the same batches in float32."""
    per_batch, per_batch_fp32 = (statistics.fmean(c.bytes for c in cs) for cs in (counts, reference))
    ops = statistics.fmean(c.ops for c in counts)
    return Row(f"{stage} augmentation memory traffic", per_batch / 1e9, per_batch_fp32 / 1e9, "GB a batch",
               lower_is_better=True, note=(  # the ratio: how many times fewer bytes float16 moves
        f"DeviceAugment (strong) on batches of {size.batch} images of {size.image} px, mean of {len(counts)}, in "
        f"float16 (a CUDA run's under bf16 or fp16 autocast) against float32 (fp32 training) on the same batches: "
        f"{three_figures(per_batch / size.batch / 1e6)} MB an image in {ops:.0f} ops; at an H100 SXM's peak "
        f"bandwidth ({H100_BYTES_PER_S / 1e12:g} TB/s) no less than {per_batch / H100_BYTES_PER_S * 1e3:.2f} ms a batch "
        f"of GPU time ({per_batch_fp32 / H100_BYTES_PER_S * 1e3:.2f} ms in float32)"))


def three_figures(x: float) -> str:
    """1,136 / 55.7 / 1.34: three significant figures or more, never in e-notation."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
