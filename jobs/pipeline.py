"""The two-stage TrueFace pipeline on Ray Train: Stage I, Stage II, then the evaluation tables.

Usage::

    python -m jobs.pipeline                                  # demo preset, embedded data, local Ray
    python -m jobs.pipeline --config paper --data-root /data/faces --address auto
    python -m jobs.pipeline --data-root ../shared/data/faces140k-mini stage1.epochs=3
    python -m jobs.pipeline --config paper --dry-run         # resolved config and plan only

Rerunning the same command (same run name) resumes: finished stages are skipped and an
interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jobs.common import (add_config_arguments, add_ray_arguments, config_from_args, init_ray, print_metrics_table,
                         warn_if_outputs_vanish)
from trueface.config import Config, from_dict, to_yaml
from trueface.data.layout import DataLayoutError
from trueface.engine import finished_stage, stage_files
from trueface.run import RunPaths, describe_plan, resolve_run, write_run_files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan; train nothing")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    warn_if_outputs_vanish(cfg)
    try:
        cfg, layout = resolve_run(cfg)
    except DataLayoutError as exc:
        sys.exit(f"data error: {exc}")
    paths = RunPaths.of(cfg)
    if args.dry_run:
        print(to_yaml(cfg))
        print(describe_plan(cfg, layout, paths))
        return 0
    _warn_if_config_changed(cfg, paths)
    write_run_files(cfg, layout, paths)
    print(describe_plan(cfg, layout, paths), flush=True)

    init_ray(args.address, cfg)
    from jobs import ray_train  # imports Ray: only once the config is known to be good

    started = time.time()
    init_from = None
    for stage in (1, 2):
        stage_dir = paths.stage_dir(stage)
        done = finished_stage(stage_dir)
        if done:
            print(f"stage {stage}: already finished ({done.epochs_run} epochs, best EMA AUC "
                  f"{done.best_auc_ema:.4f}); skipping. Delete {stage_dir} to train it again.", flush=True)
        else:
            print(f"stage {stage}: training on Ray Train ...", flush=True)
            ray_train.fit(ray_train.stage_worker, cfg, f"{cfg.run_name}-stage{stage}",
                          {"stage": stage, "init_from": str(init_from) if init_from else None},
                          fresh=not stage_files(stage_dir)["last"].is_file())
        init_from = stage_files(stage_dir)["best"]

    print("evaluation: scoring the test splits on Ray Train ...", flush=True)
    ray_train.evaluate(cfg, f"{cfg.run_name}-evaluate", init_from, cfg.data.root, paths.results_dir,
                       test_domains=cfg.data.test_domains, threshold_from="valid", save_thresholds=True)
    print_results(paths, time.time() - started)
    return 0


def print_results(paths: RunPaths, seconds: float | None = None) -> None:
    print_metrics_table(paths.results_dir)
    if seconds is not None:
        print(f"\nfinished in {seconds / 60:.1f} min")
    print(f"results:     {paths.results_dir}/summary.md (+ metrics.csv, metrics.parquet, ROC and confusion PNGs)")
    print(f"checkpoints: {paths.run_dir}/stage{{1,2}}/best.pt")
    print(f"tensorboard: tensorboard --logdir {paths.tensorboard_dir}")


def _warn_if_config_changed(cfg: Config, paths: RunPaths) -> None:
    """Resuming with a different config is allowed (e.g. more epochs) but never silent."""
    import yaml

    from trueface.config import flatten, to_dict

    saved = paths.run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = flatten(to_dict(from_dict(yaml.safe_load(saved.read_text()))))
    new = flatten(to_dict(cfg))
    changed = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed:
        print(f"warning: run {cfg.run_name} exists with a different config; resuming with:\n  "
              + "\n  ".join(changed), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
