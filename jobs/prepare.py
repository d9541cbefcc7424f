"""Build the prepared cache (``data.prepared: uint8``) on Ray: each shard is a Ray task, in parallel.

Usage::

    python -m jobs.prepare data.prepared=uint8                   # the demo's data, both stages' sizes
    python -m jobs.prepare --data-root /data/faces --config paper data.prepared=uint8
    python -m jobs.prepare --address auto --data-root /data/faces --config paper data.prepared=uint8  # on a cluster

What it prepares: the training and validation images of each stage's domains, at that stage's
decode size (trueface.data.prepared stores exactly what the decode path gives, so training from
the cache is bit-identical to training from the files). The test splits are left to the
evaluation, which reads them once. ``jobs.pipeline`` runs this itself before training when
``data.prepared`` is uint8; run it beforehand to build once for many runs or searches (a search
whose trials find no cache decode the files and say so). The data root is resolved as the
pipeline resolves it (data check, exclusions, ``data.normalize``), so both find the same cache.
On a cluster, ``data.cache_dir`` must be a file system every node sees, as ``data.root`` must be.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from jobs.common import add_config_arguments, add_ray_arguments, config_from_args, init_ray, prepared_run_or_exit
from trueface.config import Config
from trueface.data.layout import DataLayout, Sample
from trueface.data.prepared import ShardJob, build_prepared, prepared_folder
from trueface.inference import decode_size


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    add_ray_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides on either side of the flags
    cfg = config_from_args(args)
    if cfg.data.prepared == "none":  # a cache no run with these arguments would read (up to 3 MB an image)
        sys.exit("error: data.prepared is none here, so a run with these arguments decodes the files and never "
                 "reads the cache; pass data.prepared=uint8, here and to the runs that should read it")
    prepared = prepared_run_or_exit(cfg)
    init_ray(args.address, prepared.cfg)
    prepare_with_ray(prepared.cfg, prepared.layout)
    return 0


def stage_images(cfg: Config, layout: DataLayout) -> dict[int | None, list[Sample]]:
    """Decode size -> the training and validation images of every stage that reads at that size."""
    wanted: dict[int | None, list[Sample]] = {}
    for stage in (1, 2):
        st = cfg.stage(stage)
        samples = layout.gather(st.domains, "train") + layout.gather(st.domains, "valid")
        wanted.setdefault(decode_size(cfg, st.image_size), []).extend(samples)
    return wanted


def prepare_with_ray(cfg: Config, layout: DataLayout) -> None:
    """Bring the cache of each stage's decode size up to date, shards on Ray tasks; prints what it did."""
    for size, samples in stage_images(cfg, layout).items():
        started = time.time()
        held, built = build_prepared(samples, size, cfg.data.cache_dir, shard_map=ray_shard_map)
        folder = prepared_folder(cfg.data.cache_dir, size)
        print(f"prepared cache (decode size {size or 'full'}): {built} images prepared in {time.time() - started:.1f} s, "
              f"{held} already there: {folder}", flush=True)


def ray_shard_map(fn: Callable[[ShardJob], int], jobs: Sequence[ShardJob]) -> Iterator[int]:
    """Each job a one-CPU Ray task (decoding is single-threaded); counts as tasks finish. Retried
    where a node is lost: a shard is written whole or not at all."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    pending = [task.remote(job) for job in jobs]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:  # interrupted, or a shard failed: the others stop too
            ray.cancel(ref)


if __name__ == "__main__":
    sys.exit(main())
