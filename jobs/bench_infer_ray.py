"""The ``infer`` part of ``jobs.benchmark``: ``trueface.bench.infer``'s table, plus with ``--ray``
the row of ``jobs.predict --ray`` (Ray Data actors) on the same files. Ray lives in jobs/ only.

The Ray side is timed from the start of the Ray Data run to its last row: reading, the actors'
start-up (each loads the model once) and scoring. Starting Ray itself is left out and printed;
on millions of images the start-up is amortised, on the benchmark's few dozen it is not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ray

from jobs.common import init_ray
from jobs.predict_ray import actor_pool, local_cpus, score_paths
from trueface.bench.infer import run as run_table
from trueface.bench.report import Bench
from trueface.checkpoint import load_checkpoint
from trueface.config import from_dict


def run(args: argparse.Namespace) -> Bench:
    return run_table(args, ray_rate=ray_predict_rate if getattr(args, "ray", False) else None)


def ray_predict_rate(checkpoint: Path, paths: Sequence[Path]) -> tuple[float, str]:
    """img/s of jobs.predict --ray over ``paths``; starts a local Ray as the jobs do (and stops it
    after) unless one is running."""
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        init_ray(None, from_dict(load_checkpoint(checkpoint)["config"]), num_cpus=local_cpus())
    init_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory(prefix="trueface-bench-ray-") as tmp:
            t1 = time.perf_counter()
            failed = score_paths(Path(checkpoint), [str(p) for p in paths], None, Path(tmp) / "scores.parquet")
            elapsed = time.perf_counter() - t1
        actors, gpus = actor_pool()
    finally:
        if started:
            ray.shutdown()
    note = (f"the whole Ray Data run over the same {len(paths)} files ({failed} unreadable), {elapsed:.1f} s: reading, "
            f"{actors} {'GPU' if gpus else 'CPU'} actor(s) starting and loading the model once each, scoring; left out: ray.init {init_s:.1f} s"
            + ("" if started else " (Ray was running already)"))
    return len(paths) / elapsed, note
