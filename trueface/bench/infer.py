"""Scoring img/s of ``jobs.predict``'s predictor against a naive per-image one: ``python -m jobs.benchmark infer``.

Usage::

    python -m jobs.benchmark infer                                    # a fresh ResNet-50, 128 px, generated JPEGs
    python -m jobs.benchmark infer --checkpoint runs/demo/stage2/best.pt --data-root ../shared/data/faces140k-mini
    python -m jobs.benchmark infer --quick                            # 8 images at 64 px: seconds

Both sides score the same JPEG files with the same model object, threads, precision and test-time
flip, so the row measures the serving path and nothing else:

- project: ``trueface.predict.Predictor.score`` (what ``jobs.predict`` runs): ``load_rgb`` with the
  power-of-two reduce, the eval transform, batches of ``--batch-size`` in channels_last, the
  runtime's autocast, the mirrored pass in the same batch call;
- reference: the loop a first script writes: full-size PIL decode (no reduce), the same eval
  transform, one image per forward pass (and one for its mirror).

The two alternate over the repeats (A B, B A, ...) and each side's figure is the median. The
note gives the largest difference between the two sides' probabilities (the decode reduce makes
them differ slightly: the project scores the pixels training used).

With ``--ray`` (``jobs.bench_infer_ray`` hands in ``ray_rate``; the library never imports Ray) two
more rows, on the same files and checkpoint (a fresh model is saved as one first):

- "jobs.predict --ray actors (warm) vs jobs.predict": img/s of ``jobs.predict --ray``'s scoring
  actors (the class its Ray Data ``map_batches`` runs, one per core but one, or per GPU) sent the
  files' bytes in batches of ``--batch-size``, the reference's: once each actor has scored a batch
  untimed, their passes alternate with the plain predictor's (A B, B A, ...; as many rounds as
  the first row's) and each side's figure is the median of its passes in those rounds, so the
  reference here is measured beside the same running Ray, not taken from the first row. On CPUs
  the actors share the reference's torch threads between them (each at least one; the note says
  how many each side ran). Start-up is not in it, as the reference's model load is not;
- "jobs.predict --ray actors start-up": seconds from asking for the actors to every one of them
  holding its model, lower is better, no target: paid once per job, amortised over millions of
  images and not over the benchmark's few dozen. ``ray.init`` is left out of both and printed.

A Ray failure costs only these rows: it is listed under "Not measured" and the exit status is 1.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trueface.augment import eval_transform
from trueface.bench.input import real_jpegs, generated_jpegs
from trueface.bench import report
from trueface.bench.report import Bench, Row, alternate_rates, machine_context, ray_attempt
from trueface.checkpoint import CheckpointError, save_checkpoint
from trueface.config import load_config, to_dict
from trueface.config.schema import DataConfig
from trueface.inference import decode_size
from trueface.model import build_model, fake_probability
from trueface.precision import Runtime
from trueface.predict import Predictor
from trueface.storage import StorageError
from trueface.thresholds import ThresholdsError, fetch_checkpoint

FULL = {"images": 48, "image_size": 128, "batch_size": 16, "repeats": 3}
QUICK = {"images": 8, "image_size": 64, "batch_size": 4, "repeats": 1}
JPEG_SIDE = 256  # generated files: the 140K set's size


RAY_ROW = "jobs.predict --ray actors (warm) vs jobs.predict"
STARTUP_ROW = "jobs.predict --ray actors start-up"
RAY_FIX = f"{report.RAY_FIX}, or leave out --ray"


@dataclass(frozen=True)
class RayFigures:
    """What ``jobs.bench_infer_ray`` measures (``RayRate``)."""

    rate: float  # img/s of the warm actors, the median of the timed passes
    reference: float  # img/s of the plain predictor, the median of its passes alternating with the actors'
    startup_s: float  # from asking for the actors to each holding its model
    note: str  # how measured


#: (checkpoint file, image paths, size: batch_size and repeats as the reference's, one pass of the
#: reference over the paths, to alternate with the actors' passes) -> RayFigures
RayRate = Callable[[Path, Sequence[Path], dict, Callable[[], object]], RayFigures]


def run(args: argparse.Namespace, ray_rate: RayRate | None = None) -> Bench:
    size = bench_size(args)
    work = Path(tempfile.mkdtemp(prefix="trueface-bench-infer-"))
    try:
        if args.data_root is None:
            paths, source = generated_jpegs(work, JPEG_SIDE, size["images"]), f"{size['images']} generated {JPEG_SIDE} px JPEGs"
        else:
            paths = real_jpegs(args.data_root, size["images"], "infer")
            source = f"{size['images']} JPEGs from {args.data_root}"
        checkpoint = local_checkpoint(args.checkpoint)
        predictor, model_text = load_predictor(checkpoint, size)
        bench = _measure(predictor, paths, size, f"{model_text}; {source}")
        if ray_rate is not None:
            checkpoint = checkpoint or save_fresh_checkpoint(predictor, work / "fresh.pt")
            add_ray_rows(bench, ray_attempt(bench, RAY_ROW, lambda: ray_rate(
                checkpoint, paths, size, predictor_pass(predictor, paths)), RAY_FIX))
        return bench
    finally:
        shutil.rmtree(work, ignore_errors=True)


def add_ray_rows(bench: Bench, ray: RayFigures | None) -> None:
    """The warm actors' rate against the plain predictor's in the same rounds, and their start-up
    on its own; nothing where the Ray run failed (``ray_attempt`` listed it)."""
    if ray is None:
        return
    bench.add(Row(RAY_ROW, ray.rate, ray.reference, "img/s", note=ray.note))
    bench.add(Row(STARTUP_ROW, ray.startup_s, None, "s", lower_is_better=True, no_target="none: once per job",
                  note="actors started and the checkpoint loaded in each, before the first batch; the plain "
                       "predictor's load is not timed either"))


def bench_size(args: argparse.Namespace) -> dict:
    size = dict(QUICK if getattr(args, "quick", False) else FULL)
    for key in ("images", "image_size", "batch_size"):
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    if size["images"] < 1 or size["batch_size"] < 1 or size["image_size"] < 32:
        raise SystemExit(f"infer: --images and --batch-size must be >= 1 and --image-size >= 32; got "
                         f"{size['images']}, {size['batch_size']} and {size['image_size']}")
    return size


CHECKPOINT_HELP = ("give a checkpoint file a training run wrote (or its s3:// / gs:// URI), or leave --checkpoint "
                   "out to time a fresh model")


def local_checkpoint(location: str | Path | None) -> Path | None:
    """A local file for ``--checkpoint`` (a path, or a URI's file and its thresholds staged as
    ``jobs.predict`` stages them); a one-line exit where it cannot be had."""
    if location is None:
        return None
    try:
        return fetch_checkpoint(str(location), DataConfig().cache_dir)
    except (CheckpointError, ThresholdsError, StorageError, OSError) as exc:
        raise SystemExit(f"infer: --checkpoint {location}: {exc}; {CHECKPOINT_HELP}") from None


def load_predictor(checkpoint: Path | None, size: dict) -> tuple[Predictor, str]:
    """The checkpoint's predictor (its image size, TTA and decode as trained), else a fresh
    random-init ResNet-50 behind the demo preset's settings at ``size['image_size']``. A
    checkpoint that cannot be read (missing, not a checkpoint, stale thresholds beside it) is a
    one-line exit, as in ``jobs.predict``."""
    if checkpoint is not None:
        try:
            predictor = Predictor.from_checkpoint(checkpoint)
        except (CheckpointError, ThresholdsError) as exc:
            raise SystemExit(f"infer: --checkpoint {checkpoint}: {exc}; {CHECKPOINT_HELP}") from None
        predictor.batch_size = size["batch_size"]
        return predictor, f"checkpoint {checkpoint} ({predictor.image_size} px)"
    cfg = load_config("demo", ["model.weights=none"])
    runtime = Runtime.create("auto", cfg.runtime.precision)
    with torch.random.fork_rng(devices=[]):  # the same weights in every run, whatever ran before
        torch.manual_seed(0)
        model = build_model(cfg.model)
    model = model.to(runtime.device, memory_format=torch.channels_last).eval()
    image_size = size["image_size"]
    return (Predictor(model, image_size, 0.5, runtime, cfg.eval.hflip_tta, size["batch_size"],
                      decode_size=decode_size(cfg, image_size)),
            f"fresh ResNet-50 (random init) at {image_size} px")


def save_fresh_checkpoint(predictor: Predictor, path: Path) -> Path:
    """The fresh model as a Stage I checkpoint that Predictor.from_checkpoint reads back as it is."""
    cfg = load_config("demo", ["model.weights=none", f"stage1.image_size={predictor.image_size}",
                               f"eval.hflip_tta={str(predictor.hflip).lower()}"])
    state = predictor.model.state_dict()
    save_checkpoint(path, {"model": state, "ema": state, "stage": 1, "config": to_dict(cfg)})
    return path


class NaivePredictor:
    """Path -> P(generated), one image per forward pass, full-size decode, same model and TTA."""

    def __init__(self, predictor: Predictor) -> None:
        self.model, self.runtime, self.hflip = predictor.model, predictor.runtime, predictor.hflip
        self.transform = eval_transform(predictor.image_size)  # the same resize and crop, on the full image

    @torch.no_grad()
    def __call__(self, path: Path) -> float:
        with Image.open(path) as img:
            x = self.transform(img.convert("RGB"))[None].to(self.runtime.device)
        with self.runtime.autocast():
            p = fake_probability(self.model(x))
            if self.hflip:
                p = (p + fake_probability(self.model(torch.flip(x, dims=[3])))) / 2
        return float(p[0])


def predictor_pass(predictor: Predictor, paths: Sequence[Path]) -> Callable[[], list[float]]:
    """One pass of ``jobs.predict``'s predictor over ``paths``, to time: every file's probability
    (``score`` is a generator: a pass that did not read it through would score nothing)."""
    return lambda: [p.probability for p in predictor.score(paths)]


def _measure(predictor: Predictor, paths: Sequence[Path], size: dict, context_text: str) -> Bench:
    naive = NaivePredictor(predictor)
    sides: dict[str, Callable[[], list[float]]] = {
        "project": predictor_pass(predictor, paths),
        "naive": lambda: [naive(p) for p in paths],
    }
    print(f"infer: {context_text}; batch {size['batch_size']}, {predictor.runtime.device} "
          f"{predictor.runtime.precision}, flip TTA {'on' if predictor.hflip else 'off'}, "
          f"{torch.get_num_threads()} torch threads, {size['repeats']} repeat(s)", flush=True)
    for fn in sides.values():  # warm-up: kernels, allocator, PIL plugins
        fn()
    rates, scores = alternate_rates(sides, len(paths), size["repeats"])
    diff = max(abs(a - b) for a, b in zip(scores["project"], scores["naive"]))
    bench = Bench("infer", context={**machine_context(), "model": context_text, "images": len(paths),
                                    "batch": size["batch_size"], "flip_tta": predictor.hflip,
                                    "precision": predictor.runtime.precision, "repeats": size["repeats"]})
    bench.add(Row("jobs.predict vs naive per-image predictor", statistics.median(rates["project"]),
                  statistics.median(rates["naive"]), "img/s", note=(
                      f"median of {size['repeats']} alternating passes over the same {len(paths)} files, in one "
                      f"process; probabilities differ by at most {diff:.2g} (the project reduces large images by "
                      "a power of two before the resize, as training did)")))
    return bench
