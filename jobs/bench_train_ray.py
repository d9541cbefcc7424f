"""The ``train`` part of ``jobs.benchmark``: ``trueface.bench.train``'s table plus its Ray row,
the engine's steps inside a one-worker Ray Train ``TorchTrainer`` (started through
``jobs.ray_train.fit``, as the pipeline starts it). Ray lives in jobs/ only; this is the piece of
the benchmark that needs it.

The worker gets every torch thread the driver uses and trains on the same in-memory batches
(rebuilt from the same seed); its median img/s comes back in its reported metrics. Ray's start-up
(ray.init, worker group start and stop, model build, warm-up) is left out of the rate and printed
in the row's note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch

from jobs.common import init_ray  # the jobs' own start-up: loopback only, token auth
from jobs.ray_train import _worker_setup, fit
from trueface.bench.report import QUIET_MAX_S, QUIET_SHARE, Bench, OtherLoad, share_text, wait_for_quiet
from trueface.bench.train import WARMUP_STEPS, BatchFeed, EngineLoop, alternate, make_batches, run as run_table, spread
from trueface.config import Config, from_dict


def run(args: argparse.Namespace) -> Bench:
    # A worker cannot ask for more CPUs than a running Ray (a test session's) has.
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else None
    return run_table(args, ray_rate=ray_engine_rate, max_threads=cpus)


def ray_engine_rate(cfg: Config, size: dict, rounds: int, while_ray_idles: Callable[[], None]) -> tuple[float, str]:
    """The engine's img/s inside a one-worker Ray Train run, and a note on Ray's start-up cost.
    Starts a local Ray the way the jobs do (and stops it after) unless one is running already;
    a Ray it started runs ``while_ray_idles`` after the Train run, before it stops."""
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        init_ray(None, cfg, num_cpus=max(os.cpu_count() or 1, cfg.scaling.cpus_per_worker))
    init_s = time.perf_counter() - t0
    settle = None
    try:
        t1 = time.perf_counter()
        result = fit(bench_worker, cfg, "bench-train", {"size": size, "rounds": rounds},
                     num_workers=1, fresh=True)
        fit_s = time.perf_counter() - t1
        if started:  # a test session's Ray is up for the driver's steps too: nothing to split
            while_ray_idles()
    finally:
        if started:
            ray.shutdown()
            # The driver's later steps must not pay for Ray's processes still exiting (about a second
            # at half of a 2-core machine, measured): they start once the machine is back to resting.
            # In the finally: after a failed Train run the rows after this one are timed all the same.
            settle = settle_text(wait_for_quiet())
    m = result.metrics
    startup = fit_s - m["measure_s"]
    note = (f"median of {rounds} steps in the worker ({spread(m['rates'])}; torch threads {m['threads']}, OMP_NUM_THREADS "
            f"{m['omp_threads']}; driver {cfg.scaling.cpus_per_worker}); driver steps ran half before, half after"
            + ("" if settle is None else f" ({settle})") + "; "
            f"left out of the rate: ray.init {init_s:.1f} s" + ("" if started else " (Ray was running already)")
            + f", worker group start and stop + model build + warm-up {startup:.1f} s of fit()'s {fit_s:.1f} s; "
            f"other processes (Ray's GCS, raylet, dashboard and agents, Train controller, the driver) kept "
            f"{share_text(m.get('other_load'))} of the machine's CPUs busy during the worker's steps")
    return float(m["img_per_s"]), note


def settle_text(settle_s: float | None) -> str:
    """When the driver's later steps began after the Ray run (``wait_for_quiet``'s answer)."""
    if settle_s is None:
        return f"the later half after {QUIET_MAX_S:.0f} s: other processes never fell under {QUIET_SHARE:.0%} of the CPUs"
    return f"the later half once other processes were under {QUIET_SHARE:.0%} of the CPUs, {settle_s:.1f} s after ray.shutdown()"


def bench_worker(config: dict) -> None:
    """Ray Train worker: the engine's steps on the same batches (rebuilt from the same seed),
    reported as the median img/s."""
    cfg, size = from_dict(config["cfg"]), config["size"]
    cfg, _ = _worker_setup(cfg)  # torch threads = scaling.cpus_per_worker, as in training
    engine = EngineLoop(cfg)
    feed = BatchFeed(make_batches(size["image_size"], size["batch_size"]))
    engine.run(feed.take(WARMUP_STEPS))
    rates: dict[str, list[float]] = {"engine": []}
    start = time.perf_counter()
    with OtherLoad() as load:  # Ray's own processes, working beside this one
        alternate({"engine": engine}, feed, int(config["rounds"]), rates)
    metrics = {"img_per_s": statistics.median(rates["engine"]), "threads": torch.get_num_threads(),
               "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "measure_s": time.perf_counter() - start,
               "rates": rates["engine"], "other_load": load.share}
    # Train V2's Result.metrics holds the latest report WITH a checkpoint only: attach a tiny one.
    with tempfile.TemporaryDirectory(prefix="trueface-bench-") as tmp:
        Path(tmp, "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
