"""Evaluate any TrueFace checkpoint on any data root into the cross-domain tables.

Usage::

    python -m jobs.evaluate --checkpoint runs/demo/stage2/best.pt --data-root /data/other-faces
    python -m jobs.evaluate --checkpoint CKPT --data-root PATH --threshold-from valid --no-ray
    python -m jobs.evaluate --checkpoint s3://bucket/trueface/runs/demo/stage2/best.pt \
        --data-root /data/other-faces --out s3://bucket/trueface/results/demo-on-other

Domain names come from the folders found under the root. Thresholds: ``auto`` uses the ones the
pipeline saved beside the checkpoint (``thresholds.json``, chosen on the run's validation data)
when their policy and scope match, and otherwise chooses on this root's validation splits;
``valid`` always chooses on this root's validation splits; ``saved`` (old name ``checkpoint``)
requires the saved file. A saved file left from an earlier training of the checkpoint is refused.
``--save-thresholds`` writes the ones chosen here beside the checkpoint, for jobs.predict. The
checkpoint itself is never modified.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from jobs.common import add_ray_arguments, init_ray, print_metrics_table
from trueface.checkpoint import CheckpointError, load_checkpoint
from trueface.config import Config, from_dict
from trueface.data.layout import DataLayoutError, discover_layout
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint, saved_thresholds
from trueface.storage import Mirror, StorageError, check_writable, fetch, join
from trueface.thresholds import SCOPES, ThresholdsError, pull_beside, push_beside


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a stage1/ or stage2/ best.pt or last.pt: a path or a URI")
    parser.add_argument("--data-root", required=True, type=Path, help="root in the original layout (any domain names)")
    parser.add_argument("--out", help="results folder, a path or a URI (default: <the run's output.results_dir>/"
                                      "<run>-on-<root name>)")
    parser.add_argument("--test-domains", default="", help="comma-separated domains (default: all with a test split)")
    parser.add_argument("--threshold-from", choices=("auto", "valid", "saved", "checkpoint"), default="auto",
                        help="auto | valid | saved: the checkpoint's thresholds.json (checkpoint: old name of saved)")
    parser.add_argument("--threshold-scope", choices=SCOPES,
                        help="pooled | per_domain, when choosing on valid (default: the checkpoint's eval.threshold_scope)")
    parser.add_argument("--save-thresholds", action="store_true",
                        help="write the thresholds chosen on this root's validation splits beside the checkpoint "
                             "(thresholds.json), where jobs.predict reads them; needs --threshold-from valid")
    parser.add_argument("--no-ray", action="store_true", help="evaluate in this process instead of a Ray Train worker")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    if args.save_thresholds and args.threshold_from != "valid":
        parser.error("--save-thresholds writes newly chosen thresholds: use it with --threshold-from valid")
    try:
        checkpoint = fetch(args.checkpoint, Config().data.cache_dir)  # the run's own cache is in the checkpoint
        state = load_checkpoint(checkpoint)
        layout = discover_layout(args.data_root)
        cfg = from_dict(state["config"])
        if args.threshold_scope:
            cfg = replace(cfg, eval=replace(cfg.eval, threshold_scope=args.threshold_scope))
        if args.threshold_from != "valid":  # a missing or stale thresholds file stops here, not on a worker
            pull_beside(args.checkpoint, Config().data.cache_dir)
            saved_thresholds(checkpoint, args.threshold_from, cfg.eval.threshold_policy, cfg.eval.threshold_scope)
        out = args.out or join(cfg.output.results_dir, f"{cfg.run_name}-on-{layout.root.resolve().name}")
        check_writable(out, "--out")
    except (CheckpointError, DataLayoutError, StorageError, ThresholdsError) as exc:
        sys.exit(f"error: {exc}")
    results = Mirror.of(out, cfg.data.cache_dir)
    domains = tuple(d for d in args.test_domains.split(",") if d)
    if args.no_ray:
        evaluate_checkpoint(checkpoint, layout, results.local, test_domains=domains, thresholds=ThresholdRequest(
            args.threshold_from, scope=cfg.eval.threshold_scope, save=args.save_thresholds, chosen_by="jobs.evaluate"))
        results.push()
        if args.save_thresholds:
            push_beside(args.checkpoint, Config().data.cache_dir)
    else:
        init_ray(args.address, cfg)
        from jobs import ray_train

        ray_train.evaluate(cfg, f"{cfg.run_name}-evaluate-{layout.root.resolve().name}", args.checkpoint,
                           layout.root, out, test_domains=domains, thresholds=ThresholdRequest(
                               args.threshold_from, save=args.save_thresholds, chosen_by="jobs.evaluate"))
        results.pull()
    print_metrics_table(results.local)
    print(f"results: {results.location}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
