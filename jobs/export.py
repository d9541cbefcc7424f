"""Export a trained detector to ONNX, torch.export (.pt2) or TorchScript, its preprocessing and
thresholds beside it.

Usage::

    python -m jobs.export --checkpoint runs/demo/stage2/best.pt --format onnx --out detector.onnx
    python -m jobs.export --checkpoint runs/demo/stage2/best.pt --format pt2 --out detector.pt2
    python -m jobs.export --checkpoint runs/demo/stage2/best.pt --format torchscript --out detector.pt

Writes ``--out`` and ``--out``.json. The file maps a batch of prepared images, (N, 3, S, S)
float32, to P(generated) as ``jobs.predict`` computes it (flip averaging included); the JSON (also
inside the file) lists the preprocessing, the calibrated temperature and the thresholds.
trueface/export.py has the details. ONNX needs ``pip install -e '.[export]'`` (onnx, onnxscript;
onnxruntime to run it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.common import output_problem
from trueface.checkpoint import CheckpointError
from trueface.export import FORMATS, ExportError, export_checkpoint
from trueface.config.schema import DataConfig
from trueface.storage import StorageError
from trueface.thresholds import ThresholdsError, fetch_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or its s3:// / gs:// URI")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx: onnxruntime, TensorRT and other runtimes; pt2: PyTorch without this package "
                             "(torch.export.load(path).module()); torchscript: LibTorch and older PyTorch "
                             "(deprecated in torch 2.14, which warns on every use)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = parser.parse_args(argv)
    for path in (args.out, Path(f"{args.out}.json")):
        problem = output_problem(path, "--out")
        if problem:
            parser.error(problem)
    try:
        local = fetch_checkpoint(args.checkpoint, DataConfig().cache_dir)  # a URI's, with its thresholds file
        meta = export_checkpoint(local, args.format, args.out, args.weights, source=args.checkpoint)
    except (CheckpointError, ThresholdsError, ExportError, StorageError) as exc:
        sys.exit(f"error: {exc}")
    size = meta["input"]["shape"][-1]
    print(f"exported {args.weights} weights of {args.checkpoint} -> {args.out} ({args.format}; input images "
          f"[batch, 3, {size}, {size}] float32 normalised, outputs p_generated and log_odds)")
    print(f"metadata: {args.out}.json (threshold {meta['threshold']['value']:.4f} from {meta['threshold']['source']}; "
          f"temperature {meta['temperature']['value']:.4g}, {meta['temperature']['source']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
