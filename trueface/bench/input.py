"""ms per image per core of the input path against the naive one: ``python -m jobs.benchmark input``.

Usage::

    python -m jobs.benchmark input                                          # generated JPEGs
    python -m jobs.benchmark input --data-root ../shared/data/faces140k-mini  # real JPEGs
    python -m jobs.benchmark input --quick                                  # 8 images, 1 repeat: seconds

Every figure is the time to turn one JPEG file into what the model's batch gets, on ONE core
(``torch.set_num_threads(1)``, one process, images one after another): the DataLoader runs one
such worker per core, so ms per image per core is what sets how many cores a GPU needs. Each
figure is the median of a few repeats over the same images; a warm-up pass over the first images
is not timed. Project and reference alternate within each repeat, so a burst of load from another
process on this shared machine hits both. The objects the process holds when timing starts are
frozen for the collector (``trueface.host_memory.frozen_heap``), as the loader's workers freeze
what they inherit: otherwise a full collection over torch's heap (125-190 ms) lands on whichever
side runs at that moment, about a pass over 32 images.

Rows:

- Stage I (224 px) from 256 and 512 px JPEGs, light and strong; Stage II (1024 px) from 1024 px
  JPEGs, strong. The project's side is ``load_rgb`` at the decode size training uses
  (``trueface.inference.decode_size``: a power-of-two reduce of the 512s) then ``TrainTransform``
  with the ``paper`` preset's stage config (``augment.device: cpu``); the "CPU side with
  augment.device gpu" rows are the same decode then ``Uint8TrainTransform`` (crop, flip,
  to uint8: the rest, RandAugment included, runs batched on the GPU). The reference is
  ``trueface.bench.naive`` (full-size decode, every strong op always on, per sample, float on the
  CPU). Stage I 256 strong must be >= 3x faster; Stage II's CPU side with augment.device gpu
  >= 4x (issue 11). The "data.prepared uint8" rows are the strong paths reading the prepared
  cache (trueface.data.prepared, built before timing) instead of decoding each JPEG.
- decode: ``load_rgb`` (PIL) against torchvision.io.decode_jpeg (ending in the same PIL image, as
  ``load_rgb`` would have to return it) on 256 and 1024 px JPEGs, full size and with the reduce to
  Stage I's decode size; and that reduce against ``Image.draft`` (libjpeg's DCT scaling, which
  training does not use: trueface.data.decode explains why). The notes say whether torchvision's
  pixels equal PIL's.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from trueface.augment import TrainTransform
from trueface.augment_device import Uint8TrainTransform
from trueface.bench.naive import NaivePipeline
from trueface.bench.report import Bench, Row, machine_context, torch_threads
from trueface.config import Config, load_config
from trueface.config.schema import StageConfig
from trueface.data.decode import load_rgb, reduce_for
from trueface.data.layout import Sample
from trueface.data.prepared import PreparedImages, build_prepared
from trueface.host_memory import frozen_heap
from trueface.inference import decode_size
from trueface.predict import expand_inputs

#: images per size and repeats: the whole part in about 1-2 minutes on a 2-core machine
FULL = {"images": {256: 32, 512: 24, 1024: 8}, "repeats": 3}
QUICK = {"images": {256: 8, 512: 8, 1024: 3}, "repeats": 1}
WARMUP_IMAGES = 2  # first calls build caches (PIL plugins, torchvision kernels): timed by no one
GENERATED_QUALITY = 75  # as faces140k-mini
UPSCALED_QUALITY = 90
STAGE_I_TARGET = 3.0  # Stage I 256 -> 224 strong: the project >= 3x faster than the naive path
STAGE_II_GPU_SIDE_TARGET = 4.0  # Stage II's CPU side with augment.device gpu <= 1/4 of the naive path
SEED = 0

Pipeline = Callable[[Path], object]


def run(args: argparse.Namespace) -> Bench:
    size = bench_size(args)
    cfg = load_config("paper")
    random.seed(SEED)
    torch.manual_seed(SEED)
    work = Path(tempfile.mkdtemp(prefix="trueface-bench-input-"))
    try:
        images, source = bench_images(args.data_root, size["images"], work)
        bench = Bench("input", context={**machine_context(), "images": source["text"],
                                        "counts": {s: len(p) for s, p in images.items()},
                                        "repeats": size["repeats"], "figures": "ms per image on one core",
                                        "config": "paper preset"})
        with torch_threads(1), _quiet_torchvision_io(), frozen_heap():  # as in a loader worker
            print(f"input: {source['text']}; {size['repeats']} repeat(s), one core", flush=True)
            add_augment_rows(bench, cfg, images, size["repeats"], source, work)
            add_decode_rows(bench, images, size["repeats"], cfg.stage1.image_size)
        return bench
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_size(args: argparse.Namespace) -> dict:
    size = {"images": dict((QUICK if getattr(args, "quick", False) else FULL)["images"]),
            "repeats": (QUICK if getattr(args, "quick", False) else FULL)["repeats"]}
    if getattr(args, "images", None) is not None:
        if args.images < 1:
            raise SystemExit(f"input: --images must be >= 1, got {args.images}")
        size["images"] = {s: args.images for s in size["images"]}
    return size


# --- images -----------------------------------------------------------------------------------


LOWER_IMAGES = "lower --images or point --data-root at a bigger set"  # where --images sets how many files


def bench_images(data_root: Path | None, counts: dict[int, int], work: Path, part: str = "input",
                 too_few: str = LOWER_IMAGES) -> tuple[dict[int, list[Path]], dict]:
    """{side: JPEG paths} and where they came from. Real images are used as they are where they
    already have that side (faces140k-mini's 256s), else resized once (LANCZOS, JPEG q90).
    ``part`` and ``too_few``: as ``real_jpegs``."""
    if data_root is None:
        images = {s: generated_jpegs(work / f"gen{s}", s, n) for s, n in counts.items()}
        return images, {"text": f"generated smooth random JPEGs (q{GENERATED_QUALITY})", "resized": {}}
    files = real_jpegs(data_root, max(counts.values()), part, too_few)
    images, resized = {}, {}
    for side, n in counts.items():
        picked = files[:n]
        if all(_is_square_jpeg(p, side) for p in picked):
            images[side] = picked
        else:
            images[side] = [_resized_copy(p, side, work / f"real{side}" / f"{i:04d}.jpg") for i, p in enumerate(picked)]
            resized[side] = (f"{n} of {data_root.name}'s images resized once to {side} px with PIL LANCZOS and saved "
                             f"as JPEG q{UPSCALED_QUALITY} in a temp dir")
    return images, {"text": f"real JPEGs from {data_root}", "resized": resized}


def generated_jpegs(folder: Path, side: int, count: int, seed: int = SEED) -> list[Path]:
    """``count`` smooth random RGB images (random 8x8 colours, bicubic-upscaled), JPEG q75."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        path = folder / f"{i:04d}.jpg"
        small.resize((side, side), Image.BICUBIC).save(path, "JPEG", quality=GENERATED_QUALITY)
        paths.append(path)
    return paths


def real_jpegs(data_root: Path, count: int, part: str = "input", too_few: str = LOWER_IMAGES) -> list[Path]:
    """``count`` JPEGs spread evenly over the train split (the whole root where the train split holds
    fewer, or has no folder of its own), so both classes come in. Where there are fewer, a one-line
    exit that starts with ``part`` and ends with ``too_few``, that part's advice."""
    if not data_root.is_dir():
        raise SystemExit(f"{part}: --data-root {data_root} is not a folder; give a data set laid out as "
                         "{train,valid,test}/{REAL,FAKE}/ or leave it out to use generated images")

    def jpegs(folder: Path) -> list[Path]:
        return [p for p in expand_inputs([folder]) if p.suffix.lower() in (".jpg", ".jpeg")]

    base = data_root / "train"
    files = jpegs(base) if base.is_dir() else []
    if len(files) < count:
        base, files = data_root, jpegs(data_root)
    if len(files) < count:
        raise SystemExit(f"{part}: {base} holds {len(files)} JPEG files, the benchmark needs {count}; {too_few}")
    step = len(files) / count
    picked = [files[int(i * step)] for i in range(count)]
    for path in picked:
        check_readable(path)
    return picked


def check_readable(path: Path) -> None:
    """A one-line exit naming ``path`` where PIL cannot decode it (an empty or truncated download,
    another format under a .jpg name), before any part times it: not a traceback from inside
    a measurement (or a loader worker)."""
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 -- UnidentifiedImageError, truncated data, decompression bombs
        raise SystemExit(f"--data-root: {path} cannot be read as an image ({type(exc).__name__}: {exc}); "
                         "remove or replace it, or point --data-root at another set") from None


def _is_square_jpeg(path: Path, side: int) -> bool:
    with Image.open(path) as img:
        return img.format == "JPEG" and img.size == (side, side)


def _resized_copy(src: Path, side: int, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as img:
        img.convert("RGB").resize((side, side), Image.LANCZOS).save(dst, "JPEG", quality=UPSCALED_QUALITY)
    return dst


# --- timing -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    # torchvision 0.29 warns on every encode/decode call that torchvision.io's codecs are
    # deprecated; said once in the decode rows' note instead of once per image.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


def per_image_ms(pipelines: dict[str, Pipeline], paths: list[Path], repeats: int) -> dict[str, float]:
    """Median over ``repeats`` of each pipeline's ms per image over ``paths``; the pipelines
    alternate inside each repeat, after a warm-up pass over the first images."""
    for fn in pipelines.values():
        for p in paths[:WARMUP_IMAGES]:
            fn(p)
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            for p in paths:
                fn(p)
            times[name].append((time.perf_counter() - start) * 1e3 / len(paths))
    return {name: statistics.median(t) for name, t in times.items()}


# --- augmentation rows ------------------------------------------------------------------------


def project_pipeline(cfg: Config, stage: StageConfig, strong: bool, gpu_side: bool = False,
                     load: Callable[[Path, int | None], Image.Image] = load_rgb) -> Pipeline:
    """The training path: ``load_rgb`` (or ``load``: the prepared cache) at the stage's decode size,
    then ``TrainTransform`` (or, for augment.device gpu, its CPU side ``Uint8TrainTransform``) in
    its light or strong epochs."""
    tf = (Uint8TrainTransform if gpu_side else TrainTransform)(stage.image_size, light_epochs=1, cfg=stage.augment)
    tf.set_epoch(1 if strong else 0)
    size = decode_size(cfg, stage.image_size)
    return lambda path: tf(load(path, size))


def prepared_cache(cfg: Config, stage: StageConfig, paths: list[Path], work: Path) -> PreparedImages:
    """The images prepared as ``data.prepared: uint8`` prepares them (built before timing: a run
    pays for it once, not per epoch)."""
    size = decode_size(cfg, stage.image_size)
    build_prepared([Sample(str(p), 0, "bench", "train") for p in paths], size, work / "prepared", progress=False)
    return PreparedImages.open(work / "prepared", size)


def add_augment_rows(bench: Bench, cfg: Config, images: dict[int, list[Path]], repeats: int, source: dict,
                     work: Path) -> None:
    cases = [("Stage I", cfg.stage1, 256), ("Stage I", cfg.stage1, 512), ("Stage II", cfg.stage2, 1024)]
    for label, stage, side in cases:
        if side not in images:
            continue
        what = f"{label} JPEG {side} -> {stage.image_size}"
        size_note = source["resized"].get(side, "")
        naive_light, naive_strong = (NaivePipeline(stage.image_size, stage.augment, strong=s) for s in (False, True))
        if label == "Stage I":
            ms = per_image_ms({"project": project_pipeline(cfg, stage, strong=False), "naive": naive_light},
                              images[side], repeats)
            bench.add(Row(f"{what} light", ms["project"], ms["naive"], "ms/img", note=_join(
                size_note, "both resize, centre-crop, flip and normalise; the project reduces the decoded image "
                           "by a power of two first where it is at least twice the training size")))
            print(f"  {what} light done", flush=True)
        cache = prepared_cache(cfg, stage, images[side], work)
        ms = per_image_ms({"cpu": project_pipeline(cfg, stage, strong=True),
                           "gpu_side": project_pipeline(cfg, stage, strong=True, gpu_side=True),
                           "cpu_prepared": project_pipeline(cfg, stage, strong=True, load=cache),
                           "gpu_side_prepared": project_pipeline(cfg, stage, strong=True, gpu_side=True, load=cache),
                           "naive": naive_strong}, images[side], repeats)
        # Stage I's 3x holds the path a GPU run takes (augment.device auto = gpu on CUDA) and the
        # per-sample one a CPU run takes alike; Stage II's 4x is the GPU run's CPU side.
        strong_target = STAGE_I_TARGET if (label, side) == ("Stage I", 256) else None
        bench.add(Row(f"{what} strong", ms["cpu"], ms["naive"], "ms/img", strong_target, note=_join(
            size_note, "augment.device cpu: per-op probabilities of the paper preset against every op always on")))
        gpu_target = STAGE_II_GPU_SIDE_TARGET if label == "Stage II" else strong_target
        bench.add(Row(f"{what} strong, CPU side with augment.device gpu", ms["gpu_side"], ms["naive"], "ms/img",
                      gpu_target, note=_join(size_note, "decode + crop, flip to uint8; RandAugment, colour, JPEG, "
                                                        "blur, noise, normalisation and erasing run batched on the GPU")))
        for key, path_name in (("cpu_prepared", "augment.device cpu"), ("gpu_side_prepared", "CPU side with augment.device gpu")):
            bench.add(Row(f"{what} strong, {path_name}, data.prepared uint8", ms[key], ms["naive"], "ms/img", note=_join(
                size_note, "the same path reading the decoded pixels from the prepared cache's memory-mapped shard "
                           "(bit-identical to the decode) instead of decoding the JPEG")))
        print(f"  {what} strong done", flush=True)


# --- decode rows ------------------------------------------------------------------------------


def tv_decode(path: Path) -> torch.Tensor:
    data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB)


def tv_decode_pil(path: Path, size: int | None = None) -> Image.Image:
    """torchvision's decode, handed back as ``load_rgb`` hands its image (PIL, then the same reduce)."""
    return reduce_for(Image.fromarray(tv_decode(path).permute(1, 2, 0).numpy()), size)


def draft_decode(path: Path, size: int) -> Image.Image:
    """libjpeg's DCT-domain downscale to the smallest 1/2^k size >= ``size`` (not used in training)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        return img.convert("RGB")


def max_pixel_diff(paths: list[Path]) -> int:
    """Largest |PIL - torchvision| over every pixel of ``paths`` (0: bit-identical decodes)."""
    worst = 0
    for p in paths:
        pil = np.asarray(load_rgb(p), dtype=np.int16)
        tv = tv_decode(p).permute(1, 2, 0).numpy().astype(np.int16)
        worst = max(worst, int(np.abs(pil - tv).max()) if pil.shape == tv.shape else 255)
    return worst


def add_decode_rows(bench: Bench, images: dict[int, list[Path]], repeats: int, stage1_size: int) -> None:
    for side in (256, 1024):
        if side not in images:
            continue
        paths = images[side]
        ms = per_image_ms({"pil": load_rgb, "tv": tv_decode_pil, "tv_tensor": tv_decode}, paths, repeats)
        diff = max_pixel_diff(paths)
        bench.add(Row(f"decode JPEG {side} full: PIL load_rgb vs torchvision decode_jpeg", ms["pil"], ms["tv"], "ms/img",
                      note=_decode_note(ms, diff, len(paths))))
    if 1024 in images:
        paths, reduced = images[1024], reduce_size(1024, stage1_size)
        ms = per_image_ms({"reduce": lambda p: load_rgb(p, stage1_size),
                           "tv": lambda p: tv_decode_pil(p, stage1_size),
                           "draft": lambda p: draft_decode(p, stage1_size)}, paths, repeats)
        bench.add(Row(f"decode JPEG 1024 -> {reduced} (decode size {stage1_size}): load_rgb reduce vs torchvision "
                      "decode_jpeg + the same reduce", ms["reduce"], ms["tv"], "ms/img",
                      note="torchvision has no DCT scaling: it decodes at full size like PIL, then the same reduce"))
        bench.add(Row(f"decode JPEG 1024 -> {reduced}: load_rgb reduce vs Image.draft (not used in training)",
                      ms["reduce"], ms["draft"], "ms/img", note=(
                          f"draft is {ms['reduce'] / ms['draft']:.1f}x faster but downscales inside libjpeg, "
                          "for JPEGs only: reals and fakes of different formats would be shrunk by different "
                          "filters (DESIGN.md flaw 5), so training keeps the same reduce for every format")))


def reduce_size(side: int, decode_to: int) -> int:
    """The side ``load_rgb`` reduces a square ``side`` image to for ``decode_to``."""
    return reduce_for(Image.new("L", (side, side)), decode_to).size[0]


def _decode_note(ms: dict[str, float], diff: int, count: int) -> str:
    same = "bit-identical pixels" if diff == 0 else f"pixels differ by up to {diff} levels"
    speed = ms["pil"] / ms["tv"]
    verdict = ("trueface.data.decode keeps PIL: torchvision.io's codecs are deprecated since torchvision 0.29 "
               "(a DeprecationWarning every call, removal announced, TorchCodec not installed), and "
               "load_rgb's EXIF, mode and damaged-file handling would need a second path"
               if diff == 0 and speed > 1.2 else "not both faster and identical: trueface.data.decode keeps PIL")
    return (f"{same} on all {count} images; torchvision {speed:.2f}x PIL's speed including the copy into a PIL "
            f"image ({ms['tv_tensor']:.3g} ms to a tensor alone); {verdict}")


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
