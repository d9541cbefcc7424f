"""The two-stage TrueFace pipeline on Ray Train: Stage I, Stage II, then the evaluation tables.

Usage::

    python -m jobs.pipeline                                  # demo preset, embedded data, local Ray
    python -m jobs.pipeline --config paper --data-root /data/faces --address auto
    python -m jobs.pipeline --data-root ../shared/data/faces140k-mini stage1.epochs=3
    python -m jobs.pipeline --config paper --dry-run         # resolved config and plan only
    python -m jobs.pipeline --storage s3://bucket/trueface   # runs/ and results/ kept in S3

Rerunning the same command (same run name) resumes: finished stages are skipped and an
interrupted stage continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import (add_config_arguments, add_ray_arguments, check_model_weights, config_from_args,
                         exit_on_batch_problems, exit_on_output_problems, init_ray, nonempty, prepared_run_or_exit,
                         print_metrics_table, text_override, warn_if_outputs_vanish)
from trueface.config import ConfigError, from_dict, to_yaml
from trueface.checkpoint import finished_stage
from trueface.evaluation import ThresholdRequest
from trueface.run import (PreparedRun, RunPaths, config_changes, describe_plan, image_differences, manifest_table,
                          training_changes, write_data_check, write_run_files)
from trueface.storage import Mirror, StorageError, check_writable, is_uri, join
from trueface.thresholds import FILE_NAME as THRESHOLDS_FILE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--storage", type=nonempty,
                        help="where runs/ and results/ go: a path every node mounts, or a URI such as "
                             "s3://bucket/trueface (credentials from the environment)")
    add_ray_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan; train nothing")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides on either side of the flags
    if args.storage:
        args.overrides += [text_override("output.runs_dir", join(args.storage, "runs")),
                           text_override("output.results_dir", join(args.storage, "results"))]
    cfg = config_from_args(args)
    # a dry run writes only caches (the synthetic set, the data check's) under data.cache_dir
    exit_on_output_problems(cfg, ("data.cache_dir",) if args.dry_run else ("data.cache_dir", "output.runs_dir",
                                                                              "output.results_dir"))
    warn_if_outputs_vanish(cfg)
    prepared = prepared_run_or_exit(cfg)
    cfg, layout, check = prepared.cfg, prepared.layout, prepared.check
    exit_on_batch_problems([cfg], layout, (1, 2))
    paths = RunPaths.of(cfg)
    run = paths.run_mirror()
    if args.dry_run:
        if not is_uri(paths.run_location):  # a URI's run is not downloaded by a dry run
            _check_config_changes(prepared, paths, run)
        print(to_yaml(cfg))
        print(describe_plan(cfg, layout, paths, check))
        return 0
    check_model_weights(cfg)
    try:
        check_writable(cfg.output.runs_dir, "output.runs_dir")
        check_writable(cfg.output.results_dir, "output.results_dir")
    except StorageError as exc:
        sys.exit(f"storage error: {exc}")
    run.pull("config.yaml", "stage1/stage.json", "stage2/stage.json")  # a run kept at a URI resumes from there
    _check_config_changes(prepared, paths, run)  # before anything of the run is written or removed
    # A driver killed while its workers uploaded (their uploads outlive it by a moment) may leave a
    # temporary object that no stage worker will clean: a finished stage never starts again.
    for partial in run.remove_partial_uploads("stage1", "stage2", "tensorboard"):
        print(f"removed {join(run.location, partial)}, an upload cut off by a killed job", flush=True)
    write_run_files(cfg, layout, paths, check)
    run.push("config.yaml", "manifest.parquet")
    write_data_check(check, paths)
    print(describe_plan(cfg, layout, paths, check), flush=True)

    init_ray(args.address, cfg)
    from jobs import ray_train  # imports Ray: only once the config is known to be good

    started = time.time()
    if cfg.data.prepared != "none":  # before any worker starts: every CPU of the cluster decodes
        from jobs.prepare import prepare_with_ray

        prepare_with_ray(cfg, layout)
    init_from = None
    for stage in (1, 2):
        done = finished_stage(paths.stage_dir(stage))
        if done:
            print(f"stage {stage}: already finished ({done.epochs_run} epochs, best EMA validation AUC ({done.select_on}) "
                  f"{done.best_select_auc_ema:.4f}); skipping. Delete {paths.location(f'stage{stage}')} to train it again.",
                  flush=True)
        else:
            print(f"stage {stage}: training on Ray Train ...", flush=True)
            ray_train.fit(ray_train.stage_worker, cfg, f"{cfg.run_name}-stage{stage}",
                          # a URI storage keeps last.pt there already: no second copy through Ray's
                          {"stage": stage, "init_from": init_from, "attach_checkpoint": not is_uri(paths.run_location)},
                          fresh=not run.exists(f"stage{stage}/last.pt"))
            run.pull(f"stage{stage}/stage.json")
        init_from = paths.location(f"stage{stage}/best.pt")

    print("evaluation: scoring the test splits on Ray Train ...", flush=True)
    ray_train.evaluate(cfg, f"{cfg.run_name}-evaluate", init_from, cfg.data.root, paths.results_location,
                       test_domains=cfg.data.test_domains,
                       thresholds=ThresholdRequest("valid", save=True, chosen_by=f"jobs.pipeline (run {cfg.run_name})"),
                       exclude=cfg.data.exclude)
    paths.results_mirror().pull()
    run.pull(f"stage2/{THRESHOLDS_FILE}")  # written beside best.pt, never into it
    run.pull("tensorboard")
    print_results(paths, time.time() - started)
    return 0


def print_results(paths: RunPaths, seconds: float | None = None) -> None:
    print_metrics_table(paths.results_dir)
    if seconds is not None:
        print(f"\nfinished in {seconds / 60:.1f} min")
    print(f"results:     {paths.results_location}/summary.md (+ metrics.csv, metrics.parquet, ROC, confusion and reliability PNGs)")
    print(f"checkpoints: {paths.run_location}/stage{{1,2}}/best.pt")
    print(f"thresholds:  {paths.run_location}/stage2/{THRESHOLDS_FILE} (jobs.predict labels with them)")
    print(f"tensorboard: tensorboard --logdir {paths.tensorboard_dir}")
    if is_uri(paths.run_location):
        print(f"working copies on this machine: {paths.run_dir} and {paths.results_dir}")


def _check_config_changes(prepared: PreparedRun, paths: RunPaths, run: Mirror) -> None:
    """A rerun of a run name resumes it, and rewrites its config.yaml and manifest.parquet. With other
    data, model or stage settings than its checkpoints were trained with (trueface.run.training_changes)
    that record would describe training they never had, and jobs.evaluate's overlap check would read
    the wrong manifest: refused. Other changes (more epochs for an interrupted stage, more workers,
    another threshold policy, the same images at another data.root) resume, never silently."""
    import yaml

    cfg = prepared.cfg
    saved = paths.run_dir / "config.yaml"
    if not saved.is_file():
        return
    started = _started_stages(paths, run)
    try:
        old = from_dict(yaml.safe_load(saved.read_text()))
    except (ConfigError, yaml.YAMLError) as exc:
        if started:  # a checkpoint whose settings cannot be read back: nothing to compare with
            sys.exit(f"error: run {cfg.run_name} has checkpoints in {paths.run_location}, but its config.yaml does not "
                     f"load ({exc}). {_new_name_advice(paths)}")
        return
    changed = config_changes(old, cfg)
    decisive = dict(changed)
    moved = _moved_data(prepared, paths, run) if started and "data.root" in changed else None
    if moved == "":  # the same images elsewhere: the checkpoints learnt from what the record will say
        changed["data.root"] += f" (the same {len(prepared.layout.all_samples())} images, by sha1)"
        del decisive["data.root"]
    refused = training_changes(decisive, started)
    if refused:
        trained = " and ".join(f"stage {n} ({'finished' if done else 'interrupted: last.pt'})" for n, done in started.items())
        why = f"\n(data.root: {moved})" if moved else ""
        sys.exit(f"error: run {cfg.run_name} in {paths.run_location} already has {trained}, trained with other values "
                 f"of keys that decide training (saved -> given):\n  " + "\n  ".join(refused) + f"{why}\nIts checkpoints "
                 f"learnt from the old values; resuming would rewrite its config.yaml and manifest.parquet to describe "
                 f"training they never had. {_new_name_advice(paths)} To resume it instead, rerun with the old values.")
    if changed:
        print(f"warning: run {cfg.run_name} exists with a different config; resuming with:\n  "
              + "\n  ".join(changed.values()), file=sys.stderr)


def _moved_data(prepared: PreparedRun, paths: RunPaths, run: Mirror) -> str:
    """"" when the run's manifest holds the images ``prepared`` found at its new data.root, else why
    not (trueface.run.image_differences)."""
    run.pull("manifest.parquet")
    try:
        saved = pq.read_table(paths.run_dir / "manifest.parquet")
    except (OSError, pa.ArrowException) as exc:
        return f"the run's manifest.parquet cannot be read to compare its images ({exc})"
    return image_differences(saved, manifest_table(prepared.layout, prepared.check))


def _started_stages(paths: RunPaths, run: Mirror) -> dict[int, bool]:
    """Each stage with a checkpoint, mapped to whether it finished (its stage.json, pulled already)."""
    started = {}
    for stage in (1, 2):
        if finished_stage(paths.stage_dir(stage)):
            started[stage] = True
        elif run.exists(f"stage{stage}/last.pt"):
            started[stage] = False
    return started


def _new_name_advice(paths: RunPaths) -> str:
    return (f"Choose a new run name for these settings (--run-name NAME), or remove {paths.run_location} to "
            "train this run again from the start.")


if __name__ == "__main__":
    sys.exit(main())
