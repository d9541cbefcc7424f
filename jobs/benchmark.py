"""Speed, side by side with a naive reference in the same run: ``python -m jobs.benchmark PART...``

Usage::

    python -m jobs.benchmark input train                 # the CPU pair (default)
    python -m jobs.benchmark input --data-root ../shared/data/faces140k-mini
    python -m jobs.benchmark infer --checkpoint runs/demo/stage2/best.pt
    python -m jobs.benchmark infer --ray --images 2000 --data-root ../shared/data/faces140k-mini
    python -m jobs.benchmark gpu                          # the one-command GPU check (no Ray)
    python -m jobs.benchmark gpu --prepared               # the same, reading the prepared uint8 cache
    python -m jobs.benchmark gpu --trace                  # also a profiler trace of a few steps per stage
    python -m jobs.benchmark input train --quick          # small sizes: seconds, for CI
    python -m jobs.benchmark traffic                      # the GPU augmentation's bytes, counted on any machine

Parts (each prints its table and writes results/bench-<part>/bench.json and bench.md):

- ``input``: ms per image per core of the input path (decode, crop, augmentation) against the
  naive one (full-size PIL decode, every strong op always on, per sample);
- ``train``: the engine's training img/s against a plain torchvision loop on the same model,
  batch and tensors, and against the engine under Ray Train with one worker;
- ``infer``: ``jobs.predict`` img/s against a naive per-image loop; with ``--ray``, also
  ``jobs.predict --ray``'s scoring actors, warm, against ``jobs.predict``, and their start-up;
- ``gpu``: Stage I and Stage II training img/s on real-size JPEGs, GPU busy share and peak
  memory (on a CPU it runs at small sizes and says so);
- ``traffic``: the bytes the GPU's batched augmentation reads and writes a batch, counted op by
  op at the ``gpu`` part's sizes, on any machine (no timing).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

PARTS = {
    "input": "trueface.bench.input",
    "train": "jobs.bench_train_ray",  # trueface.bench.train plus its Ray Train row
    "infer": "jobs.bench_infer_ray",  # trueface.bench.infer plus, with --ray, its Ray rows
    "gpu": "trueface.bench.gpu",
    "traffic": "trueface.bench.augment_traffic",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"one or more of {', '.join(PARTS)} (default: input train)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few images: seconds, for CI")
    parser.add_argument("--data-root", type=Path, help="real images to read (input, infer); generated when absent")
    parser.add_argument("--checkpoint", help="infer: the checkpoint to score with, a file or its s3:// / gs:// URI "
                                             "(default: a fresh model)")  # a str: Path would mangle s3:// to s3:/
    parser.add_argument("--images", type=int, help="images per measurement (each part has its default)")
    parser.add_argument("--batch-size", type=int, help="train/gpu: batch size (each part has its default)")
    parser.add_argument("--image-size", type=int, help="train: image size; gpu: Stage I's (each part has its default)")
    parser.add_argument("--ray", action="store_true",
                        help="infer: also time jobs.predict --ray's actors, warm, and their start-up")
    parser.add_argument("--prepared", action="store_true",
                        help="gpu: train from the prepared uint8 cache (data.prepared=uint8), built before the timing")
    parser.add_argument("--compile", action="store_true",
                        help="gpu: train with runtime.compile=true (torch.compile of the training forward; the "
                             "warm-up's first step compiles: about a minute for Stage I on an H200) and time the "
                             "model alone eager beside it, on the same state")
    parser.add_argument("--trace", action="store_true",
                        help="gpu: also record a profiler trace of a few engine steps per stage "
                             "(<results-dir>/bench-gpu/trace-stageN.json.gz; open it in ui.perfetto.dev)")
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="where bench-<part>/ goes")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {', '.join(map(repr, unknown))}: choose from {', '.join(PARTS)}")
    args.parts = list(dict.fromkeys(args.parts or ["input", "train"]))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []
    for part in args.parts:
        bench = importlib.import_module(PARTS[part]).run(args)
        out = bench.write(args.results_dir)
        print("\n" + bench.markdown() + f"written to {out}/bench.json and bench.md\n", flush=True)
        failed += [part] * bool(bench.failures)
    if failed:  # the figures that were measured are written; the status says some are missing
        print(f"not everything was measured in: {', '.join(failed)} (see 'Not measured' above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
