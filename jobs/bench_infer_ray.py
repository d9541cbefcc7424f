"""The ``infer`` part of ``jobs.benchmark``: ``trueface.bench.infer``'s table, plus with ``--ray``
the rows of ``jobs.predict --ray``'s scoring actors on the same files. Ray lives in jobs/ only.

Like with like: the plain predictor is loaded and warmed up outside its timing and scores
batches of ``--batch-size``. So the actors are started first, timed on their own (the start-up
row: each loads the checkpoint), each scores one batch untimed, and then as many passes over the
files as the reference's are timed, the files' bytes read in each pass and sent in batches of
the reference's size. The actors run ``jobs.predict_ray.Scorer``, the class ``jobs.predict
--ray``'s Ray Data ``map_batches`` runs, called here directly: a Ray Data run starts its actor
pool anew every time, so it has no warm actors to time. What Ray Data adds around them (its
reading tasks, block transfers, the streaming executor) is not in the rate. Starting Ray itself
is left out and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray
from ray.util import ActorPool

from jobs.common import init_ray
from jobs.predict_ray import Scorer, actor_pool, local_cpus
from trueface.bench.infer import RayFigures
from trueface.bench.infer import run as run_table
from trueface.bench.report import Bench
from trueface.checkpoint import load_checkpoint
from trueface.config import from_dict


def run(args: argparse.Namespace) -> Bench:
    return run_table(args, ray_rate=ray_predict_rate if getattr(args, "ray", False) else None)


def ray_predict_rate(checkpoint: Path, paths: Sequence[Path], size: dict) -> RayFigures:
    """jobs.predict --ray's actors over ``paths``: their start-up, then their img/s once warm, in
    batches of ``size['batch_size']``, the median of ``size['repeats']`` passes. Starts a local Ray
    as the jobs do (and stops it after) unless one is running."""
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        init_ray(None, from_dict(load_checkpoint(checkpoint)["config"]), num_cpus=local_cpus())
    init_s = time.perf_counter() - t0
    batch = size["batch_size"]
    batches = [list(paths[i:i + batch]) for i in range(0, len(paths), batch)]
    try:
        count, gpus = actor_pool()
        t1 = time.perf_counter()
        with scorers(checkpoint, count, gpus) as actors:
            startup_s = time.perf_counter() - t1
            score_pass(actors, [batches[0]] * len(actors))  # warm-up, one batch each: kernels, allocator, PIL
            rates, unreadable = timed_passes(actors, batches, len(paths), size["repeats"])
    finally:
        if started:
            ray.shutdown()
    note = (f"median of {len(rates)} passes over the same {len(paths)} files ({unreadable} unreadable) in batches of "
            f"{batch}, as the reference's, on {count} warm {'GPU' if gpus else 'CPU'} actor(s) of jobs.predict --ray "
            f"(its Ray Data map_batches class, called directly: Ray Data's reading and transfers are not in it), "
            f"each having scored one batch untimed; left out: ray.init {init_s:.1f} s"
            + ("" if started else " (Ray was running already)") + ", the actors' start-up (its own row)")
    return RayFigures(statistics.median(rates), startup_s, note)


class WarmScorer:
    """A Ray actor holding jobs.predict --ray's ``Scorer``, the model loaded once."""

    def __init__(self, checkpoint: str) -> None:
        self.scorer = Scorer(checkpoint, "ema", None, threads=1)  # one torch thread each, as in score_paths

    def ready(self) -> bool:
        return True  # answers once __init__ is done: the model is loaded

    def score(self, batch: dict[str, list]) -> dict[str, list]:
        return self.scorer(batch)


@contextlib.contextmanager
def scorers(checkpoint: Path, count: int, gpus: int) -> Iterator[list]:
    """``count`` started actors (one GPU or one CPU each, as score_paths asks), ready once each
    has loaded the model; killed after, so a Ray that goes on running (a test session's) gets
    their CPUs back."""
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(WarmScorer)
    actors = [actor.remote(str(Path(checkpoint).absolute())) for _ in range(count)]
    try:
        ray.get([a.ready.remote() for a in actors])
        yield actors
    finally:
        for a in actors:
            ray.kill(a)


def timed_passes(actors: list, batches: list[list[Path]], images: int, repeats: int) -> tuple[list[float], int]:
    """(img/s of each of ``repeats`` passes, files unreadable in the last)."""
    rates, unreadable = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        unreadable = score_pass(actors, batches)
        rates.append(images / (time.perf_counter() - start))
    return rates, unreadable


def score_pass(actors: list, batches: list[list[Path]]) -> int:
    """Every batch scored by whichever actor is free (the files read as it is sent, as Ray Data's
    reading tasks read them); returns how many files could not be read."""
    pool = ActorPool(actors)
    rows = pool.map_unordered(lambda a, paths: a.score.remote(read_batch(paths)), batches)
    return sum(sum(1 for error in scored["error"] if error) for scored in rows)


def read_batch(paths: Sequence[Path]) -> dict[str, list]:
    """A batch as Ray Data's read_binary_files(include_paths=True) hands it to the actors."""
    return {"path": [str(p) for p in paths], "bytes": [Path(p).read_bytes() for p in paths]}
