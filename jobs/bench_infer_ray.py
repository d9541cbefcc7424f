"""The ``infer`` part of ``jobs.benchmark``: ``trueface.bench.infer``'s table, plus with ``--ray``
the rows of ``jobs.predict --ray``'s scoring actors on the same files. Ray lives in jobs/ only.

Like with like: the plain predictor is loaded and warmed up outside its timing and scores
batches of ``--batch-size``. So the actors are started first, timed on their own (the start-up
row: each loads the checkpoint), each scores one batch untimed, and then their passes over the
files (the files' bytes read in each pass and sent in batches of the reference's size) alternate
with the reference's, as many rounds as the reference's row has, A B, B A, ... (``alternate_rates``,
as the rest of the suite alternates): a burst of load from another process, or Ray's own daemons,
hits both sides. On CPUs the actors get the reference's torch threads between them
(``actor_threads``), not one each whatever the reference has. The actors run
``jobs.predict_ray.Scorer``, the class ``jobs.predict --ray``'s Ray Data ``map_batches`` runs,
called here directly: a Ray Data run starts its actor pool anew every time, so it has no warm
actors to time. What Ray Data adds around them (its reading tasks, block transfers, the
streaming executor) is not in the rate. Starting Ray itself is left out and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import ray
import torch
from ray.util import ActorPool

from jobs.common import init_ray
from jobs.predict_ray import Scorer, actor_pool, local_cpus
from trueface.bench.infer import RayFigures
from trueface.bench.infer import run as run_table
from trueface.bench.report import Bench, alternate_rates, wait_for_quiet
from trueface.checkpoint import load_checkpoint
from trueface.config import from_dict


def run(args: argparse.Namespace) -> Bench:
    return run_table(args, ray_rate=ray_predict_rate if getattr(args, "ray", False) else None)


def ray_predict_rate(checkpoint: Path, paths: Sequence[Path], size: dict,
                     reference: Callable[[], object]) -> RayFigures:
    """jobs.predict --ray's actors over ``paths``: their start-up, then their img/s once warm, in
    batches of ``size['batch_size']``, and the reference's (``reference()``: one pass of the plain
    predictor), each the median of ``size['repeats']`` passes in alternating rounds. Starts a local
    Ray as the jobs do (and stops it after) unless one is running."""
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    if started:
        init_ray(None, from_dict(load_checkpoint(checkpoint)["config"]), num_cpus=local_cpus())
    init_s = time.perf_counter() - t0
    batch = size["batch_size"]
    batches = [list(paths[i:i + batch]) for i in range(0, len(paths), batch)]
    reference_threads = torch.get_num_threads()  # what the reference's passes run with, in this process
    try:
        count, gpus = actor_pool()
        t1 = time.perf_counter()
        with scorers(checkpoint, count, gpus, actor_threads(reference_threads, count)) as (actors, threads):
            startup_s = time.perf_counter() - t1
            score_pass(actors, [batches[0]] * len(actors))  # warm-up, one batch each: kernels, allocator, PIL
            rates, last = alternate_rates({"reference": reference, "ray": lambda: score_pass(actors, batches)},
                                          len(paths), size["repeats"])
    finally:
        if started:
            ray.shutdown()
            wait_for_quiet()  # a part timed after this one must not pay for Ray's processes still exiting
    note = (f"median of {len(rates['ray'])} passes each over the same {len(paths)} files ({last['ray']} unreadable), "
            f"the actors' alternating with jobs.predict's (A B, B A, ...; its figure here is from these rounds, beside "
            f"the same Ray, not the first row's), in batches of {batch} on {count} warm {'GPU' if gpus else 'CPU'} "
            f"actor(s) of jobs.predict --ray (its Ray Data map_batches class, called directly: Ray Data's reading and "
            f"transfers are not in it), each having scored one batch untimed; torch threads: jobs.predict "
            f"{reference_threads}, {threads_text(threads)}; left out: ray.init {init_s:.1f} s"
            + ("" if started else " (Ray was running already)") + ", the actors' start-up (its own row)")
    return RayFigures(statistics.median(rates["ray"]), statistics.median(rates["reference"]), startup_s, note)


def actor_threads(reference_threads: int, actors: int) -> int:
    """Each actor's torch threads: its share of the reference's, at least one. One each (as
    score_paths gives them) leaves the actors fewer threads in all than the reference where there
    are fewer actors than its threads (a Ray already running with fewer CPUs than the machine's
    cores; a reference with more threads than cores): the row would measure that, not Ray. On CUDA
    the Scorer leaves torch's threads as they are."""
    return max(1, reference_threads // max(1, actors))


def threads_text(threads: Sequence[int]) -> str:
    """The actors' torch threads as each reported them: "2 actor(s) x 1", or each listed where they differ."""
    if len(set(threads)) == 1:
        return f"{len(threads)} actor(s) x {threads[0]}"
    return "actors " + ", ".join(map(str, threads))


class WarmScorer:
    """A Ray actor holding jobs.predict --ray's ``Scorer``, the model loaded once."""

    def __init__(self, checkpoint: str, threads: int) -> None:
        self.scorer = Scorer(checkpoint, "ema", None, threads=threads)  # actor_threads's share (CPU only)

    def ready(self) -> int:
        """Answers once __init__ is done (the model is loaded): the torch threads it scores with."""
        return torch.get_num_threads()

    def score(self, batch: dict[str, list]) -> dict[str, list]:
        return self.scorer(batch)


@contextlib.contextmanager
def scorers(checkpoint: Path, count: int, gpus: int, threads: int) -> Iterator[tuple[list, list[int]]]:
    """``count`` started actors (one GPU or one CPU each, as score_paths asks; ``threads`` torch
    threads each on CPUs), ready once each has loaded the model, and the torch threads each
    reports; killed after, so a Ray that goes on running (a test session's) gets their CPUs back."""
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(WarmScorer)
    actors = [actor.remote(str(Path(checkpoint).absolute()), threads) for _ in range(count)]
    try:
        yield actors, ray.get([a.ready.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)


def score_pass(actors: list, batches: list[list[Path]]) -> int:
    """Every batch scored by whichever actor is free (the files read as it is sent, as Ray Data's
    reading tasks read them); returns how many files could not be read."""
    pool = ActorPool(actors)
    rows = pool.map_unordered(lambda a, paths: a.score.remote(read_batch(paths)), batches)
    return sum(sum(1 for error in scored["error"] if error) for scored in rows)


def read_batch(paths: Sequence[Path]) -> dict[str, list]:
    """A batch as Ray Data's read_binary_files(include_paths=True) hands it to the actors."""
    return {"path": [str(p) for p in paths], "bytes": [Path(p).read_bytes() for p in paths]}
