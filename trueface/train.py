"""Training: one stage to its end (or early stop), one epoch, one step; plain PyTorch.

Usage (no Ray needed; ``jobs/`` calls the same function inside Ray Train workers)::

    result = run_stage(cfg, 1, train_samples, val_samples, Path("runs/x/stage1"))
    result = run_stage(cfg, 2, ..., Path("runs/x/stage2"), init_from=Path(result.best_checkpoint))

One optimizer step = ``accum_steps`` micro-batches on every worker; the global batch is
``stage.batch_size`` whatever the number of workers, and the gradients of one step are the same
with W workers x A micro-batches as with one worker x W*A micro-batches (tests/test_ddp.py).
Schedules (LR, EMA decay, augmentation switch, sampler order, random seeds) are pure functions of
the step and epoch, so a checkpoint's step and epoch are all it takes to resume with the identical
next step.

Augmentation runs in one of two places, chosen by ``stageN.augment.device`` (see
``trueface.augment_device.runs_on_device``): per sample in the DataLoader workers (float tensors
out of the loader), or split, with crop and flip in the workers (uint8 tensors out, pinned
on CUDA) and the rest batched on the training device (``DeviceAugment``, before MixUp) with a
generator seeded from (seed, rank, epoch), so a resumed epoch draws the same as the original
(on CUDA, on the same GPU model: how far a large random draw, the noise, moves the generator
depends on the GPU's number of multiprocessors, so a worker restarted on another model draws
otherwise from its first noisy batch on).

Model selection (best.pt, early stopping, a search's objective) follows ``val/select_auc_ema``,
the EMA weights' validation AUC by ``eval.select_on``: by default the mean over the stage's
domains of each domain's AUC, so the largest domain does not decide alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from trueface.atomic import atomic_write_text, remove_partial_files
from trueface.augment import TrainTransform, denormalize, mixup, soft_targets
from trueface.augment_ahead import InputTimes, training_batches
from trueface.augment_device import DeviceAugment, Uint8TrainTransform, runs_on_device
from trueface.checkpoint import CheckpointError, StageResult, load_checkpoint, save_stage_checkpoints, stage_files
from trueface.config import Config, StageConfig, to_dict
from trueface.config.choices import SELECT_MODES
from trueface.data.dataset import ImageDataset
from trueface.data.epoch_keys import EpochKeyedSampler, EpochSeededDataset
from trueface.data.layout import Sample
from trueface.data.prepared import PreparedImages
from trueface.data.sampler import BalancedSampler
from trueface.distributed import DistInfo, average_buffers, barrier, broadcast_object, gather_objects, mean_over_ranks
from trueface.ema import ModelEma
from trueface.explain import validation_grid
from trueface.host_memory import freeze_inherited_objects, keep_freed_memory
from trueface.inference import decode_size, image_loader, predict_scores
from trueface.metrics import binary_metrics, roc_auc
from trueface.model import build_model
from trueface.precision import Runtime
from trueface.schedule import lr_at, set_lr
from trueface.tensorboard import make_logger

ReportFn = Callable[[dict, "Path | None"], None]


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says what to change."""


def batch_split_problem(st: StageConfig, world_size: int, key: str) -> str:
    """Why ``world_size`` workers cannot share ``st``'s global batch ('' when they can). MixUp mixes
    the images of one worker's micro-batch, so a micro-batch of one image would switch it off."""
    per_step = world_size * st.accum_steps
    if st.batch_size % per_step:
        return (f"{key}.batch_size={st.batch_size} is the global batch and must be divisible by "
                f"workers x accum_steps = {world_size} x {st.accum_steps}; change one of them")
    if st.mixup_alpha > 0 and st.batch_size // per_step < 2:
        return (f"{key}.mixup_alpha={st.mixup_alpha:g} mixes the images within each worker's micro-batch, and "
                f"{key}.batch_size={st.batch_size} over workers x accum_steps = {world_size} x {st.accum_steps} "
                f"leaves one image in it; raise {key}.batch_size, lower {key}.accum_steps or the workers, "
                f"or set {key}.mixup_alpha=0")
    return ""


def micro_batch_size(st: StageConfig, world_size: int, key: str) -> int:
    problem = batch_split_problem(st, world_size, key)
    if problem:
        raise StageError(problem)
    return st.batch_size // (world_size * st.accum_steps)


@dataclass
class TrainState:
    """What the optimizer steps change and a checkpoint saves. ``train_model`` is ``model`` or its
    DDP wrapper; ``model`` is always the bare module (checkpoints hold no wrapper prefixes)."""

    model: nn.Module
    ema: ModelEma
    optimizer: torch.optim.Optimizer
    runtime: Runtime
    train_model: nn.Module

    def checkpoint(self, cfg: Config, stage: int, progress: "Progress") -> dict:
        return {
            "format_version": 1, "stage": stage, "config": to_dict(cfg),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.runtime.scaler.state_dict() if self.runtime.scaler else {},
            "step": progress.step, "epoch": progress.epoch, "best_select_auc_ema": progress.best_auc,
            "best_epoch": progress.best_epoch, "bad_epochs": progress.bad_epochs, "history": progress.history,
        }

    def restore(self, path: Path, stage: int, saved: dict | None = None, arch: str = Config().model.arch) -> "Progress":
        """Takes on the checkpoint at ``path`` (``saved``: its content, where already read) into
        this run's ``arch`` model (its model.arch, for the message where the weights do not fit)."""
        state = saved if saved is not None else load_checkpoint(path)
        if state["stage"] != stage:
            raise CheckpointError(f"{path} is a Stage {state['stage']} checkpoint, cannot resume Stage {stage} from it")
        check_weights_fit(self.model, state["model"], path, state, arch)
        return self.apply(state)

    def apply(self, state: dict) -> "Progress":
        """Takes on a saved ``checkpoint()``'s weights, EMA and optimizer; returns where it stood."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.runtime.scaler and state.get("scaler"):
            self.runtime.scaler.load_state_dict(state["scaler"])
        best = state.get("best_select_auc_ema", state.get("best_auc_ema"))  # older checkpoints: pooled AUC
        return Progress(state["step"], state["epoch"], best, state["best_epoch"], state["bad_epochs"],
                        list(state["history"]))


@dataclass(frozen=True)
class StepPlan:
    """The stage's step arithmetic, fixed before the first epoch."""

    st: StageConfig
    key: str
    micro: int
    steps_per_epoch: int
    warmup_steps: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.st.epochs


@dataclass
class Progress:
    """Where a stage stands; saved in every checkpoint. ``best_auc`` is the best selection AUC."""

    step: int = 0
    epoch: int = 0
    best_auc: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def record(self, metrics: dict, in_warmup: bool) -> bool:
        """Keep the epoch's metrics; True when it is the new best. An epoch still inside the LR
        warm-up may become the best but never counts towards early stopping: its model is judged
        before the learning rate has reached its value."""
        self.history.append({k: float(v) for k, v in metrics.items()})
        auc = metrics["val/select_auc_ema"]
        improved = self.best_epoch == 0 or (not math.isnan(auc) and auc > self.best_auc)
        if improved:
            self.best_auc, self.best_epoch, self.bad_epochs = float(auc), self.epoch, 0
        elif not in_warmup:
            self.bad_epochs += 1
        return improved

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.bad_epochs >= patience


def _epoch_report(metrics: dict, progress: Progress, st: StageConfig) -> dict:
    """An epoch's metrics as reported: plus the stage's best so far and ``stage_done``, which lets
    a scheduler that may kill the run right after this report tell "finished" apart."""
    return {**metrics, "best/select_auc_ema": progress.best_auc, "best/epoch": progress.best_epoch,
            "stage_done": float(progress.epoch >= st.epochs or progress.should_stop(st.patience))}


def _resumed_report(progress: Progress, st: StageConfig) -> dict | None:
    """The report of the epoch a resume goes on from, to send again: a worker killed between
    saving an epoch and reporting it lost that report, and a search must see every epoch (ASHA
    judges a rung by it, Optuna takes a trial's last report as its value, the search report reads
    a trial's outcome from it). A report already had changes nothing: ASHA records a trial once
    per rung, and the search report takes maxima and the last report. None before any epoch."""
    if not progress.history or int(progress.history[-1]["epoch"]) != progress.epoch:
        return None
    last = dict(progress.history[-1])  # recorded as floats
    last.update({k: int(last[k]) for k in ("stage", "epoch", "step", "world_size") if k in last})
    return _epoch_report(last, progress, st)


def run_stage(
    cfg: Config,
    stage: int,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    stage_dir: Path,
    *,
    dist_info: DistInfo | None = None,
    report: ReportFn | None = None,
    log_dir: Path | None = None,
    init_from: Path | None = None,
    resume_from: Path | None = None,
    augment_on_device: bool | None = None,
) -> StageResult:
    """Train one stage to its end (or early stop); resumes from ``resume_from`` or ``last.pt``.

    Stage II must be given Stage I's checkpoint (``init_from``) and starts from its EMA weights:
    the original silently fell back to ImageNet weights when the file was missing (flaw 2).
    ``augment_on_device``: None follows ``stageN.augment.device``; True/False forces the batched
    or the per-sample path (tests run the batched one on a CPU, where the setting refuses gpu).
    """
    st, key = cfg.stage(stage), f"stage{stage}"
    di = dist_info or DistInfo.current()
    files = stage_files(Path(stage_dir))
    state = _build_state(cfg, stage, init_from, di)
    progress = Progress()
    if di.rank == 0 and files["last"].parent.is_dir():
        for partial in remove_partial_files(files["last"].parent):  # a writer killed mid-write left it
            _log(di, f"{key}: removed {partial.name}, a checkpoint whose writing was cut off")
    resume_path, saved = _latest_checkpoint(resume_from, files["last"])
    if resume_path is not None:
        progress = state.restore(resume_path, stage, saved, cfg.model.arch)
        _log(di, f"{key}: resumed from {resume_path} at epoch {progress.epoch}, step {progress.step}")
    progress = _resume_alike(state, progress, resume_path, cfg, stage, di)

    data = training_data(cfg, stage, train_samples, state.runtime, di, augment_on_device)
    plan = _step_plan(st, key, data.sampler.epoch_size, di)
    _log(di, f"{key}: {len(data.dataset)} train images, {len(val_samples)} validation, {plan.steps_per_epoch} steps/epoch "
             f"of {st.batch_size} ({di.world_size} worker(s) x {st.accum_steps} x {plan.micro}), "
             f"{state.runtime.device} {state.runtime.precision}, strong augmentation "
             f"{'batched on ' + state.runtime.device.type if data.device_augment else 'per sample in the loader'}; "
             f"selection on {cfg.eval.select_on} validation AUC (EMA)"
             + _describe_prepared(data.dataset) + "\n"
             + data.sampler.plan().describe())

    logger = make_logger(log_dir, di.rank)

    def finish() -> StageResult:
        """What the stage leaves once its training is over: the Grad-CAM grid of the final EMA
        weights (the same validation images every stage) and, on rank 0, ``stage.json``."""
        if logger.keeps_images and val_samples:
            logger.images("explain/gradcam_ema", validation_grid(state.ema.module, val_samples, st.image_size, cfg),
                          progress.step)
        done = StageResult(
            stage, progress.best_auc, progress.best_epoch, progress.epoch, progress.epoch < st.epochs,
            str(files["best"]), str(files["last"]), cfg.eval.select_on, progress.history,
        )
        if di.rank == 0:
            atomic_write_text(files["summary"], json.dumps(asdict(done), indent=2))
        return done

    result: StageResult | None = None
    try:
        # decided on the progress every rank shares after _resume_alike, not on whether this rank
        # found a checkpoint: every rank must make the same reports
        again = _resumed_report(progress, st) if report is not None else None
        if again is not None:
            _log(di, f"{key}: epoch {progress.epoch}'s report sent again (a worker killed before sending it lost it)")
            if again["stage_done"]:  # as below: what the stage leaves is written before its last report
                result = finish()
            logger.flush()
            report(again, None)
        for epoch in range(progress.epoch, st.epochs):
            if progress.should_stop(st.patience):  # resumed after an early stop that was not recorded
                break
            _seed_epoch(cfg.seed, di.rank, epoch)
            loader, augment = data.epoch(epoch, plan.micro, cfg, state.runtime, di.rank)
            t0 = time.time()
            window = _ProgressWindow(logger, cfg.runtime.log_every, key, di)
            train_stats = train_one_epoch(state, plan, loader, progress.step, epoch, window,
                                          np.random.default_rng([cfg.seed, di.rank, epoch, 7]), augment)
            progress.step = train_stats.pop("step")
            # Every rank must validate, and rank 0 save, the same model: see average_buffers.
            average_buffers(state.model, di)
            average_buffers(state.ema.module, di)
            val = validate({"raw": state.model, "ema": state.ema.module}, val_samples, st.image_size,
                           state.runtime, cfg, di)
            progress.epoch = epoch + 1
            metrics = {"stage": stage, "epoch": progress.epoch, "step": progress.step, "world_size": di.world_size,
                       **train_stats, **val,
                       "time/epoch_s": time.time() - t0}
            improved = progress.record(metrics, in_warmup=progress.step <= plan.warmup_steps)
            metrics = _epoch_report(metrics, progress, st)
            for name, value in metrics.items():
                if name.startswith(("val/", "best/")):
                    logger.scalar(name, value, progress.step)
            ckpt = None
            if di.rank == 0:
                ckpt = save_stage_checkpoints(files, state.checkpoint(cfg, stage, progress), improved)
            barrier(di)
            _log(di, f"{key} epoch {progress.epoch}/{st.epochs}: loss {metrics['train/loss']:.4f} "
                     f"val AUC raw {val['val/auc']:.4f} EMA {val['val/auc_ema']:.4f}, "
                     f"{cfg.eval.select_on} EMA {val['val/select_auc_ema']:.4f}"
                     + (" (best)" if improved else f" ({progress.bad_epochs} without improvement)"))
            if metrics["stage_done"]:
                # A scheduler may end the trial at this report (ASHA does at max_t), and a report
                # uploads the stage's files first: so the summary and the last TensorBoard entries
                # are written before it, not after (a search in S3 lost a trial's stage.json so).
                result = finish()
            logger.flush()
            if report is not None:
                report(metrics, ckpt)
            if progress.should_stop(st.patience):
                _log(di, f"{key}: early stop after {progress.epoch} epochs (patience {st.patience})")
                break
        # None only when no epoch ran: resumed after the last one, or after an unrecorded early stop
        return result or finish()
    finally:
        data.close()
        logger.close()


@dataclass(frozen=True)
class EpochAugment:
    """The batched strong augmentation of one epoch: ``DeviceAugment`` with a generator on the
    training device seeded from (seed, rank, epoch), and the dataset transform's light/strong
    switch for that epoch. uint8 (N, 3, H, W) on the device -> normalised float."""

    augment: DeviceAugment
    generator: torch.Generator
    strong: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with record_function("trueface.augment"):  # a named range in a profiler trace (jobs.benchmark gpu --trace)
            return self.augment(images, self.generator, strong=self.strong)


@dataclass
class TrainingData:
    """A stage's training input: the dataset (its transform switches light -> strong by epoch),
    its sampler, ``DeviceAugment`` when the strong ops run batched on the training device, and
    the stage's one DataLoader, made by the first ``epoch`` call (its workers outlive the epochs:
    ``trueface.data.epoch_keys``); ``close`` stops them."""

    dataset: ImageDataset
    sampler: BalancedSampler
    device_augment: DeviceAugment | None
    loader: DataLoader | None = None

    def epoch(self, epoch: int, micro: int, cfg: Config, runtime: Runtime,
              rank: int) -> tuple[DataLoader, EpochAugment | None]:
        """The loader set to ``epoch`` (and the epoch's batched augmentation, None on the
        per-sample path)."""
        self.sampler.set_epoch(epoch)
        self.dataset.transform.set_epoch(epoch)  # the trainer's copy: EpochAugment's light/strong switch
        if self.loader is None or self.loader.batch_size != micro:
            self.close()
            self.loader = _train_loader(self.dataset, self.sampler, micro, cfg, runtime, rank)
        loader = self.loader
        if self.device_augment is None:
            return loader, None
        generator = torch.Generator(device=runtime.device)
        generator.manual_seed(_mix_seed(cfg.seed, rank, epoch, 13))
        return loader, EpochAugment(self.device_augment, generator, self.dataset.transform.is_strong)

    def close(self) -> None:
        """Stops the loader's workers now rather than whenever the collector gets to them."""
        loader, self.loader = self.loader, None
        iterator = getattr(loader, "_iterator", None)  # a persistent loader keeps its workers' iterator
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def training_data(cfg: Config, stage: int, samples: Sequence[Sample], runtime: Runtime, di: DistInfo,
                  on_device: bool | None = None) -> TrainingData:
    """The dataset, sampler and (batched path) ``DeviceAugment`` of a stage. ``on_device``: None
    asks ``runs_on_device`` (``stageN.augment.device`` and the runtime's device)."""
    st, key = cfg.stage(stage), f"stage{stage}"
    if on_device is None:
        on_device = runs_on_device(st.augment.device, runtime.device, f"{key}.augment.device")
    transform = (Uint8TrainTransform if on_device else TrainTransform)(st.image_size, st.light_epochs, st.augment)
    dataset = ImageDataset(samples, transform, decode_size(cfg, st.image_size), image_loader(cfg, st.image_size))
    sampler = BalancedSampler(dataset.labels, dataset.domains, st.balance, st.samples_per_epoch, di.rank,
                              di.world_size, cfg.seed)
    return TrainingData(dataset, sampler, DeviceAugment(st.augment, dtype=runtime.augment_dtype) if on_device else None)


def _latest_checkpoint(given: Path | None, last: Path) -> tuple[Path | None, dict | None]:
    """Where to resume: ``given`` (Ray's checkpoint of the last epoch it was told of), or the
    stage's ``last.pt`` where there is none or ``last.pt`` is further on. A worker killed after an
    epoch's save but before Ray had its report leaves ``last.pt`` an epoch ahead; resuming from
    Ray's would train that epoch again and rewrite its checkpoints (after a final epoch, those of a
    finished stage). With the chosen checkpoint's content where both were read to compare them."""
    if not last.is_file():
        return given, None
    if given is None:
        return last, None
    states = {path: load_checkpoint(path) for path in (given, last)}
    point = {path: (int(st["epoch"]), int(st["step"])) for path, st in states.items()}
    chosen = last if point[last] > point[given] else given
    return chosen, states[chosen]


def _resume_alike(state: TrainState, progress: Progress, resume_path: Path | None, cfg: Config, stage: int,
                  di: DistInfo) -> Progress:
    """Every rank goes on from where rank 0 resumed. With a URI storage each node keeps its own
    copy of ``last.pt``, and a node's copy can be newer than the storage's (a save whose upload a
    crash cut off): ranks resuming from different epochs would train on from them, DDP would make
    their weights rank 0's without a word, and the ranks would then wait at collectives the others
    never reach. Where they differ, rank 0 sends its whole restored state (a complete checkpoint,
    its own or the storage's) to the others, which take it on: one consistent run, said in the log."""
    points = gather_objects((progress.epoch, progress.step, str(resume_path) if resume_path else None), di)
    if len({(epoch, step) for epoch, step, _ in points}) == 1:
        return progress
    where = "; ".join(f"rank {rank} at epoch {epoch}, step {step}, from {path or 'no checkpoint'}"
                      for rank, (epoch, step, path) in enumerate(points))
    _log(di, f"stage{stage}: the workers resumed from different checkpoints ({where}): every rank goes on from "
             f"rank 0's, at epoch {progress.epoch}, step {progress.step}. (Each node keeps its own copy of the stage's "
             f"last.pt, under data.cache_dir with a URI storage; a copy newer than the storage's was left by an "
             f"upload a crash cut off.)")
    saved = state.checkpoint(cfg, stage, progress) if di.rank == 0 else None
    # on the CPU: NCCL carries the pickle through this rank's GPU, and a CUDA tensor unpickles onto
    # the device it left, which on another node's worker may be another worker's GPU
    saved = broadcast_object(tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, saved), di)
    return progress if di.rank == 0 else state.apply(saved)


def _describe_prepared(dataset: ImageDataset) -> str:
    """"; prepared cache: N of M train images" (data.prepared), so a cache that misses is seen."""
    if not isinstance(dataset.load, PreparedImages):
        return ""
    held = dataset.load.coverage(dataset.samples)
    note = "" if held == len(dataset) else " (the rest decoded from their files: build it with python -m jobs.prepare)"
    return f"; prepared cache: {held} of {len(dataset)} train images{note}"


def _build_state(cfg: Config, stage: int, init_from: Path | None, di: DistInfo) -> TrainState:
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    if cfg.runtime.keep_freed_memory:
        keep_freed_memory()
    # The initial weights (random init, the new head) come from cfg.seed alone: the same on every
    # rank (each rank's EMA copies its own model before DDP broadcasts rank 0's) and in every trial
    # of a search, so trials differ by their parameters only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix_seed(cfg.seed, stage, 0x1417))
        model = _initial_model(cfg, stage, init_from)
    model.to(runtime.device, memory_format=torch.channels_last if cfg.model.channels_last else torch.preserve_format)
    ema = ModelEma(model, cfg.stage(stage).ema_decay, cfg.stage(stage).ema_warmup)  # plain BatchNorm, always
    if di.world_size > 1 and cfg.scaling.sync_batchnorm:
        if runtime.device.type != "cuda":
            raise StageError("scaling.sync_batchnorm needs GPUs: torch's SyncBatchNorm runs on CUDA only; "
                             "set scaling.sync_batchnorm=false to train on CPU workers")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameter and buffer names
    # Only the training forward is compiled: validation, the EMA and checkpoints use the bare
    # module (its parameters are the compiled wrapper's). DDP wraps the compiled module, as
    # PyTorch advises (compile the inner module, not the DDP wrapper). dynamic=False: a stage's
    # training batches keep one shape (drop_last). With the default, a second image size in the
    # same process (jobs.benchmark gpu runs Stage II after Stage I; a Ray run starts each stage's
    # workers afresh) would be compiled with the image's sides symbolic, so the benchmark would
    # time kernels built for any size where a run's fresh process builds them for its one size.
    train_model: nn.Module = torch.compile(model, dynamic=False) if cfg.runtime.compile else model
    if di.world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return TrainState(model, ema, make_optimizer(model, cfg.stage(stage)), runtime, train_model)


def too_few_samples(key: str, epoch_samples: int, batch_size: int) -> str:
    return (f"{key}: {epoch_samples} samples per epoch is less than one step of {batch_size} (the global batch); "
            f"lower {key}.batch_size (or raise {key}.samples_per_epoch)")


def steps_per_epoch(epoch_samples: int, batch_size: int) -> int:
    """Whole global batches in the epoch: the same for any number of workers. (Each rank's share is
    padded to an equal length for DDP; counting steps on that share gave an extra step of repeated
    images where the epoch does not divide by the workers: 10 samples in batches of 4 trained 2
    steps on 1 or 2 workers and 3 on 4, and the LR and EMA schedules moved with it.)"""
    return epoch_samples // batch_size


def _step_plan(st: StageConfig, key: str, epoch_samples: int, di: DistInfo) -> StepPlan:
    micro = micro_batch_size(st, di.world_size, key)
    steps = steps_per_epoch(epoch_samples, st.batch_size)
    if steps < 1:
        raise StageError(too_few_samples(key, epoch_samples, st.batch_size))
    return StepPlan(st, key, micro, steps, round(st.warmup_epochs * steps))


def _initial_model(cfg: Config, stage: int, init_from: Path | None) -> nn.Module:
    if stage == 1:
        return build_model(cfg.model)
    if init_from is None:
        raise StageError("Stage II needs Stage I's checkpoint (init_from) and will not start from other weights")
    state = load_checkpoint(init_from)
    if state["stage"] != 1:
        raise StageError(f"{init_from} is a Stage {state['stage']} checkpoint; Stage II starts from a Stage I one")
    model = build_model(replace(cfg.model, weights="none"))
    check_weights_fit(model, state["ema"], init_from, state, cfg.model.arch)
    model.load_state_dict(state["ema"])
    return model


def saved_arch(state: dict) -> str:
    """The model.arch of the run that saved the checkpoint ``state`` (a checkpoint from before the
    key existed trained the default's)."""
    return str(((state.get("config") or {}).get("model") or {}).get("arch", Config().model.arch))


def check_weights_fit(model: nn.Module, weights: dict, path: Path | str, state: dict, arch: str) -> None:
    """Raise StageError, in one line naming the checkpoint at ``path`` and both architectures, where
    ``weights`` (from ``state``) do not fit ``model``, this run's ``arch``: torch's load_state_dict
    would list every tensor that differs instead (a run resumed, or Stage II started, from a
    checkpoint saved before model.arch changed)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    resized = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if not (missing or extra or resized):
        return
    saved = saved_arch(state)
    first = (missing or extra or resized)[0]
    detail = (f"{len(missing)} tensors missing, {len(extra)} unexpected, {len(resized)} of another shape "
              f"(first: {first})")
    if saved != arch:
        raise StageError(f"{path} holds a {saved} (its saved config's model.arch), but this run's model.arch is "
                         f"{arch}: its weights do not fit ({detail}). Set model.arch={saved}, or start from a "
                         f"checkpoint of a {arch}")
    raise StageError(f"{path}: its weights do not fit this run's {arch} model, though its saved config names the "
                     f"same model.arch ({detail}); was it saved by another TrueFace version?")


def make_optimizer(model: nn.Module, st: StageConfig) -> torch.optim.Optimizer:
    # The fused implementation updates every parameter in one pass: on CUDA a few kernels instead
    # of a launch per tensor, on the CPU one loop over each tensor instead of a dozen foreach ops
    # (ResNet-50, 2 threads: AdamW's step 53 -> 17 ms, SGD's 30 -> 12 ms; AdamW's weights within
    # 2.4e-7 of foreach's after 13 steps, SGD's identical). Elsewhere torch's default.
    fused = True if next(model.parameters()).device.type in ("cuda", "cpu") else None
    if st.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay,
                               fused=fused)
    return torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay, fused=fused)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=1), dim=1).mean()


def train_step(state: TrainState, images: torch.Tensor, labels: torch.Tensor, st: StageConfig,
               rng: np.random.Generator, sync_grads: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch (MixUp, label smoothing); returns its share of the
    step's loss, detached. ``sync_grads=False`` keeps DDP from all-reducing gradients that the
    next micro-batch of the same step will add to."""
    rt = state.runtime
    images = images.to(rt.device, non_blocking=True, memory_format=torch.channels_last)
    # non-blocking (the loader pins its batches on CUDA): a blocking copy would make the host wait
    # for the previous step's kernels before it could queue this step's
    targets = soft_targets(labels.to(rt.device, non_blocking=True), 2, st.label_smoothing)
    images, targets, _ = mixup(images, targets, st.mixup_alpha, rng)
    no_sync = getattr(state.train_model, "no_sync", None)
    with contextlib.nullcontext() if sync_grads or no_sync is None else no_sync():
        with rt.autocast():
            logits = _forward(state.train_model, images)
        loss = soft_cross_entropy(logits, targets) / st.accum_steps
        rt.backward(loss)
    return loss.detach()


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)``; where ``runtime.compile=true`` and torch.compile cannot compile it (the
    first call compiles: no C++ compiler on a CPU, no Triton on a GPU), a StageError that names the
    key instead of the compiler's own traceback."""
    try:
        return model(images)
    except Exception as exc:
        # torch._dynamo is imported here only on an error (2 s): compiling has imported it already
        if isinstance(exc, torch._dynamo.exc.BackendCompilerFailed):
            reason = str(exc.inner_exception).strip().splitlines()
            raise StageError(f"runtime.compile=true: torch.compile could not compile the model "
                             f"({type(exc.inner_exception).__name__}: {reason[0] if reason else 'no message'}); "
                             "set runtime.compile=false to train without compiling") from exc
        raise


def train_one_epoch(state: TrainState, plan: StepPlan, loader: DataLoader, step: int, epoch: int,
                    window: "_ProgressWindow", rng: np.random.Generator, augment: Callable | None = None) -> dict:
    """``plan.steps_per_epoch`` optimizer steps from global step ``step``; returns the epoch's
    training metrics and the new ``step``. ``augment``: the epoch's ``EpochAugment`` on the batched
    path (the loader then yields uint8; on CUDA it runs a batch ahead, ``training_batches``), None
    on the per-sample path. ``window`` is told of every micro-batch (``add``) and step
    (``step_done``) and holds the ``logger``."""
    st = plan.st
    state.train_model.train()
    loss_sum = torch.zeros((), device=state.runtime.device)
    micro_steps, decay, lr = plan.steps_per_epoch * st.accum_steps, 0.0, 0.0
    with training_batches(loader, state.runtime, augment, micro_steps, times=window.input) as batches:
        for i, (images, labels, _) in enumerate(batches):
            if i == 0 and window.logger.keeps_images:  # what the model is given (before MixUp), on either path
                window.logger.images("train/augmented_samples", make_grid(denormalize(images[:16]).cpu(), nrow=8), step)
            lr = lr_at(step, plan.total_steps, plan.warmup_steps, st.lr, st.final_lr)
            set_lr(state.optimizer, lr)
            last_micro = (i + 1) % st.accum_steps == 0
            with record_function("trueface.train_step"):
                loss = train_step(state, images, labels, st, rng, sync_grads=last_micro)
            loss_sum += loss
            window.add(loss, len(images))
            if not last_micro:
                continue
            with record_function("trueface.optimizer_step"):
                state.runtime.step(state.optimizer)
            step += 1
            with record_function("trueface.ema_update"):
                decay = state.ema.update(state.model, step)
            window.step_done(step, epoch, lr, decay)
    # The mean over every rank's micro-batches, the same number on each: a rank that alone saw a
    # non-finite loss and raised would leave the others waiting in average_buffers' all-reduce
    # until the collective's timeout (30 minutes under Ray Train's NCCL).
    mean_loss = mean_over_ranks(loss_sum, window.di).item() / plan.steps_per_epoch
    if not math.isfinite(mean_loss):
        raise StageError(f"{plan.key}: training diverged (mean loss {mean_loss}) in epoch {epoch + 1}; "
                         f"lower {plan.key}.lr (now {st.lr:g}) or raise {plan.key}.batch_size")
    return {"step": step, "train/loss": mean_loss, "train/lr": lr, "train/ema_decay": decay,
            "train/strong_augment": float(epoch >= st.light_epochs)}


class _ProgressWindow:
    """Loss, throughput and input wait since the last progress line; the only per-step
    synchronisation. ``input`` is handed to ``training_batches``, which adds up where the input
    path's time went."""

    def __init__(self, logger, log_every: int, key: str, di: DistInfo) -> None:
        self.logger, self.log_every, self.key, self.di = logger, log_every, key, di
        self.loss: torch.Tensor | None = None
        self.start, self.images, self.steps = time.time(), 0, 0
        self.input = InputTimes()
        self._input_mark = self.input.snapshot()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss = loss.clone() if self.loss is None else self.loss + loss
        self.images += images

    def step_done(self, step: int, epoch: int, lr: float, decay: float) -> None:
        self.steps += 1
        if step % self.log_every:
            return
        elapsed = time.time() - self.start
        # every rank's micro-batches, as the epoch's train/loss: rank 0's alone would be half of
        # each global batch on 2 workers (every rank reaches this step: the same steps, log_every)
        mean_loss = mean_over_ranks(self.loss, self.di).item() / self.steps
        rate = self.images * self.di.world_size / elapsed
        # this rank's share of the wall time the training loop sat waiting for a batch: above a few
        # percent the input path (loader workers, augmentation) is what limits the img/s
        waited = self.input.since(self._input_mark).wait_share(elapsed)
        self.logger.scalar("train/loss", mean_loss, step)
        self.logger.scalar("train/lr", lr, step)
        self.logger.scalar("train/ema_decay", decay, step)
        self.logger.scalar("train/images_per_sec", rate, step)
        self.logger.scalar("train/input_wait_share", waited, step)
        _log(self.di, f"{self.key} epoch {epoch + 1} step {step} loss {mean_loss:.4f} lr {lr:.2e} {rate:.1f} img/s, "
                      f"input wait {waited:.0%}")
        self.loss, self.start, self.images, self.steps = None, time.time(), 0, 0
        self._input_mark = self.input.snapshot()


def validate(models: dict[str, nn.Module], samples: Sequence[Sample], image_size: int, runtime: Runtime,
             cfg: Config, di: DistInfo) -> dict[str, float]:
    """Validation metrics of the raw and EMA weights (``models``: {"raw": ..., "ema": ...})."""
    scores = {}
    for name, net in models.items():
        scores[name] = predict_scores(net, samples, image_size, runtime, cfg, di)
        if not np.isfinite(scores[name]).all():
            raise StageError(f"the {name} model gives non-finite validation scores: its weights or BatchNorm "
                             f"statistics have blown up; lower the learning rate or train more steps per epoch")
    return validation_metrics(np.array([s.label for s in samples]), [s.domain for s in samples], scores,
                              cfg.eval.select_on)


def validation_metrics(labels: np.ndarray, domains: Sequence[str], scores: dict[str, np.ndarray],
                       select_on: str) -> dict[str, float]:
    """Pooled AUC and accuracy at 0.5, each domain's AUC, and the selection AUC, per weights
    (``raw`` -> ``val/auc``, ``ema`` -> ``val/auc_ema``, ...).

    ``select_on``: ``mean_domain`` (mean of the domains' AUCs: every domain counts the same, as the
    balanced sampler intends), ``worst_domain`` (their minimum) or ``pooled`` (all images as one
    set: dominated by the largest domain). A domain whose validation split holds one class only has
    no AUC and is left out of the mean; with none left the selection AUC is NaN."""
    if select_on not in SELECT_MODES:
        raise ValueError(f"eval.select_on must be one of {SELECT_MODES}, got {select_on!r}")
    domains = np.asarray(domains)
    out: dict[str, float] = {}
    for name, sc in scores.items():
        suffix = "" if name == "raw" else f"_{name}"
        out[f"val/auc{suffix}"] = roc_auc(labels, sc)
        out[f"val/accuracy{suffix}"] = binary_metrics(labels, sc, 0.5)["accuracy"]
        per_domain = {}
        for d in sorted(set(domains.tolist())):
            mask = domains == d
            per_domain[d] = out[f"val/{d}/auc{suffix}"] = roc_auc(labels[mask], sc[mask])
        defined = [v for v in per_domain.values() if not math.isnan(v)]
        if select_on == "pooled":
            out[f"val/select_auc{suffix}"] = out[f"val/auc{suffix}"]
        elif not defined:
            out[f"val/select_auc{suffix}"] = float("nan")
        else:
            out[f"val/select_auc{suffix}"] = float(np.mean(defined) if select_on == "mean_domain" else np.min(defined))
    return out


def _train_loader(ds, sampler, micro: int, cfg: Config, runtime: Runtime, rank: int) -> DataLoader:
    # One loader a stage, its workers forked once (persistent): each sample comes by an (epoch,
    # index, occurrence) key, picks the epoch's transform (light -> strong) and seeds its draws
    # from the key, the seed and the rank, so an epoch draws the same however it was reached
    # (resumed or not) and however many workers read it, and an image drawn twice in an epoch
    # is augmented twice. Its own generator: without one, the first iterator takes its workers'
    # base seed from the global generator, one draw in the first epoch a process runs, so a
    # resumed epoch's dropout (on the CPU) would not be the uninterrupted run's.
    workers = cfg.data.loader_workers
    return DataLoader(EpochSeededDataset(ds, cfg.seed, rank), batch_size=micro, sampler=EpochKeyedSampler(sampler),
                      num_workers=workers, drop_last=True, pin_memory=runtime.device.type == "cuda",
                      persistent_workers=workers > 0, worker_init_fn=freeze_inherited_objects,
                      generator=torch.Generator().manual_seed(_mix_seed(cfg.seed, rank, 0x10AD)))


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed every RNG the main process uses from (seed, rank, epoch): resumed epochs replay exactly."""
    s = _mix_seed(seed, rank, epoch)
    torch.manual_seed(s)
    random.seed(s)


def _log(di: DistInfo, message: str) -> None:
    if di.rank == 0:
        print(message, flush=True)
