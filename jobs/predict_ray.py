"""``jobs.predict --ray``: score a folder or a bucket of images on Ray Data, into one parquet file.

Usage::

    python -m jobs.predict --ray --checkpoint runs/demo/stage2/best.pt --input /data/faces --out preds.parquet
    python -m jobs.predict --ray --checkpoint s3://bucket/runs/r/stage2/best.pt --input s3://bucket/faces/ \\
        --out preds.parquet --address auto

``read_binary_files`` reads the files (a local folder, or an s3:// / gs:// URI through pyarrow,
credentials from the environment as for ``--storage``); ``map_batches`` hands them to a pool of
actors that each load the model once (one GPU each where the cluster has GPUs, else one CPU each)
and decode, prepare and score them exactly as the plain predictor does. A file that cannot be
decoded becomes a row with its error, never a failed job. The driver only receives the small
result rows: it writes them to ``--out`` as they come (a temporary name, renamed at the end), with
a progress line in images/s and the ETA. Columns: path, p_generated, p_calibrated, label,
threshold, error (rows in the order they finish, not the input order).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from trueface.atomic import atomic_open
from trueface.data.decode import ImageReadError
from trueface.data.layout import IMAGE_SUFFIXES
from trueface.config.schema import DataConfig
from trueface.predict import expand_inputs
from trueface.storage import is_uri, open_filesystem
from trueface.thresholds import fetch_checkpoint

SCHEMA = pa.schema([("path", pa.string()), ("p_generated", pa.float64()), ("p_calibrated", pa.float64()),
                    ("label", pa.string()), ("threshold", pa.float64()), ("error", pa.string())])
BATCH = 32


class Scorer:
    """A Ray Data actor: the checkpoint's predictor, loaded once; scores batches of file bytes."""

    def __init__(self, checkpoint: str, weights: str, domain: str | None, threads: int, scheme: str = "") -> None:
        import torch

        from trueface.predict import Predictor

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        # a URI is fetched by each actor, on its own node, with the thresholds file beside it
        self.predictor = Predictor.from_checkpoint(fetch_checkpoint(checkpoint, DataConfig().cache_dir), weights,
                                                   domain=domain)
        self.scheme = scheme  # "s3://" for a bucket: pyarrow's paths have none

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[int, tuple] = {}
        loaded = []
        for i, (path, data) in enumerate(zip(batch["path"], batch["bytes"])):
            path = f"{self.scheme}{path}"
            try:
                loaded.append((i, str(path), self.predictor.load_bytes(bytes(data), str(path))))
            except ImageReadError as exc:
                rows[i] = (str(path), None, None, "error", self.predictor.threshold, str(exc))
        for (i, path, _), p in zip(loaded, self.predictor.score_loaded([(path, x) for _, path, x in loaded])):
            rows[i] = (path, p.probability, p.calibrated, p.label, self.predictor.threshold, "")
        ordered = [rows[i] for i in range(len(rows))]
        return {name: [r[k] for r in ordered] for k, name in enumerate(SCHEMA.names)}


def list_images(location: str) -> tuple[list[str], object | None]:
    """The image files under a folder or URI (sorted), and the pyarrow filesystem of a URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        root = Path(location)
        if not root.is_dir():
            raise SystemExit(f"error: --input {location}: not a folder")
        return [str(p) for p in expand_inputs([root])], None
    fs, base = open_filesystem(location, "--input")
    infos = fs.get_file_info(pafs.FileSelector(base.rstrip("/"), recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and Path(i.path).suffix.lower() in IMAGE_SUFFIXES), fs


def run(checkpoint: str, location: str, out: Path, weights: str = "ema", domain: str | None = None,
        address: str | None = None) -> int:
    """Score every image under ``location`` into ``out``; 1 when any could not be read."""
    from jobs.common import init_ray
    from trueface.checkpoint import load_checkpoint
    from trueface.config import from_dict
    from trueface.predict import Predictor

    local_ckpt = fetch_checkpoint(checkpoint, DataConfig().cache_dir)
    state = load_checkpoint(local_ckpt)
    cfg = from_dict(state["config"])
    # built here once too: a thresholds file or --domain it refuses stops the job with its message
    # before any actor starts, and the console says which threshold and temperature label the rows
    predictor = Predictor.from_state(state, local_ckpt, weights, "cpu", domain=domain)
    del state
    print(predictor.describe_labelling(weights), file=sys.stderr)
    del predictor
    paths, fs = list_images(location)
    if not paths:
        raise SystemExit(f"error: no images found under {location}")
    init_ray(address, cfg, num_cpus=local_cpus())
    failed = score_paths(checkpoint if is_uri(checkpoint) else local_ckpt, paths, fs, out, weights, domain, location)
    return 1 if failed else 0


def local_cpus() -> int:
    """A local Ray's logical CPUs: one per core for the actors, plus one for the reading tasks
    and the driver (actor_pool leaves one free), as a local search adds one for its trials."""
    return (os.cpu_count() or 1) + 1


def actor_pool() -> tuple[int, int]:
    """(actors, the cluster's GPUs): one actor per GPU; on CPUs one per core but one, left to the
    reading tasks and the driver."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return gpus or max(1, int(resources.get("CPU", 1)) - 1), gpus


def score_paths(checkpoint: str | Path, paths: list[str], fs, out: Path, weights: str = "ema",
                domain: str | None = None, source: str = "") -> int:
    """Score ``paths`` (in ``fs``, a pyarrow filesystem, or local) into ``out`` on a running Ray with
    ``checkpoint`` (a path every node can read, or a URI each actor fetches); returns how many could
    not be read."""
    import ray

    scheme = source.split("://")[0] + "://" if fs is not None else ""
    actors, gpus = actor_pool()
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
    location = str(checkpoint) if is_uri(checkpoint) else str(Path(checkpoint).absolute())
    ds = ds.map_batches(Scorer, fn_constructor_kwargs={"checkpoint": location,
                                                       "weights": weights, "domain": domain, "threads": 1,
                                                       "scheme": scheme},
                        batch_size=BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    print(f"scoring {len(paths)} images from {source or 'the files given'} on {actors} Ray Data actor(s) "
          f"({'1 GPU' if gpus else '1 CPU'} each)", file=sys.stderr, flush=True)
    failed, started = 0, time.time()
    with atomic_open(out) as f, pq.ParquetWriter(f, SCHEMA) as writer, \
            tqdm(total=len(paths), unit="img", desc="scoring", file=sys.stderr) as bar:
        for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
            table = batch.select(SCHEMA.names).cast(SCHEMA)
            writer.write_table(table)
            failed += sum(1 for e in table.column("error").to_pylist() if e)
            bar.update(table.num_rows)
    elapsed = time.time() - started
    print(f"{len(paths) - failed} scored, {failed} unreadable in {elapsed:.1f} s "
          f"({len(paths) / elapsed:.1f} img/s) -> {out}", file=sys.stderr)
    return failed
