"""Evaluate any TrueFace checkpoint on any data root into the cross-domain tables.

Usage::

    python -m jobs.evaluate --checkpoint runs/demo/stage2/best.pt --data-root /data/other-faces
    python -m jobs.evaluate --checkpoint CKPT --data-root PATH --threshold-from valid --no-ray

Domain names come from the folders found under the root. Thresholds: ``auto`` uses the ones
saved in the checkpoint by the pipeline (chosen on its validation data) and otherwise chooses on
this root's validation splits; ``valid`` always chooses on this root's validation splits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jobs.common import add_ray_arguments, init_ray, print_metrics_table
from trueface.checkpoint import CheckpointError, load_checkpoint
from trueface.config import from_dict
from trueface.data.layout import DataLayoutError, discover_layout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a stage1/ or stage2/ best.pt or last.pt")
    parser.add_argument("--data-root", required=True, type=Path, help="root in the original layout (any domain names)")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<run>-on-<root name>)")
    parser.add_argument("--test-domains", default="", help="comma-separated domains (default: all with a test split)")
    parser.add_argument("--threshold-from", choices=("auto", "valid", "checkpoint"), default="auto")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process instead of a Ray Train worker")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint)
        layout = discover_layout(args.data_root)
    except (CheckpointError, DataLayoutError) as exc:
        sys.exit(f"error: {exc}")
    cfg = from_dict(state["config"])
    out = args.out or Path(cfg.output.results_dir) / f"{cfg.run_name}-on-{layout.root.resolve().name}"
    domains = tuple(d for d in args.test_domains.split(",") if d)
    if args.no_ray:
        from trueface.evaluation import evaluate_checkpoint

        evaluate_checkpoint(args.checkpoint.absolute(), layout, out.absolute(), test_domains=domains,
                            threshold_from=args.threshold_from)
    else:
        init_ray(args.address, cfg)
        from jobs import ray_train

        ray_train.evaluate(cfg, f"{cfg.run_name}-evaluate-{layout.root.resolve().name}", args.checkpoint,
                           layout.root, out, test_domains=domains, threshold_from=args.threshold_from)
    print_metrics_table(out)
    print(f"results: {out.absolute()}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
