"""The one-command GPU check (issue 11 §3): ``python -m jobs.benchmark gpu``.

Usage::

    python -m jobs.benchmark gpu                          # on a GPU: 142 s on an H200 (README), no Ray, no download
    python -m jobs.benchmark gpu --data-root ../shared/data/faces140k-mini   # real JPEGs instead of generated
    python -m jobs.benchmark gpu --quick                  # fewer steps (CPU: seconds, for CI)
    python -m jobs.benchmark gpu --prepared               # train from the prepared uint8 cache (data.prepared)
    python -m jobs.benchmark gpu --compile                # runtime.compile=true: torch.compile's rate beside eager's
    python -m jobs.benchmark gpu --trace                  # also a profiler trace of 5 engine steps per stage
    bash docker/gpu_check.sh                              # nvidia-smi, then this under a 6-minute timeout

For Stage I (224 px from 256 px JPEGs at q75, as the 140K set) and Stage II (1024 px from 1024 px
JPEGs) of the ``paper`` preset, with ``model.weights=none`` (nothing downloaded), it times the REAL
engine path a training run takes: ``_build_state`` (model, EMA, optimizer, ``Runtime``),
``training_data`` (dataset, balanced sampler, ``DeviceAugment``), the epoch's DataLoader with
``data.loader_workers`` = cores - 1 (at most 31), and ``train_one_epoch``, in the first strong epoch. A few
hundred JPEG files are cycled by the sampler (``samples_per_epoch``), so every step decodes from
disk. Only the steps after the warm-up are timed, between two CUDA synchronisations.

Beside it, the same engine step (``train_one_epoch``, same state) on batches already on the device,
no loader and no augmentation: the compute ceiling. Rows per stage:

- "training (engine)": img/s; on CUDA Stage I >= 3500 and Stage II >= 170 (issue 11);
- "input path vs model alone": engine / model alone; Stage I >= 0.90 on CUDA: the input path never
  the limit, i.e. the GPU busy at least 90% of the time it would be with free input;
- the targets judge only a full run at the paper's sizes (``no_target_why``): ``--quick``, a small
  ``--images`` (its timed steps mostly served from the batches prepared during the warm-up),
  ``--image-size`` and ``--batch-size`` print the figures with the target column saying why none
  applies;
- with ``--compile`` (``runtime.compile=true``), "model alone, compiled vs eager": the model-alone
  figure (compiled) against the same state's bare module, timed right after it, so one run says
  what compiling buys; the engine row's note gives the first step's seconds, which hold the compiling;
- "GPU busy (nvml)": mean of ``torch.cuda.utilization()`` sampled every 0.2 s over the timed
  engine steps (Stage I >= 90%), where pynvml answers; otherwise the ratio row stands in;
- "peak GPU memory": ``torch.cuda.max_memory_allocated`` over the stage, GiB, no target;
- "loader alone" and "augmentation alone": what each part of the input path delivers by itself
  (the epoch's DataLoader drained with nothing else running; ``DeviceAugment`` on one of its
  batches already on the device), img/s, no target: where the engine falls short of the model
  alone, these say which part is the limit; the augmentation row's note also gives its host floor
  (the same ops on 16-px images: what Python, dispatch and launches alone cost a batch);
- with ``--trace``, a file per stage, ``bench-gpu/trace-stageN.json.gz``: torch.profiler's Chrome
  trace of 5 engine steps (host ops on every thread, CUDA kernels on every stream; open it in
  ui.perfetto.dev), and ``trace-stageN-ops.txt``, the ops' totals (the dearest are printed); on
  CUDA also a row "GPU busy (trace)", no target: the share of those steps' time some kernel or
  copy ran, from the trace (no pynvml needed), with the device time per step under each named
  range (augmentation, training step, optimizer, EMA) and per stream in its note
  (``trueface.bench.trace_gpu``);
- "decode, batched decode_jpeg vs PIL on one core": torchvision's batched ``decode_jpeg`` on the
  training device (nvJPEG on CUDA) against the workers' decode (``load_rgb``) on one core, img/s,
  no target: how many worker cores decoding on the GPU would stand in for (issue 11 asks for the
  measurement; training decodes in the workers, and a GPU decode would need the crop there too).

On a CPU the same code runs at small sizes (Stage I 64 px from 128 px JPEGs, Stage II 128 px from
256 px, batch 4, one loader worker, ``DeviceAugment`` forced on through ``training_data(on_device=
True)`` so the batched path runs) and sets no target: the targets apply on an H100, and a CPU
shares its cores between the loader, the augmentation and the model, so no ratio there means
what it means on a GPU.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from trueface.atomic import atomic_open, atomic_write_text
from trueface.augment_ahead import DEPTH as AHEAD_DEPTH
from trueface.augment_ahead import InputTimes
from trueface.bench.input import bench_images
from trueface.bench.report import Bench, Row, machine_context, torch_threads
from trueface.bench.trace_gpu import GpuTime, gpu_time, read_trace
from trueface.bench.traffic import H100_BYTES_PER_S, H200_BYTES_PER_S, Traffic, count_traffic
from trueface.config import Config, load_config, to_dict
from trueface.config.schema import StageConfig
from trueface.data.decode import load_rgb
from trueface.data.layout import Sample
from trueface.data.prepared import build_prepared
from trueface.distributed import DistInfo
from trueface.inference import decode_size
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.tensorboard import NullLogger
from trueface.train import (EpochAugment, TrainingData, TrainState, _build_state, _ProgressWindow, _seed_epoch,
                            _step_plan, train_one_epoch, train_step, training_data)


@dataclass(frozen=True)
class StageSize:
    jpeg: int  # side of the JPEG files on disk
    image: int  # the stage's training size
    batch: int
    warmup: int  # steps run before the clock starts (cuDNN's algorithm search, loader start-up)
    timed: int  # steps timed (fewer where MAX_TIMED_S runs out first)
    files: int  # distinct JPEG files the sampler cycles through


# The paper's sizes and batches; timed steps are raised on CUDA to cover the loader's prefetch
# queue (see plan_sizes). A few hundred files: more than the prefetch queue holds, few enough to
# write in seconds.
CUDA_FULL = {1: StageSize(256, 224, 200, 20, 300, 512), 2: StageSize(1024, 1024, 12, 10, 300, 256)}
CUDA_QUICK = {1: StageSize(256, 224, 200, 10, 60, 256), 2: StageSize(1024, 1024, 12, 5, 60, 128)}
CPU_FULL = {1: StageSize(128, 64, 4, 1, 3, 16), 2: StageSize(256, 128, 4, 1, 2, 16)}
CPU_QUICK = {1: StageSize(64, 32, 4, 1, 2, 8), 2: StageSize(128, 64, 4, 1, 2, 8)}
STAGE_NAMES = {1: "Stage I", 2: "Stage II"}

MAX_TIMED_S = 45.0  # per timed phase: four phases plus set-up stay under the 6-minute promise
MAX_PART_S = 10.0  # per input-path part (loader alone, augmentation alone): diagnostics, not targets
AUGMENT_REPEATS = 20  # DeviceAugment calls timed on one batch (after AUGMENT_WARMUP)
AUGMENT_WARMUP = 3
HOST_FLOOR_PX = 16  # augment_host_floor's image side: the smallest the tensor JPEG's 8x8 blocks and 4:2:0 take whole
STEP_REPEATS = 5  # DeviceAugment calls timed step by step (a synchronisation after each step)
PREFETCH_FACTOR = 2  # torch's DataLoader default, which trueface.train._train_loader keeps
PREFETCH_COVER = 10  # timed steps >= 10x the batches ready at the start (queued_batches): they flatter <= 10%
# A 1-GPU share of a big host (96 cores) would otherwise start 95 workers: their prefetch queue
# would ask for thousands of timed steps (MAX_TIMED_S cuts them, so it would flatter more than
# 10%) and their shared memory could fill a container's /dev/shm. 31 workers deliver Stage I's
# 3,500 img/s even at 8 ms an image each (a worker's share of it takes about 1.3 ms on the 2-core
# development CPU).
MAX_LOADER_WORKERS = 31
BUSY_PERIOD_S = 0.2
DISTINCT_BATCHES = 4  # model-alone batches cycled (each step a different tensor, little memory)
SEED = 0
# engine steps --trace runs before it records (at least, see trace_size), then records
TRACE_WARMUP, TRACE_STEPS = 2, 5
TRACE_TABLE_ROWS = 12

#: issue 11's floors on an H100 (the paper preset's sizes and batches, a full run: no_target_why)
RATE_TARGETS = {1: 3500.0, 2: 170.0}
RATIO_TARGET = {1: 0.90}  # Stage I: the input path costs at most 10% of the model's own speed
BUSY_TARGET = {1: 90.0}
NOT_FINISHED = "not finished (the run was stopped before this stage ended: gpu_check.sh's timeout, a signal)"
FIRST_STEP_WHY = "the loader's start, on CUDA cuDNN's algorithm search, with runtime.compile the compiling"
CPU_NOTE = "CPU at small sizes: the targets apply on an H100"
NO_TARGET_NOTE = (f"the targets apply at the paper's sizes over at least {PREFETCH_COVER}x as many timed steps as "
                  "batches prepared before the clock (a full run: no --quick, --image-size, --batch-size or small "
                  "--images)")


def run(args: argparse.Namespace) -> Bench:
    cuda = torch.cuda.is_available()
    cpus = available_cpus()
    workers = loader_workers(cuda, cpus)
    sizes = plan_sizes(args, cuda, workers)
    torch.manual_seed(SEED)
    work = Path(tempfile.mkdtemp(prefix="trueface-bench-gpu-"))
    try:
        cfg = bench_config(sizes, workers, work, prepared=getattr(args, "prepared", False),
                           compile_model=getattr(args, "compile", False))
        out = Outputs(getattr(args, "results_dir", None), getattr(args, "trace", False))
        if out.results_dir is not None:  # before anything slow: no earlier run's files may pass for this one's
            start_outputs(out.results_dir, sizes)
        images, source = stage_images(getattr(args, "data_root", None), sizes, work)
        if cfg.data.prepared != "none":
            prepare_images(cfg, sizes, images)
        with torch_threads(training_threads(cuda, cpus, workers)):
            return _measure(cfg, sizes, images, source, workers, cuda, work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class Outputs:
    """Where a run writes: ``results_dir``/bench-gpu/ gets bench.json and bench.md as the run starts
    (every stage listed as not finished) and again after each stage (so a run stopped by
    gpu_check.sh's timeout keeps the stages it finished, and says which it did not) and, with
    ``trace``, each stage's profiler trace. No ``results_dir``: nothing written here
    (``jobs.benchmark`` writes the table at the end)."""

    results_dir: Path | None = None
    trace: bool = False


def unfinished(stage: int) -> str:
    """The failure line a stage carries until it (and its trace) is done."""
    return f"{STAGE_NAMES[stage]}: {NOT_FINISHED}"


def start_outputs(results_dir: Path, sizes: dict[int, StageSize]) -> Path:
    """An earlier run's files out of ``results_dir``/bench-gpu/: its traces removed, and its
    bench.json and bench.md replaced (atomically) by this run's, with no rows and every stage not
    finished, so a run stopped before its first stage ends says so instead of leaving the earlier
    run's table to be read as its own."""
    out = Path(results_dir) / "bench-gpu"
    for pattern in ("trace-stage*.json*", "trace-stage*-ops.txt", ".trace-stage*.tmp"):
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    bench = Bench("gpu", context={"note": "started: no stage finished yet"},
                  failures=[unfinished(stage) for stage in sizes])
    return bench.write(results_dir)


def _measure(cfg: Config, sizes: dict[int, StageSize], images: dict[int, list[Path]], source: str,
             workers: int, cuda: bool, work: Path, out: Outputs = Outputs()) -> Bench:
    """The rows of both stages (and the files ``out`` asks for). A stage that fails is recorded in
    ``bench.failures`` and the other still runs (Stage II then starts from fresh weights)."""
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    augment = ("batched on cuda (augment.device auto)" if cuda
               else "batched on the CPU (forced: training_data(on_device=True))") + f", in {runtime.augment_dtype}"
    context = {**machine_context(), "images": source, "loader_workers": workers, "precision": runtime.precision,
               "augment": augment, "config": "paper preset, model.weights=none, first strong epoch",
               "data.prepared": cfg.data.prepared, "runtime.compile": cfg.runtime.compile,
               "sizes": {STAGE_NAMES[s]: f"{z.image} px from {z.jpeg} px JPEGs, batch {z.batch}, {z.warmup} warm-up "
                                         f"+ up to {z.timed} timed steps, {z.files} files" for s, z in sizes.items()}}
    if not cuda:
        context["note"] = CPU_NOTE
    bench = Bench("gpu", context=context, failures=[unfinished(stage) for stage in sizes])  # cleared as each ends

    def write() -> None:
        if out.results_dir is not None:
            bench.write(out.results_dir)

    print(f"gpu: {runtime.device} {runtime.precision}, {workers} loader worker(s), {source}; augmentation {augment}",
          flush=True)
    nvml = nvml_reader(runtime.device)  # probed once: the stages' busy samplers use this answer too
    if cuda:
        busy_unmeasured(bench, nvml)
    write()
    init_from = None
    for stage in (1, 2):
        name = STAGE_NAMES[stage]
        try:
            result = measure_stage(cfg, stage, sizes[stage], images[stage], init_from, cuda, bench.failed, nvml)
        except Exception as exc:  # noqa: BLE001 -- the other stage and the rows so far still count
            bench.failed(f"{name} (the whole stage)", exc)
            bench.failures.remove(unfinished(stage))  # ended: its failure says why it has no rows
            _free_cuda(cuda)
            if stage == 1:  # Stage II needs a Stage I checkpoint: fresh weights time the same
                init_from = save_stage1(build_model(cfg.model), cfg, work / "stage1.pt")
            write()
            continue
        add_rows(bench, stage, sizes[stage], result, cuda, workers)
        print(f"  {progress_line(stage, sizes[stage], result)}", flush=True)
        if out.trace and out.results_dir is not None:
            write()  # the stage's rows kept should its trace be cut off by the timeout (still "not finished")
            traced = diagnostic(f"{name} trace", bench.failed, None, lambda: trace_stage(
                cfg, stage, result.state, images[stage], sizes[stage], out.results_dir / "bench-gpu"))
            if traced is not None:
                bench.add(trace_row(name, traced))
        if stage == 1:  # Stage II starts from Stage I's EMA weights, as in a run (_initial_model)
            init_from = save_stage1(result.state.ema.module, cfg, work / "stage1.pt")
        result.state = None  # frees the model, optimizer and EMA before the next stage's
        _free_cuda(cuda)
        bench.failures.remove(unfinished(stage))
        write()  # a later stage that runs out of time keeps these
    return bench


# --- sizes and config -------------------------------------------------------------------------


def available_cpus() -> int:
    """The cores this process may run on (a container's or taskset's CPU set), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def queued_batches(workers: int, cuda: bool) -> int:
    """Batches ready when the clock starts, prepared during the warm-up: the DataLoader's prefetch
    queue and, on CUDA, the thread that augments ahead (``DEPTH`` queued and one in hand)."""
    return PREFETCH_FACTOR * workers + (AHEAD_DEPTH + 1 if cuda else 0)


def loader_workers(cuda: bool, cpus: int) -> int:
    """Every core but the one the training loop runs on (CUDA), at most ``MAX_LOADER_WORKERS``; one
    worker on a CPU, where the model needs the cores and one worker is enough to run the
    multi-process loader path."""
    return min(MAX_LOADER_WORKERS, max(1, cpus - 1)) if cuda else 1


def training_threads(cuda: bool, cpus: int, workers: int) -> int:
    """torch threads of the training process: as it has them on CUDA (the GPU does the work); on a
    CPU the cores the loader workers leave free, since more threads than free cores make torch's
    threads wait on each other (a 32 px step measured 0.27 s on one thread, 0.4-2 s on two beside
    a loader worker on 2 cores)."""
    return torch.get_num_threads() if cuda else max(1, min(torch.get_num_threads(), cpus - workers))


def plan_sizes(args: argparse.Namespace, cuda: bool, workers: int) -> dict[int, StageSize]:
    """Each stage's sizes; ``--image-size`` sets Stage I's training size (its JPEGs keep the
    256/224 proportion), ``--batch-size`` both stages' batch, ``--images`` the timed images."""
    quick = getattr(args, "quick", False)
    sizes = dict((CUDA_QUICK if quick else CUDA_FULL) if cuda else (CPU_QUICK if quick else CPU_FULL))
    if cuda and not quick:  # the prefetch queue, filled during the warm-up, must be a small share of the timed steps
        cover = PREFETCH_COVER * queued_batches(workers, cuda)
        sizes = {s: replace(z, timed=max(z.timed, cover)) for s, z in sizes.items()}
    if getattr(args, "image_size", None) is not None:
        sizes[1] = replace(sizes[1], image=args.image_size, jpeg=round(args.image_size * 256 / 224))
    if getattr(args, "batch_size", None) is not None:
        sizes = {s: replace(z, batch=args.batch_size) for s, z in sizes.items()}
    if getattr(args, "images", None) is not None:
        sizes = {s: replace(z, timed=max(1, args.images // z.batch)) for s, z in sizes.items()}
    if sizes[1].image < 32 or min(z.batch for z in sizes.values()) < 2:
        raise SystemExit(f"gpu: --image-size must be >= 32 (ResNet-50 downsamples 32x) and --batch-size >= 2 "
                         f"(BatchNorm and MixUp need two images); got {sizes[1].image} and {sizes[1].batch}")
    return sizes


def bench_config(sizes: dict[int, StageSize], workers: int, work: Path, prepared: bool = False,
                 compile_model: bool = False) -> Config:
    """The paper preset at the benchmark's sizes: one micro-batch per step, an epoch just long
    enough for the warm-up and timed steps, augment.device auto (gpu on CUDA), no download;
    ``prepared``: images read from the prepared uint8 cache in ``work``; ``compile_model``:
    ``runtime.compile=true``, so the engine and the model alone both run the compiled forward
    (compiled in the engine's first warm-up step; the model alone's batches have its shape)."""
    overrides = ["model.weights=none", f"data.loader_workers={workers}", f"output.runs_dir={work}/runs",
                 f"data.cache_dir={work}/cache", "run_name=bench-gpu", f"data.prepared={'uint8' if prepared else 'none'}",
                 f"runtime.compile={'true' if compile_model else 'false'}"]
    for stage, z in sizes.items():
        key = f"stage{stage}"
        overrides += [f"{key}.image_size={z.image}", f"{key}.batch_size={z.batch}", f"{key}.accum_steps=1",
                      f"{key}.samples_per_epoch={(z.warmup + z.timed) * z.batch}", f"{key}.augment.device=auto"]
    return load_config("paper", overrides)


def stage_images(data_root: Path | None, sizes: dict[int, StageSize], work: Path) -> tuple[dict[int, list[Path]], str]:
    """{stage: JPEG paths}: generated (smooth random, q75, as trueface.bench.input), or the images
    of ``data_root`` (resized once where their side differs, as the input part does)."""
    images = {}
    for stage, z in sizes.items():
        too_few = (f"in gpu --images does not change that ({STAGE_NAMES[stage]}'s sampler cycles {z.files} distinct "
                   "files; --quick uses fewer and judges no target): point --data-root at a set with more JPEGs, or "
                   "leave it out to use generated ones")
        found, source = bench_images(data_root, {z.jpeg: z.files}, work / f"stage{stage}", part="gpu", too_few=too_few)
        images[stage] = found[z.jpeg]
    return images, source["text"]


def prepare_images(cfg: Config, sizes: dict[int, StageSize], images: dict[int, list[Path]]) -> None:
    """Each stage's images into the prepared cache at its decode size, before anything is timed
    (in this process: a few hundred files)."""
    for stage, z in sizes.items():
        build_prepared(samples_of(images[stage]), decode_size(cfg, z.image), cfg.data.cache_dir, progress=False)


def stage_data(cfg: Config, stage: int, state: TrainState, paths: Sequence[Path]) -> TrainingData:
    """The stage's training data as a run builds it; on a CPU with the batched augmentation forced
    on (the setting refuses gpu there), so the path a GPU takes runs."""
    cuda = state.runtime.device.type == "cuda"
    return training_data(cfg, stage, samples_of(paths), state.runtime, DistInfo(0, 1), on_device=None if cuda else True)


def samples_of(paths: Sequence[Path]) -> list[Sample]:
    """Both labels, one domain: the balanced sampler of either stage has cells to draw from."""
    return [Sample(str(p), i % 2, "bench", "train") for i, p in enumerate(paths)]


# --- timing -----------------------------------------------------------------------------------


class TimeUp(Exception):
    """The timed steps are done: leaves ``train_one_epoch`` at once, so nothing after the clock
    stopped (further steps, the epoch's closing loss read) runs."""


class Probe(Protocol):
    """What runs over exactly the timed steps (``BusySampler``, ``Tracer``)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class TimedWindow(_ProgressWindow):
    """The engine's progress window, also the stopwatch: the clock starts once the warm-up steps
    are done and stops after ``timed`` steps or ``max_s`` seconds, each time after a device
    synchronisation (CUDA runs asynchronously: a host clock alone would time the launches).
    ``probe`` is started and stopped with the clock."""

    def __init__(self, key: str, log_every: int, warmup: int, timed: int, max_s: float, device: torch.device,
                 probe: Probe | None = None) -> None:
        super().__init__(NullLogger(), log_every, key, DistInfo(0, 1))
        self.warmup, self.timed, self.max_s, self.device, self.probe = warmup, timed, max_s, device, probe
        self.done = 0
        self.created = time.perf_counter()
        self.first_step_s = 0.0  # the first step's seconds: compiling, cuDNN's search, the loader's start
        self.started = self.stopped = 0.0
        self.timed_steps = 0
        self.input_at_start = self.input.snapshot()
        self.timed_input = InputTimes()  # the input path's times over the timed steps

    def step_done(self, step: int, epoch: int, lr: float, decay: float) -> None:
        super().step_done(step, epoch, lr, decay)
        self.done += 1
        if self.done == 1:
            self.first_step_s = self._now() - self.created
        if self.done == self.warmup:
            self.started = self._now()
            self.input_at_start = self.input.snapshot()
            if self.probe:
                self.probe.start()
        elif self.done > self.warmup:
            steps = self.done - self.warmup
            if steps >= self.timed or time.perf_counter() - self.started >= self.max_s:
                self.stopped, self.timed_steps = self._now(), steps
                self.timed_input = self.input.since(self.input_at_start)
                if self.probe:
                    self.probe.stop()
                raise TimeUp

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def rate(self, batch: int) -> float:
        return img_per_s(self.timed_steps * batch, self.stopped - self.started)


def img_per_s(images: int, seconds: float) -> float:
    """img/s; 0 where nothing was timed (a failed phase reads as 0, never as infinitely fast)."""
    return images / seconds if images > 0 and seconds > 0 else 0.0


def run_timed(epoch: Callable[[], object], window: TimedWindow) -> None:
    """Runs one engine epoch until the window's clock stops it; an epoch that ends first (its
    plan too short) is an error, not a silently shorter measurement."""
    try:
        epoch()
    except TimeUp:
        return
    finally:  # the clock stops the probe; an error after the warm-up must too, or its thread polls on
        if window.probe is not None:
            window.probe.stop()
    raise RuntimeError(f"the epoch ended after {window.done} steps, before {window.warmup} warm-up + "
                       f"{window.timed} timed ones")


class BusySampler:
    """Reads GPU utilisation (%) every ``period`` seconds on a thread between start() and stop()."""

    def __init__(self, read: Callable[[], float], period: float = BUSY_PERIOD_S) -> None:
        self.read, self.period = read, period
        self.samples: list[float] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="bench-gpu-busy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread; again (after the window stopped it) does nothing more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            try:
                self.samples.append(float(self.read()))
            except Exception as exc:  # nvml can fail mid-run (driver reset); the row then says so
                self.error = f"{type(exc).__name__}: {exc}"
                return
            if self._stop.wait(self.period):
                return

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


#: (a reader of GPU utilisation %, or None where nvml did not answer; why not): ``nvml_reader``'s answer
Nvml = tuple[Callable[[], float] | None, str]


def nvml_reader(device: torch.device) -> Nvml:
    """``torch.cuda.utilization`` where it answers (it needs pynvml), else None and why not."""
    if device.type != "cuda":
        return None, "no CUDA device"
    try:
        torch.cuda.utilization(device)
    except Exception as exc:  # ModuleNotFoundError without pynvml, NVML errors in containers
        return None, f"{type(exc).__name__}: {exc}"
    return (lambda: float(torch.cuda.utilization(device))), ""


NVML_FIX = ("install nvidia-ml-py for it (pip install -e '.[gpu]'; docker/Dockerfile's image has it); meanwhile "
            "'input path vs model alone' stands in")
NVML_DOWN = ("NVML did not answer: check that nvidia-smi works here (in a container: the NVIDIA runtime's utility "
             "capability)")


def busy_unmeasured(bench: Bench, nvml: Nvml) -> None:
    """On CUDA, where nvml did not answer (``nvml``, ``nvml_reader``'s answer; no pynvml:
    ``torch.cuda.utilization`` needs it), one failure line that says the "GPU busy (nvml)" rows,
    Stage I's with its 90% target, are missing and how to get them: a row dropped without a word
    reads as a check that passed."""
    read, why = nvml
    if read is None:
        bench.failed("GPU busy (nvml), both stages", why,
                     NVML_FIX if why.startswith("ModuleNotFoundError") else NVML_DOWN)


# --- one stage --------------------------------------------------------------------------------


@dataclass
class StageFigures:
    engine: float  # img/s
    model_alone: float  # img/s
    engine_steps: int
    model_steps: int
    busy: float | None  # mean GPU utilisation %, None where nvml did not answer
    busy_why: str  # why there is no busy figure
    peak_gib: float | None
    prefetch: int  # batches ready before the clock starts (queued_batches)
    loader: float = 0.0  # img/s of the epoch's DataLoader drained alone; 0 where not measured
    augment: float | None = None  # img/s of DeviceAugment alone on the device; None on the per-sample path
    augment_steps: dict[str, float] | None = None  # ms a batch of each of DeviceAugment's steps
    augment_syncs: int | None = None  # times a batch's DeviceAugment made the host wait for the GPU; None off CUDA
    augment_host_ms: float | None = None  # ms a batch of DeviceAugment on 16-px images: the host's floor
    augment_traffic: Traffic | None = None  # bytes one batch of DeviceAugment reads and writes, counted
    step_syncs: int | None = None  # times one training step (no progress line) made the host wait; None off CUDA
    decode_batched: float = 0.0  # img/s of torchvision's batched decode_jpeg on the training device
    decode_pil: float = 0.0  # img/s of the workers' decode (load_rgb) on one core
    input_times: InputTimes | None = None  # the input path's host times over the timed engine steps
    engine_s: float = 0.0  # seconds of the timed engine steps
    first_step_s: float = 0.0  # seconds of the engine's first step (with runtime.compile, the compiling)
    eager_alone: float | None = None  # img/s of the model alone uncompiled, where runtime.compile is on
    state: TrainState | None = None


#: (what, error): told of a diagnostic that failed (``Bench.failed``)
Failed = Callable[[str, BaseException], object]
T = TypeVar("T")


def diagnostic(what: str, failed: Failed, fallback: T, measure: Callable[[], T]) -> T:
    """``measure()``; where it raises, ``failed(what, error)`` and ``fallback``: a diagnostic
    (nvJPEG missing from a torchvision build, an out-of-memory in a side measurement) must not
    cost the run the figures it already has."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 -- reported through failed(), with its type and message
        failed(what, exc)
        return fallback


def measure_stage(cfg: Config, stage: int, size: StageSize, paths: Sequence[Path], init_from: Path | None,
                  cuda: bool, failed: Failed, nvml: Nvml) -> StageFigures:
    """The stage's figures. The engine and the model alone are the run's point: an error there
    propagates. The diagnostics after them (host synchronisations, loader, augmentation and decode
    alone) each report a failure through ``failed`` and leave their figure unset. ``nvml``: the
    run's one ``nvml_reader`` answer, the busy sampler's reader (an nvml that fails later shows in
    the sampler's error)."""
    di = DistInfo(0, 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    state = _build_state(cfg, stage, init_from, di)
    read, why = nvml
    busy = BusySampler(read) if read else None
    data = stage_data(cfg, stage, state, paths)
    try:
        engine = engine_window(cfg, stage, state, data, size, busy)
    finally:
        data.close()  # the loader's workers, which outlive an epoch, stop before the model runs alone
    peak = torch.cuda.max_memory_allocated(state.runtime.device) / 2**30 if cuda else None
    alone = model_alone_window(cfg, stage, state, size)
    busy_mean = busy.mean() if busy else None
    if busy and busy_mean is None:
        why = busy.error or "no sample taken"
    r = StageFigures(engine.rate(size.batch), alone.rate(size.batch), engine.timed_steps, alone.timed_steps,
                     busy_mean, why, peak, queued_batches(cfg.data.loader_workers, cuda),
                     input_times=engine.timed_input, engine_s=engine.stopped - engine.started,
                     first_step_s=engine.first_step_s, state=state)
    name, device = STAGE_NAMES[stage], state.runtime.device
    if cfg.runtime.compile:  # the same state with the bare module for its training forward
        r.eager_alone = diagnostic(f"{name} model alone, eager", failed, None, lambda: model_alone_window(
            cfg, stage, replace(state, train_model=state.model), size).rate(size.batch))
    batch = device_batches(size.image, size.batch, state.runtime, count=1)[0]  # made outside the count: its copy waits
    r.step_syncs = diagnostic(f"{name} host synchronisations in a training step", failed, None,
                              lambda: host_syncs(lambda: one_step(state, cfg.stage(stage), batch), device))
    try:
        r.loader, images, epoch_augment = diagnostic(f"{name} loader alone", failed, (0.0, None, None),
                                                     lambda: fresh_loader_alone(cfg, stage, state, data, size))
    finally:
        data.close()
    if epoch_augment is not None and images is not None:
        r.augment, r.augment_steps, r.augment_syncs = diagnostic(
            f"{name} augmentation alone", failed, (None, None, None),
            lambda: augment_alone(epoch_augment, images, device))
        r.augment_host_ms = diagnostic(f"{name} augmentation host floor", failed, None,
                                       lambda: augment_host_floor(epoch_augment, size.batch, device))
        r.augment_traffic = diagnostic(f"{name} augmentation memory traffic", failed, None,
                                       lambda: count_augment_traffic(epoch_augment, images, device))
    r.decode_batched, r.decode_pil = diagnostic(
        f"{name} decode", failed, (0.0, 0.0), lambda: decode_alone(paths, size, decode_size(cfg, size.image), device))
    return r


def first_strong_epoch(cfg: Config, stage: int, state: TrainState, data: TrainingData):
    """(plan, loader, augment, epoch) of the stage's first strong epoch, seeded as ``run_stage``
    seeds it: the light epochs skip the strong ops, so the first strong one is the costly case."""
    di, st = DistInfo(0, 1), cfg.stage(stage)
    plan = _step_plan(st, f"stage{stage}", len(data.sampler), di)
    epoch = st.light_epochs
    _seed_epoch(cfg.seed, di.rank, epoch)
    loader, augment = data.epoch(epoch, plan.micro, cfg, state.runtime, di.rank)
    return plan, loader, augment, epoch


def fresh_loader_alone(cfg: Config, stage: int, state: TrainState, data: TrainingData, size: StageSize):
    """(img/s, images, augment): ``loader_alone`` over a fresh loader of the first strong epoch, and
    that epoch's batched augmentation for ``augment_alone``. The loader is built inside the
    diagnostic: starting its workers can fail too (too many open files, a worker killed for memory)."""
    _, loader, augment, _ = first_strong_epoch(cfg, stage, state, data)
    rate, images = loader_alone(loader, size)
    return rate, images, augment


def engine_window(cfg: Config, stage: int, state: TrainState, data: TrainingData, size: StageSize,
                  probe: Probe | None) -> TimedWindow:
    """The engine's epoch as ``run_stage`` runs it (dataset, sampler, loader, batched augmentation,
    ``train_one_epoch``) in the stage's first strong epoch, timed after the warm-up steps."""
    plan, loader, augment, epoch = first_strong_epoch(cfg, stage, state, data)
    window = TimedWindow(plan.key, cfg.runtime.log_every, size.warmup, size.timed, MAX_TIMED_S, state.runtime.device,
                         probe)
    rng = np.random.default_rng([cfg.seed, 0, epoch, 7])
    run_timed(lambda: train_one_epoch(state, plan, loader, 0, epoch, window, rng, augment), window)
    return window


class Tracer:
    """torch.profiler over the timed steps (a ``Probe``): host ops on every thread (the training
    loop, and on CUDA the augmentation thread) where torch can, and on CUDA the kernels on each
    stream."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.running = cuda, False
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        try:  # by default the profiler records the host ops of the thread that started it only
            every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
            self.threads = "every thread"
        except (AttributeError, TypeError):  # a torch without the option
            every_thread, self.threads = None, f"the training loop's thread only (torch {torch.__version__})"
        self.prof = profile(activities=activities, experimental_config=every_thread)

    def start(self) -> None:
        self.prof.start()
        self.running = True

    def stop(self) -> None:
        """Stops recording; again (after an error in the steps) does nothing."""
        if self.running:
            self.running = False
            self.prof.stop()

    def write(self, path: Path, rows: int = TRACE_TABLE_ROWS) -> str:
        """The Chrome trace to ``path`` (gzipped JSON) and the ops' totals beside it (``.txt``);
        returns the totals' first ``rows`` rows, dearest first (device time on CUDA)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        plain = path.with_suffix("")  # gzipped here, not by torch: older versions write .gz paths as plain JSON
        self.prof.export_chrome_trace(str(plain))
        getattr(self.prof, "wait_for_exports", lambda: None)()  # torch >= 2.14 may export asynchronously
        with open(plain, "rb") as src, atomic_open(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb") as dst:
            shutil.copyfileobj(src, dst)  # atomically: a run stopped mid-export leaves no truncated trace
        plain.unlink()
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=rows)
        atomic_write_text(path.with_name(path.name.split(".")[0] + "-ops.txt"), table)
        return table


def trace_stage(cfg: Config, stage: int, state: TrainState, paths: Sequence[Path], size: StageSize,
                out_dir: Path) -> GpuTime | None:
    """``TRACE_STEPS`` engine steps of the stage's first strong epoch (after the warm-up of
    ``trace_size``; fewer where the stage's size times fewer) under the profiler, on a fresh
    loader as ``measure_stage`` uses: the trace to open in Perfetto (ui.perfetto.dev) or
    chrome://tracing, to see where the GPU waits and on what. Returns the trace's GPU time
    (``trueface.bench.trace_gpu``), None where it holds no device work (a CPU run)."""
    cuda = state.runtime.device.type == "cuda"
    steps = trace_size(size, queued_batches(cfg.data.loader_workers, cuda))
    cfg = epoch_for(cfg, stage, steps)
    data = stage_data(cfg, stage, state, paths)
    tracer = Tracer(cuda)
    try:
        engine_window(cfg, stage, state, data, steps, tracer)
    finally:
        tracer.stop()
        data.close()
    path = out_dir / f"trace-stage{stage}.json.gz"
    table = tracer.write(path)
    print(f"  {STAGE_NAMES[stage]}: trace of {steps.timed} engine steps in {path} (host ops of {tracer.threads}; "
          f"open it in ui.perfetto.dev); the dearest ops:\n{table}", flush=True)
    summary = gpu_time(read_trace(path))
    if summary is not None:
        print(f"  {STAGE_NAMES[stage]} trace: {summary.describe()}", flush=True)
    return summary


def trace_size(size: StageSize, queued: int) -> StageSize:
    """The traced window: a warm-up of at least the ``queued`` batches prepared ahead of the steps
    (``queued_batches``, the figure ``plan_sizes`` covers), then up to ``TRACE_STEPS`` traced. A
    fresh loader fills its queue while the first steps wait on cuDNN's search or the compiling: the
    steps that take those batches never wait on the loader, so a trace of them could not show it
    starving the GPU; the steps after them get the batches the loader keeps up with."""
    return replace(size, warmup=max(TRACE_WARMUP, queued), timed=min(TRACE_STEPS, size.timed))


def epoch_for(cfg: Config, stage: int, size: StageSize) -> Config:
    """``cfg`` with the stage's epoch just long enough for ``size``'s warm-up and timed steps (the
    trace's warm-up can be longer than the timed run's)."""
    st = replace(cfg.stage(stage), samples_per_epoch=(size.warmup + size.timed) * size.batch)
    return replace(cfg, **{f"stage{stage}": st})


def trace_row(name: str, summary: GpuTime) -> Row:
    """The trace's GPU busy share, with what the GPU time went to in the note; no target: the
    traced steps are few and run under the profiler, whose host overhead can leave the GPU
    waiting more than in the timed steps (the nvml row's window)."""
    return Row(f"{name} GPU busy (trace)", 100 * summary.busy_share, None, "%", note=summary.describe())


def loader_alone(loader: DataLoader, size: StageSize) -> tuple[float, torch.Tensor]:
    """img/s of a fresh epoch's DataLoader drained by a bare loop (its workers decode, crop and run
    the per-sample ops; nothing else runs), timed after the warm-up batches; and its last batch."""
    batches = iter(loader)
    images = torch.empty(0)
    for _ in range(size.warmup):
        images = next(batches)[0]
    timed, start = 0, time.perf_counter()
    while timed < size.timed and time.perf_counter() - start < MAX_PART_S:
        images = next(batches)[0]
        timed += 1
    elapsed = time.perf_counter() - start
    return img_per_s(timed * size.batch, elapsed), images


def augment_alone(augment: EpochAugment, images: torch.Tensor,
                  device: torch.device) -> tuple[float, dict[str, float], int | None]:
    """img/s of the epoch's batched augmentation (strong) on one loader batch already on the
    device, timed between synchronisations: the GPU's share of the input path; the ms a batch of
    each of its steps (``StepClock``), so a slow augmentation says which step it is; and how many
    times one batch made the host wait for the GPU (``host_syncs``)."""
    images = images.to(device)
    clock = StepClock(device)
    calls, seconds = timed_calls(lambda: augment(images), clock.sync)
    rate = img_per_s(calls * len(images), seconds)
    aug, generator = augment.augment, augment.generator
    for _ in range(STEP_REPEATS):
        clock.start()
        draws = aug.draw(len(images), *images.shape[-2:], generator)
        clock("draw")
        aug.apply(images, draws, generator, tick=clock)
    return rate, clock.ms(), host_syncs(lambda: augment(images), device)


def augment_host_floor(augment: EpochAugment, batch: int, device: torch.device) -> float:
    """ms a batch of the epoch's ``DeviceAugment`` on ``batch`` images of 16 px: the same ops with
    next to no pixels, so the time is the host's (Python, dispatch, kernel launches). Against the
    full-size ms a batch it says whether the thread that prepares batches is held up by its own
    host work or by the GPU."""
    tiny = torch.randint(0, 256, (batch, 3, HOST_FLOOR_PX, HOST_FLOOR_PX), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(SEED)).to(device)
    calls, seconds = timed_calls(lambda: augment(tiny), device_sync(device))
    return seconds * 1e3 / calls


def count_augment_traffic(augment: EpochAugment, images: torch.Tensor, device: torch.device) -> Traffic:
    """The bytes one batch of the epoch's ``DeviceAugment`` reads and writes, counted op by op
    (``trueface.bench.traffic``): with the row's rate, how near the memory bandwidth it runs."""
    images = images.to(device)
    return count_traffic(lambda: augment(images))


def timed_calls(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[int, float]:
    """(calls, seconds) of ``fn`` after ``AUGMENT_WARMUP`` untimed calls: up to ``AUGMENT_REPEATS``
    calls, fewer where ``MAX_PART_S`` runs out, timed between two synchronisations."""
    for _ in range(AUGMENT_WARMUP):
        fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < AUGMENT_REPEATS and time.perf_counter() - start < MAX_PART_S:
        fn()
        calls += 1
    sync()
    return calls, time.perf_counter() - start


def decode_alone(paths: Sequence[Path], size: StageSize, reduce_to: int | None,
                 device: torch.device) -> tuple[float, float]:
    """(img/s of torchvision's batched ``decode_jpeg`` on ``device``, in batches of the stage's
    size with the files' bytes read beforehand; img/s of ``load_rgb``, the loader workers' decode
    with its power-of-two reduce to ``reduce_to``, one file at a time on this core), each timed for
    up to half of ``MAX_PART_S``."""
    data = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    batches = [[data[(i * size.batch + j) % len(data)] for j in range(size.batch)] for i in range(size.timed)]
    sync = device_sync(device)
    with warnings.catch_warnings():  # torchvision 0.29 marks its codecs deprecated (-> TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=device)  # warm-up: nvJPEG's handles, buffers
        sync()
        done, start = 0, time.perf_counter()
        while done < len(batches) and time.perf_counter() - start < MAX_PART_S / 2:
            decode_jpeg(batches[done], mode=ImageReadMode.RGB, device=device)
            done += 1
        sync()
        batched = img_per_s(done * size.batch, time.perf_counter() - start)
    decoded, start = 0, time.perf_counter()
    while decoded < len(paths) and time.perf_counter() - start < MAX_PART_S / 2:
        load_rgb(paths[decoded], reduce_to)
        decoded += 1
    return batched, img_per_s(decoded, time.perf_counter() - start)


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work on CUDA; nothing to wait for elsewhere."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Runs ``fn``; how many times it made the host wait for the GPU, counted by torch's sync
    debug mode (one warning a synchronising call); None off CUDA, where nothing waits."""
    if device.type != "cuda":
        fn()  # the same work, so a CPU run goes through the same code
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


class StepClock:
    """``DeviceAugment.apply``'s tick: the time from one step's end to the next's, each read after
    a device synchronisation (so a step's GPU work is counted in it), summed over calls."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device_sync(device)
        self.totals: dict[str, float] = {}
        self.calls = 0
        self.last = 0.0

    def start(self) -> None:
        self.sync()
        self.calls += 1
        self.last = time.perf_counter()

    def __call__(self, step: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[step] = self.totals.get(step, 0.0) + now - self.last
        self.last = now

    def ms(self) -> dict[str, float]:
        return {step: total * 1e3 / self.calls for step, total in self.totals.items()} if self.calls else {}


def model_alone_window(cfg: Config, stage: int, state: TrainState, size: StageSize) -> TimedWindow:
    """The same ``train_one_epoch`` on normalised float batches already on the device: no loader,
    no decode, no augmentation; what the model and optimizer alone allow (the compute ceiling)."""
    di, st, key = DistInfo(0, 1), cfg.stage(stage), f"stage{stage}"
    plan = _step_plan(st, key, (size.warmup + size.timed) * size.batch, di)
    batches = device_batches(size.image, size.batch, state.runtime)
    feed = [batches[i % len(batches)] for i in range(plan.steps_per_epoch)]  # references, not copies
    window = TimedWindow(key, cfg.runtime.log_every, size.warmup, size.timed, MAX_TIMED_S, state.runtime.device)
    rng = np.random.default_rng([cfg.seed, di.rank, st.light_epochs, 7])
    run_timed(lambda: train_one_epoch(state, plan, feed, 0, st.light_epochs, window, rng, None), window)
    return window


def one_step(state: TrainState, st: StageConfig, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """One optimizer step of the engine (``train_step``, the optimizer, the EMA) on ``batch``
    (``device_batches``: already on the device), without the progress window (its line every
    ``log_every`` steps reads the loss)."""
    images, labels, _ = batch
    train_step(state, images, labels, st, np.random.default_rng(SEED), sync_grads=True)
    state.runtime.step(state.optimizer)
    state.ema.update(state.model, 1)


def device_batches(image: int, batch: int, runtime: Runtime,
                   count: int = DISTINCT_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, indices) as the loader yields them (labels pinned on CUDA, as its
    ``pin_memory`` gives them), the images already normalised floats on the runtime's device, of
    the type ``DeviceAugment`` hands the model there (``Runtime.augment_dtype``: a compiled
    forward is compiled for one input type, and another would compile it again)."""
    gen = torch.Generator().manual_seed(SEED)
    labels = torch.arange(batch) % 2
    device = runtime.device
    pin = device.type == "cuda"
    return [(torch.randn(batch, 3, image, image, generator=gen).to(device, runtime.augment_dtype),
             labels.clone().pin_memory() if pin else labels.clone(),
             torch.arange(i * batch, (i + 1) * batch)) for i in range(count)]


def save_stage1(ema_model: nn.Module, cfg: Config, path: Path) -> Path:
    """A Stage I checkpoint with what ``_initial_model`` reads (its EMA weights), so Stage II's state
    is built by ``_build_state`` as in a run; the EMA stands in for the raw weights too (one copy)."""
    ema = ema_model.state_dict()
    torch.save({"format_version": 1, "stage": 1, "config": to_dict(cfg), "model": ema, "ema": ema}, path)
    return path


def _free_cuda(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()


# --- rows -------------------------------------------------------------------------------------


def no_target_why(stage: int, size: StageSize, r: StageFigures, cuda: bool) -> str:
    """'' where issue 11's targets judge the stage's figures; else why not (the target column's text).
    They were set for an H100 at the paper's sizes (``CUDA_FULL``'s image, JPEG side and batch), and
    hold only over a timed window that the batches prepared before the clock (``r.prefetch``)
    flatter by at most 1/``PREFETCH_COVER``: ``PREFETCH_COVER`` times as many timed steps, or a plan
    that long cut by ``MAX_TIMED_S`` (a rate that fills 45 s with fewer steps is no faster than the
    window shows, give or take that share). ``--quick``, a small ``--images``, ``--image-size`` and
    ``--batch-size`` runs print their figures without a target."""
    if not cuda:
        return "none: CPU"
    paper = CUDA_FULL[stage]
    if (size.image, size.jpeg, size.batch) != (paper.image, paper.jpeg, paper.batch):
        return f"none: set for {paper.image} px, batch {paper.batch}"
    cover = PREFETCH_COVER * r.prefetch
    if r.engine_steps < cover and not (size.timed >= cover and r.engine_s >= MAX_TIMED_S):
        return f"none: {r.engine_steps} timed steps, {r.prefetch} prepared ahead (needs {cover})"
    return ""


def add_rows(bench: Bench, stage: int, size: StageSize, r: StageFigures, cuda: bool, workers: int) -> None:
    name = STAGE_NAMES[stage]
    where = "" if cuda else CPU_NOTE + "; "
    shape = f"{size.image} px from {size.jpeg} px JPEGs, batch {size.batch}"
    why = no_target_why(stage, size, r, cuda)

    def target(targets: dict[int, float]) -> dict:  # Row's target, or why none applies where one is set
        return {"no_target": why} if why and stage in targets else {"target": targets.get(stage)}

    bench.add(Row(f"{name} training (engine)", r.engine, None, "img/s", **target(RATE_TARGETS), note=(
        f"{where}{shape}: {r.engine_steps} timed steps after {size.warmup} warm-up step(s) of the real engine path "
        f"(_build_state, training_data, the epoch's DataLoader with {workers} worker(s), train_one_epoch) "
        f"on {size.files} files cycled by the sampler; {prefetch_note(r.prefetch, r.engine_steps)}"
        + (f"; no target: {NO_TARGET_NOTE}" if why and cuda else "")
        + (f"; the first step took {r.first_step_s:.1f} s ({FIRST_STEP_WHY})" if r.first_step_s else ""))))
    bench.add(Row(f"{name} input path vs model alone", r.engine, r.model_alone, "img/s", **target(RATIO_TARGET), note=(
        f"{where}model alone: the same train_one_epoch and state on {DISTINCT_BATCHES} normalised float "
        f"batches already on the device, {r.model_steps} timed steps; the ratio is the share of the model's "
        f"speed the input path (decode, crop, flip, DeviceAugment) leaves"
        + (f"; host synchronisations in one training step: {r.step_syncs} (torch.cuda sync debug mode)"
           if r.step_syncs is not None else "")
        + input_times_note(r.input_times, r.engine_s, cuda)
        + ("" if r.busy is not None else f"; nvml not available ({r.busy_why}): this ratio stands in for GPU busy"))))
    if r.eager_alone is not None:
        bench.add(Row(f"{name} model alone, compiled vs eager", r.model_alone, r.eager_alone, "img/s", note=(
            f"{where}runtime.compile=true: the model-alone figure above (the compiled training forward) against "
            "the same train_one_epoch and state with the bare module, measured right after it; the compiling "
            f"itself is in the engine's first step ({r.first_step_s:.1f} s), paid once by each stage's process")))
    if r.busy is not None:
        bench.add(Row(f"{name} GPU busy (nvml)", r.busy, None, "%", **target(BUSY_TARGET), note=(
            f"mean of torch.cuda.utilization() every {BUSY_PERIOD_S:g} s over the timed engine steps "
            "(nvml: the share of time a kernel was running)")))
    if r.peak_gib is not None:
        bench.add(Row(f"{name} peak GPU memory", r.peak_gib, None, "GiB", note=(
            "torch.cuda.max_memory_allocated from the stage's state being built to the end of its engine steps")))
    if r.loader:
        bench.add(Row(f"{name} loader alone", r.loader, r.engine, "img/s", note=(
            f"{where}a fresh epoch's DataLoader ({workers} worker(s): decode, crop, per-sample ops, uint8) drained by "
            f"a bare loop for up to {MAX_PART_S:g} s after the warm-up; ratio to the engine: above 1 the CPU side "
            "keeps up")))
    if r.augment is not None:
        bench.add(Row(f"{name} augmentation alone", r.augment, r.engine, "img/s", note=(
            f"{where}DeviceAugment (strong) on one loader batch already on the device, {AUGMENT_REPEATS} calls "
            "between synchronisations; ratio to the engine: how much faster than the whole step it runs"
            + (f"; ms a batch by step ({STEP_REPEATS} calls, a synchronisation after each step): "
               + ", ".join(f"{step} {ms:.2f}" for step, ms in r.augment_steps.items()) if r.augment_steps else "")
            + (f"; host synchronisations a batch: {r.augment_syncs} (torch.cuda sync debug mode)"
               if r.augment_syncs is not None else "")
            + (f"; host floor: {r.augment_host_ms:.2f} ms a batch (the same {size.batch} images at {HOST_FLOOR_PX} px, "
               "next to no pixel work: Python, dispatch and launches)" if r.augment_host_ms is not None else "")
            + traffic_note(r.augment_traffic, r.augment, size.batch))))
    if not r.decode_pil:  # not measured
        return
    bench.add(Row(f"{name} decode, batched decode_jpeg vs PIL on one core", r.decode_batched, r.decode_pil, "img/s",
                  note=(f"{where}torchvision.io.decode_jpeg on {'cuda (nvJPEG)' if cuda else 'the CPU'}, batches of "
                        f"{size.batch} {size.jpeg} px JPEGs whose bytes were read beforehand, against load_rgb (the "
                        "loader workers' decode, files read as they read them) one image at a time on one core; the "
                        "ratio is how many worker cores the batched decode stands in for. Training decodes in the "
                        "workers (one decoding path for every format); decoding on the GPU would move the crop "
                        "there too")))


def traffic_note(traffic: Traffic | None, rate: float, batch: int) -> str:
    """The augmentation's counted bytes a batch and, at its measured rate, the bandwidth they take."""
    if traffic is None:
        return ""
    per_s, per_image = traffic.bytes * rate / batch, traffic.bytes / batch
    return (f"; memory traffic counted op by op: {traffic.bytes / 1e9:.3g} GB a batch ({per_image / 1e6:.3g} MB "
            f"an image) in {traffic.ops} ops, {per_s / 1e9:,.0f} GB/s at this row's rate (an H100 SXM's memory peaks "
            f"at {H100_BYTES_PER_S / 1e9:,.0f} GB/s, an H200's at {H200_BYTES_PER_S / 1e9:,.0f})")


def input_times_note(times: InputTimes | None, seconds: float, cuda: bool) -> str:
    """Where the input path's time went during the timed engine steps: the training loop's wait
    for its batches (what the input cost the step) and, on the side preparing them, the wait on the
    DataLoader against the host time of the copy and the augmentation."""
    if not times or not times.batches or seconds <= 0:
        return ""
    per = lambda s: f"{s * 1e3 / times.batches:.2f} ms"  # noqa: E731
    return (f"; over the timed steps the training loop waited {per(times.waited_s)} a batch for its next one "
            f"(input wait {times.wait_share(seconds):.0%} of the time); the side preparing batches "
            f"({'a thread running ahead' if cuda else 'inline, in the training loop'}) waited {per(times.loader_s)} "
            f"a batch on the DataLoader and spent {per(times.prepare_s)} on the copy and the augmentation"
            + (" (host time: its launches and its one mask read)" if cuda else ""))


def prefetch_note(prefetch: int, timed: int) -> str:
    """How much the batches prepared during the warm-up (``queued_batches``) can flatter the timed steps."""
    share = prefetch / timed if timed else 1.0
    return (f"{prefetch} batches were prepared before the clock started (the loader's prefetch queue and, on CUDA, "
            "the augmentation thread's): "
            f"at most {share:.0%} of the timed steps")


def progress_line(stage: int, size: StageSize, r: StageFigures) -> str:
    ratio = r.engine / r.model_alone if r.model_alone else float("nan")
    extra = (f", GPU busy {r.busy:.0f}%" if r.busy is not None else "") + (
        f", peak {r.peak_gib:.1f} GiB" if r.peak_gib is not None else "") + (
        f", host synchronisations: {r.step_syncs} a training step, {r.augment_syncs} an augmented batch"
        if r.step_syncs is not None else "") + (
        f", input wait {r.input_times.wait_share(r.engine_s):.0%}" if r.input_times and r.engine_s > 0 else "") + (
        f", model alone eager {r.eager_alone:,.1f} img/s" if r.eager_alone is not None else "") + (
        f", first step {r.first_step_s:.1f} s" if r.first_step_s else "")
    return (f"{STAGE_NAMES[stage]} {size.image} px, batch {size.batch}: engine {r.engine:,.1f} img/s, "
            f"model alone {r.model_alone:,.1f} img/s ({ratio:.2f}){extra}")
