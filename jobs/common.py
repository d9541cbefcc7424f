"""Shared pieces of the entry points: config arguments and starting or joining Ray.

Ray is imported lazily, inside functions, so ``--dry-run`` and config errors return at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trueface.config import Config, ConfigError, load_config, preset_names
from trueface.storage import is_uri


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    parser.add_argument("--config", default=default,
                        help=f"preset ({', '.join(preset_names())}) or YAML file; default: {default}")
    parser.add_argument("--data-root", help="data root in the original layout (default: the embedded synthetic set)")
    parser.add_argument("--run-name", help="run name: runs/<name>/ and results/<name>/ (same name = resume)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. stage2.mixup_alpha=0.3 stage1.epochs=2")


def config_from_args(args: argparse.Namespace) -> Config:
    """The config the arguments describe; exits with the error message on a bad key or value."""
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.run_name:
        overrides.append(f"run_name={args.run_name}")
    try:
        return load_config(args.config, overrides)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


def warn_if_outputs_vanish(cfg: Config, more: tuple[tuple[str, str], ...] = ()) -> None:
    """Under ``ray job submit`` the driver runs in Ray's temporary copy of ``--working-dir``, which
    Ray deletes: relative output folders would be lost with it, so say where they go and what to pass.
    ``more`` adds other ``(flag, path)`` outputs, e.g. jobs.tune's ``--storage``."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray's job supervisor for the driver
        return
    outputs = (("output.runs_dir", cfg.output.runs_dir), ("output.results_dir", cfg.output.results_dir), *more)
    for key, value in outputs:
        if not is_uri(value) and not Path(value).is_absolute():
            sep = " " if key.startswith("--") else "="
            print(f"warning: running as a Ray job, {key} {value!r} resolves to {Path(value).absolute()}, inside the "
                  f"job's temporary copy of --working-dir, which Ray deletes. Pass {key}{sep}/absolute/path on "
                  f"storage every node mounts, or a URI such as s3://bucket/prefix, to keep it.", file=sys.stderr, flush=True)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on this machine)")


def init_ray(address: str | None, cfg: Config, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray with ``num_cpus`` logical CPUs
    (default: enough for one worker group of ``cfg``, and at least the machine's cores)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Train V2 re-routes print() through a logger AND tees it, so every line of the engine's
    # progress would reach the driver twice; workers started by this process inherit this.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Spot-instance preemption watching is for clouds; locally it only logs a scary actor error.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if address:
        ray.init(address=address)
        return
    # A local Ray gets at least the CPUs one worker group asks for, so a 2-core laptop can run
    # one worker with 2 threads (measured faster than 2 workers x 1 thread).
    cpus = num_cpus or max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    # The dashboard stays on: Ray Train's placement-group cleaner polls the state API it serves.
    ray.init(num_cpus=cpus)


def metrics_table(results_dir: Path) -> str:
    """The evaluation table written to ``results_dir/metrics.parquet``, as the console shows it."""
    import pyarrow.parquet as pq

    from trueface.results import format_table

    return format_table(pq.read_table(Path(results_dir) / "metrics.parquet").to_pylist())


def print_metrics_table(results_dir: Path) -> None:
    print("\n" + metrics_table(results_dir))
