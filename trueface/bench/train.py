"""Training img/s of the engine's step against a plain torchvision loop, and under Ray Train.

Usage::

    python -m jobs.benchmark train                        # ResNet-50, 64 px, batch 16, 10 steps
    python -m jobs.benchmark train --quick                # 32 px, batch 4, 2 steps: seconds
    python -m jobs.benchmark train --image-size 224 --batch-size 64 --images 1280

Both sides train on the SAME batches held in memory (no decoding, no augmentation, no loader
processes), with the same model, batch, torch threads and precision, so the rows measure what
the engine adds per step and nothing else:

- "engine vs plain loop": ``trueface.train.train_one_epoch`` (LR schedule, soft targets, MixUp,
  autocast policy of ``Runtime``, channels_last, optimizer step, EMA update, progress window)
  against the ~15-line loop every PyTorch tutorial writes (``PlainLoop``). The two alternate
  step by step (A B B A A B ...) and each side's figure is the median of its steps, so a burst
  of load from another process hits both. Both run with glibc's freed memory kept
  (``trueface.host_memory``, set by the engine's state for the whole process, as in training).
- "engine under Ray Train, 1 worker vs engine": the same engine steps inside a one-worker
  ``TorchTrainer``, measured by ``jobs.bench_train_ray`` (the library never imports Ray) and
  handed in as ``ray_rate``; the driver's steps run half before and half after it (those after
  once the Ray it stopped has finished exiting, and after one untimed step each). Where the
  benchmark started that Ray itself, two more rows split it: the driver's engine steps with the
  Ray still up and resting after the Train run against the driver's own ("a resting local Ray":
  what Ray's daemons take from a process beside them), and the worker's rate against those
  ("Ray Train": its worker process, thread, niceness, controller). The two ratios multiply to
  the whole row's.
- "engine under Ray Train, 1 worker with a core to spare vs engine" (where the driver has two or
  more threads): the same comparison with the worker and the driver's engine at one torch thread
  fewer, so Ray's own processes have a core of their own, as on the cluster files' GPU nodes (8 of
  16 vCPUs to the worker). On a 2-core machine the row above measures mostly what those processes
  take from a worker that holds every core; this one measures Ray Train where they do not.

A Ray failure costs only the Ray rows: the others are kept, it is listed under "Not measured"
with what to do (``ray_attempt``), and ``jobs.benchmark`` exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from trueface.bench.report import (RAY_FIX, Bench, OtherLoad, Row, machine_context, ray_attempt, share_text,
                                   torch_threads)
from trueface.config import Config, load_config
from trueface.distributed import DistInfo
from trueface.host_memory import freed_memory_kept
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.tensorboard import NullLogger
from trueface.train import TrainState, _build_state, _ProgressWindow, _step_plan, make_optimizer, train_one_epoch

FULL = {"image_size": 64, "batch_size": 16, "steps": 10}
QUICK = {"image_size": 32, "batch_size": 4, "steps": 2}
WARMUP_STEPS = 2  # first steps allocate buffers and pick kernels: timed by neither side
DISTINCT_BATCHES = 8  # batches cycled through; enough that no step sees the previous one's tensor
MIXUP_ALPHA = 0.2  # Stage II's default: the measured step includes MixUp (Stage I's demo has it off)
TARGET = 0.95  # at most 5% slower than the reference
SEED = 0

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, labels, sample indices: what the loader yields


#: (config, size, rounds, while_ray_idles) -> (img/s of the engine's steps inside Ray Train, a
#: note on how measured). It calls ``while_ray_idles()`` once after the Ray run, with the local Ray
#: still up and idle, where it started that Ray itself (not where one was running already).
RayRate = Callable[[Config, dict, int, Callable[[], None]], tuple[float, str]]


def run(args: argparse.Namespace, ray_rate: RayRate | None = None, max_threads: int | None = None) -> Bench:
    """The table; its Ray row only with ``ray_rate``. ``max_threads`` caps the torch threads of
    both sides (a Ray worker cannot have more CPUs than the cluster)."""
    size = bench_size(args)
    threads = min(torch.get_num_threads(), max_threads or torch.get_num_threads())
    work = tempfile.mkdtemp(prefix="trueface-bench-train-")
    try:
        cfg = bench_config(size, threads, work)
        with torch_threads(threads):
            return _measure(cfg, size, threads, ray_rate)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(cfg: Config, size: dict, threads: int, ray_rate: RayRate | None) -> Bench:
    batches = make_batches(size["image_size"], size["batch_size"])
    engine, plain = EngineLoop(cfg), PlainLoop(cfg)  # the engine's state keeps freed memory: for both
    kept = freed_memory_kept()
    rounds = size["steps"]
    print(f"train: ResNet-50 {size['image_size']} px, batch {size['batch_size']}, {engine.runtime.precision}, "
          f"{threads} torch threads; {rounds} one-step rounds per side after {WARMUP_STEPS} warm-up steps",
          flush=True)
    bench = Bench("train", context={**machine_context(), "model": "resnet50", "image_size": size["image_size"],
                                    "batch": size["batch_size"], "steps": rounds, "warmup_steps": WARMUP_STEPS,
                                    "precision": engine.runtime.precision, "threads": threads,
                                    "channels_last": cfg.model.channels_last, "freed_memory_kept": kept})
    rates: dict[str, list[float]] = {"engine": [], "plain": []}
    feed = BatchFeed(batches)
    for loop in (engine, plain):
        loop.run(feed.take(WARMUP_STEPS))
    before = math.ceil(rounds / 2)
    with OtherLoad() as load_before:
        alternate({"engine": engine, "plain": plain}, feed, before, rates)
    beside: dict[str, list[float]] = {"engine": []}  # the driver's engine steps beside an idle Ray
    beside_load = OtherLoad()

    def while_ray_idles() -> None:
        rewarm(engine, feed=feed)  # and Ray Train's controller exits meanwhile
        with beside_load:
            alternate({"engine": engine}, feed, rounds, beside)

    under_ray = ray_attempt(bench, RAY_ROW, lambda: ray_rate(cfg, size, rounds, while_ray_idles), RAY_FIX) if ray_rate else None
    if ray_rate:
        rewarm(engine, plain, feed=feed)
    with OtherLoad() as load_after:
        alternate({"engine": engine, "plain": plain}, feed, rounds - before, rates)
    shares = [x.share for x in (load_before, load_after) if x.share is not None]
    driver_load = sum(shares) / len(shares) if shares else None
    engine_rate, plain_rate = statistics.median(rates["engine"]), statistics.median(rates["plain"])

    bench.add(Row("engine vs plain loop", engine_rate, plain_rate, "img/s", TARGET, note=(
        f"median of {len(rates['engine'])} alternating steps each (engine {spread(rates['engine'])}, plain "
        f"{spread(rates['plain'])}); the engine also does per step what the plain "
        f"loop does not: LR schedule, label-smoothed soft targets, MixUp (alpha {MIXUP_ALPHA}), soft cross-entropy, "
        f"EMA update of weights and buffers (decay {cfg.stage1.ema_decay}), progress window; both with "
        f"{'freed host memory kept (trueface.host_memory)' if kept else 'glibc malloc defaults'}")))
    if under_ray:
        bench.add(Row(RAY_ROW, under_ray[0], engine_rate, "img/s", TARGET,
                      note=f"{under_ray[1]}; other processes kept {share_text(driver_load)} of the machine's CPUs "
                           f"busy during the driver's steps"))
        if beside["engine"]:
            add_ray_split(bench, under_ray[0], beside["engine"], engine_rate, beside_load.share)
    if under_ray and threads >= 2:  # where Ray Train failed once, a second try would only fail again, slower
        spare = spare_core_row(bench, cfg, size, engine, feed, ray_rate)
        if spare is not None:
            bench.add(spare)
    return bench


RAY_ROW = "engine under Ray Train, 1 worker vs engine"
SPARE_ROW = "engine under Ray Train, 1 worker with a core to spare vs engine"


def spare_core_row(bench: Bench, cfg: Config, size: dict, engine: EngineLoop, feed: BatchFeed,
                   ray_rate: RayRate) -> Row | None:
    """The Ray row again with the worker leaving one core to Ray's own processes (GCS, raylet,
    dashboard, Train controller), as on the cluster files' GPU nodes (8 of 16 vCPUs to the worker),
    against the driver's engine at the same torch threads: on a machine where the worker takes every
    core, each wake-up of those processes preempts one of its threads (README, "Ray Train with one
    worker"); this row says what Ray Train costs where they have a core of their own."""
    threads = cfg.scaling.cpus_per_worker - 1
    spare_cfg = replace(cfg, scaling=replace(cfg.scaling, cpus_per_worker=threads))
    rates: dict[str, list[float]] = {"engine": []}
    rounds = size["steps"]
    before = math.ceil(rounds / 2)
    with torch_threads(threads):
        engine.run(feed.take(1))  # untimed: the first step at a new thread count resizes OpenMP's pool
        alternate({"engine": engine}, feed, before, rates)
        under_ray = ray_attempt(bench, SPARE_ROW, lambda: ray_rate(spare_cfg, size, rounds, lambda: None), RAY_FIX)
        if under_ray is None:
            return None
        rewarm(engine, feed=feed)
        alternate({"engine": engine}, feed, rounds - before, rates)
    return Row(SPARE_ROW, under_ray[0],
               statistics.median(rates["engine"]), "img/s", TARGET, note=(
                   f"the worker and the driver's engine both at {threads} torch thread(s), leaving 1 of the "
                   f"{cfg.scaling.cpus_per_worker} cores the rows above use to Ray's own processes; the driver's "
                   f"median of {len(rates['engine'])} steps ({spread(rates['engine'])}); in Ray: {under_ray[1]}"))


def add_ray_split(bench: Bench, ray_rate: float, beside: Sequence[float], engine_rate: float,
                  load: float | None) -> None:
    """The Ray row in two parts: what a local Ray's resting processes (GCS, raylet, dashboard and
    its agents, idle workers) cost the engine's process beside them, and what Ray Train adds on
    top (its worker process, the training function's thread, niceness, controller, reports)."""
    beside_rate = statistics.median(beside)
    bench.add(Row("of which a resting local Ray: engine beside it vs engine", beside_rate, engine_rate, "img/s", note=(
        f"median of {len(beside)} driver steps ({spread(beside)}) with the local Ray still up after the Ray Train "
        f"run; other processes kept {share_text(load)} of the machine's CPUs busy during them")))
    bench.add(Row("of which Ray Train: under Ray Train vs engine beside a resting Ray", ray_rate, beside_rate, "img/s",
                  note="the worker's rate against the driver's beside the same resting Ray: Ray Train's own share"))


def bench_size(args: argparse.Namespace) -> dict:
    size = dict(QUICK if getattr(args, "quick", False) else FULL)
    for key in ("image_size", "batch_size"):
        if getattr(args, key, None) is not None:
            size[key] = getattr(args, key)
    if size["image_size"] < 32 or size["batch_size"] < 2:
        raise SystemExit(f"train: --image-size must be >= 32 (ResNet-50 downsamples 32x) and --batch-size >= 2 "
                         f"(BatchNorm and MixUp need two images); got {size['image_size']} and {size['batch_size']}")
    if getattr(args, "images", None) is not None:
        size["steps"] = max(1, args.images // size["batch_size"])
    return size


def bench_config(size: dict, threads: int, work: str) -> Config:
    """The demo preset's Stage I at the benchmark's size, MixUp on, one Ray worker with
    ``threads`` CPUs; outputs (Ray's own files) under ``work``."""
    return load_config("demo", [
        "model.weights=none", f"stage1.image_size={size['image_size']}", f"stage1.batch_size={size['batch_size']}",
        "stage1.accum_steps=1", f"stage1.mixup_alpha={MIXUP_ALPHA}", "scaling.num_workers=1",
        f"scaling.cpus_per_worker={threads}", "scaling.max_failures=0", f"output.runs_dir={work}/runs",
        f"data.cache_dir={work}/cache", "run_name=bench-train",
    ])


def make_batches(image_size: int, batch_size: int, count: int = DISTINCT_BATCHES, seed: int = SEED) -> list[Batch]:
    """Normalised-looking images and balanced labels, the same for the same arguments in any process."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch_size) % 2
    return [(torch.randn(batch_size, 3, image_size, image_size, generator=gen), labels.clone(),
             torch.arange(i * batch_size, (i + 1) * batch_size)) for i in range(count)]


class BatchFeed:
    """Hands out the in-memory batches in a cycle, so every call gets the next ones."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches, self.next = list(batches), 0

    def take(self, n: int) -> list[Batch]:
        out = [self.batches[(self.next + i) % len(self.batches)] for i in range(n)]
        self.next += n
        return out


class EngineLoop:
    """The engine's training step on given batches: ``train_one_epoch`` over them, as ``run_stage``
    calls it each epoch, with the state ``run_stage`` builds (model, EMA, optimizer, Runtime)."""

    def __init__(self, cfg: Config) -> None:
        self.di = DistInfo(0, 1)
        self.state: TrainState = _build_state(cfg, 1, None, self.di)
        self.cfg, self.step, self.epoch = cfg, 0, 0
        self.rng = np.random.default_rng([cfg.seed, 0, 7])

    @property
    def runtime(self) -> Runtime:
        return self.state.runtime

    def run(self, batches: Sequence[Batch]) -> float:
        """Train on ``batches`` (one optimizer step each); returns their mean loss."""
        st = self.cfg.stage1
        plan = _step_plan(st, "stage1", len(batches) * st.batch_size, self.di)
        window = _ProgressWindow(NullLogger(), self.cfg.runtime.log_every, "stage1", self.di)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would break up the table
            stats = train_one_epoch(self.state, plan, batches, self.step, self.epoch, window, self.rng)
        self.step = stats["step"]
        return stats["train/loss"]


class PlainLoop:
    """The reference: a torchvision-tutorial loop (cross-entropy, zero_grad/backward/step) on the
    same model, optimizer, memory format and autocast precision as the engine."""

    def __init__(self, cfg: Config) -> None:
        self.runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model = build_model(cfg.model).to(self.runtime.device, memory_format=self.memory_format)
        # The engine's own optimizer (make_optimizer: fused where torch has it): the row measures
        # what the engine adds per step, not which optimizer implementation each side picked.
        self.optimizer = make_optimizer(self.model, cfg.stage1)
        self.scaler = torch.amp.GradScaler(self.runtime.device.type, enabled=self.runtime.precision == "fp16")

    def run(self, batches: Sequence[Batch]) -> float:
        device, loss = self.runtime.device, torch.zeros(())
        dtype = torch.float16 if self.runtime.precision == "fp16" else torch.bfloat16
        self.model.train()
        for images, labels, _ in batches:
            images = images.to(device, memory_format=self.memory_format)
            labels = labels.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=self.runtime.precision != "fp32"):
                loss = nn.functional.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(loss.detach())  # also waits for the GPU: the round's time holds all of its work


def alternate(loops: dict[str, "EngineLoop | PlainLoop"], feed: BatchFeed, rounds: int,
              rates: dict[str, list[float]]) -> None:
    """``rounds`` rounds of one step of each loop on the same batch, in A B, B A, A B ... order
    (neither always goes first), appending each step's img/s to ``rates[name]``. One step per
    round: the finest alternation; the engine's per-call extras (its epoch's closing loss read)
    cost well under a millisecond against a step's hundreds."""
    names = list(loops)
    for r in range(rounds):
        batches = feed.take(1)
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(timed_rate(loops[name], batches))


def rewarm(*loops: "EngineLoop | PlainLoop", feed: BatchFeed) -> None:
    """One untimed step of each loop after the pause of a Ray run: the first step after 15-20 s
    of not training ran 15-30% slower than the next, at one thread and two, with Ray's processes
    already gone (measured on a 2-core AMX machine, 2026-12-06): a warm-up, as at the start."""
    for loop in loops:
        loop.run(feed.take(1))


def timed_rate(loop: "EngineLoop | PlainLoop", batches: Sequence[Batch]) -> float:
    start = time.perf_counter()
    loop.run(batches)  # both loops end by reading the loss back: GPU work is done when they return
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def spread(rates: Sequence[float]) -> str:
    """The range of the per-step figures: how much another process's load moved them."""
    return f"steps {min(rates):.3g}-{max(rates):.3g} img/s"
