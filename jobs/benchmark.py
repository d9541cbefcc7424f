"""Throughput of the engine itself (no Ray): one Stage I epoch, images per second.

Usage::

    python -m jobs.benchmark                                   # 224 px, batch 64, on cuda if present
    python -m jobs.benchmark --image-size 224 --batch-size 128 --images 4096 stage1.augment.strength=0

Runs ``trueface.train.run_stage`` on the embedded synthetic data (generated at the size asked
for), so it needs neither Ray nor real data: this is the GPU check of the pipeline issue, and the
baseline later speed work compares against. Prints train images/s (excluding validation) and
the device, precision and peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from trueface.config import ConfigError, load_config
from trueface.train import run_stage
from trueface.run import resolve_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048, help="training images in the epoch")
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="trueface-bench-"))
    source = max(args.image_size, 64)
    try:
        cfg = load_config("paper", [
            "model.weights=none", f"data.cache_dir={work}/cache", f"data.loader_workers={args.loader_workers}",
            f"data.synthetic.image_size={source}", f"data.synthetic.train_per_class={args.images // 2}",
            "data.synthetic.valid_per_class=2", "data.synthetic.test_per_class=1",
            f"stage1.image_size={args.image_size}", f"stage1.batch_size={args.batch_size}", "stage1.epochs=1",
            "stage1.light_epochs=0", f"runtime.log_every={max(1, args.images // args.batch_size // 5)}",
            *args.overrides,
        ])
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    print(f"generating {args.images} synthetic images at {source} px in {work} ...", flush=True)
    try:
        cfg, layout = resolve_run(cfg, data_check=False)  # generated images: nothing to check, time it alone
        train = layout.gather(cfg.stage1.domains, "train")
        val = layout.gather(cfg.stage1.domains, "valid")
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            result = run_stage(cfg, 1, train, val, work / "stage1")
        wall = time.time() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)  # images and a 377 MB checkpoint: not worth keeping
    epoch = result.history[0]
    train_s = epoch["time/epoch_s"]
    steps = int(epoch["step"])
    images = steps * cfg.stage1.batch_size
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, {args.image_size} px, batch {args.batch_size}, "
          f"strong augmentation strength {cfg.stage1.augment.strength}")
    print(f"stage I epoch: {images} images in {train_s:.1f} s (incl. validation of {len(val)}) "
          f"= {images / train_s:.1f} images/s; whole call {wall:.1f} s")
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
