"""Training and evaluation loops: plain PyTorch, explicit arguments, progress out through callables.

Usage (no Ray needed; ``jobs/`` calls the same function inside Ray Train workers)::

    result = run_stage(cfg, 1, train_samples, val_samples, Path("runs/x/stage1"))
    result = run_stage(cfg, 2, ..., Path("runs/x/stage2"), init_from=result.best_checkpoint)

One optimizer step = ``accum_steps`` micro-batches on every worker; the global batch is
``stage.batch_size`` whatever the number of workers. Schedules (LR, EMA decay, augmentation
switch, sampler order, random seeds) are pure functions of the step and epoch, so a checkpoint's
step and epoch are all it takes to resume with the identical next step.
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
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from trueface.augment import TrainTransform, denormalize, eval_transform, mixup, soft_targets
from trueface.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap
from trueface.config import Config, StageConfig, to_dict
from trueface.data.dataset import ImageDataset
from trueface.data.layout import Sample
from trueface.data.sampler import BalancedSampler
from trueface.ema import ModelEma
from trueface.metrics import binary_metrics, roc_auc
from trueface.model import build_model, fake_probability
from trueface.precision import Runtime
from trueface.schedule import lr_at, set_lr
from trueface.atomic import atomic_write_text, remove_partial_files
from trueface.tensorboard import make_logger

ReportFn = Callable[[dict, "Path | None"], None]


class StageError(RuntimeError):
    """A stage cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DistInfo":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


@dataclass
class StageResult:
    stage: int
    best_auc_ema: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    best_checkpoint: str
    last_checkpoint: str
    history: list[dict] = field(default_factory=list)


def stage_files(stage_dir: Path) -> dict[str, Path]:
    return {"last": stage_dir / "last.pt", "best": stage_dir / "best.pt", "summary": stage_dir / "stage.json"}


def finished_stage(stage_dir: Path) -> StageResult | None:
    """The result of a stage that already ran to its end in ``stage_dir``, else None."""
    path = stage_files(stage_dir)["summary"]
    if not path.is_file():
        return None
    return StageResult(**json.loads(path.read_text()))


def micro_batch_size(st: StageConfig, world_size: int, key: str) -> int:
    per_step = world_size * st.accum_steps
    if st.batch_size % per_step:
        raise StageError(
            f"{key}.batch_size={st.batch_size} is the global batch and must be divisible by "
            f"workers x accum_steps = {world_size} x {st.accum_steps}; change one of them"
        )
    return st.batch_size // per_step


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
) -> StageResult:
    """Train one stage to its end (or early stop); resumes from ``resume_from`` or ``last.pt``.

    Stage II must be given Stage I's checkpoint (``init_from``) and starts from its EMA weights:
    the original silently fell back to ImageNet weights when the file was missing (flaw 2).
    """
    st, key = cfg.stage(stage), f"stage{stage}"
    di = dist_info or DistInfo.current()
    files = stage_files(Path(stage_dir))
    runtime = Runtime.create(cfg.runtime.device, cfg.runtime.precision)
    micro = micro_batch_size(st, di.world_size, key)

    model = _initial_model(cfg, stage, init_from)
    model.to(runtime.device, memory_format=torch.channels_last if cfg.model.channels_last else torch.preserve_format)
    ema = ModelEma(model, st.ema_decay, st.ema_warmup)
    optimizer = make_optimizer(model, st)
    progress = _Progress()
    if di.rank == 0 and files["last"].parent.is_dir():
        for partial in remove_partial_files(files["last"].parent):  # a writer killed mid-write left it
            _log(di, f"{key}: removed {partial.name}, a checkpoint whose writing was cut off")
    resume_path = resume_from or (files["last"] if files["last"].is_file() else None)
    if resume_path is not None:
        progress = _restore(resume_path, stage, model, ema, optimizer, runtime)
        _log(di, f"{key}: resumed from {resume_path} at epoch {progress.epoch}, step {progress.step}")

    train_ds = ImageDataset(train_samples, TrainTransform(st.image_size, st.light_epochs, st.augment), _decode(cfg, st.image_size))
    sampler = BalancedSampler(train_ds.labels, train_ds.domains, st.balance, st.samples_per_epoch, di.rank, di.world_size, cfg.seed)
    steps_per_epoch = len(sampler) // (micro * st.accum_steps)
    if steps_per_epoch < 1:
        raise StageError(f"{key}: {len(sampler)} samples per worker per epoch is less than one step of {micro} x {st.accum_steps}; lower {key}.batch_size")
    total_steps = steps_per_epoch * st.epochs
    warmup_steps = round(st.warmup_epochs * steps_per_epoch)
    _log(di, f"{key}: {len(train_ds)} train images, {len(val_samples)} validation, {steps_per_epoch} steps/epoch "
             f"of {st.batch_size} ({di.world_size} worker(s) x {st.accum_steps} x {micro}), {runtime.device} {runtime.precision}\n"
             + sampler.plan().describe())

    train_model: nn.Module = model
    if di.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    logger = make_logger(log_dir, di.rank)
    try:
        for epoch in range(progress.epoch, st.epochs):
            if progress.should_stop(st.patience):  # resumed after an early stop that was not recorded
                break
            _seed_epoch(cfg.seed, di.rank, epoch)
            sampler.set_epoch(epoch)
            train_ds.transform.set_epoch(epoch)
            loader = _train_loader(train_ds, sampler, micro, cfg, runtime, epoch, di.rank)
            t0 = time.time()
            loop = _TrainLoop(train_model, ema, optimizer, runtime, st, total_steps, warmup_steps, logger, cfg.runtime.log_every, key, di)
            train_stats = loop.run_epoch(loader, steps_per_epoch, progress.step, epoch, np.random.default_rng([cfg.seed, di.rank, epoch, 7]))
            progress.step = train_stats.pop("step")
            val = validate(model, ema.module, val_samples, st.image_size, runtime, cfg, di)
            progress.epoch = epoch + 1
            metrics = {"stage": stage, "epoch": progress.epoch, "step": progress.step, **train_stats, **val,
                       "time/epoch_s": time.time() - t0}
            improved = progress.record(metrics)
            metrics["best/auc_ema"] = progress.best_auc
            # Lets a scheduler that may kill the run right after this report tell "finished" apart.
            metrics["stage_done"] = float(progress.epoch >= st.epochs or progress.should_stop(st.patience))
            for name, value in metrics.items():
                if name.startswith(("val/", "best/")):
                    logger.scalar(name, value, progress.step)
            ckpt = _save(files, improved, di, cfg, stage, model, ema, optimizer, runtime, progress)
            _log(di, f"{key} epoch {progress.epoch}/{st.epochs}: loss {metrics['train/loss']:.4f} "
                     f"val AUC raw {val['val/auc']:.4f} EMA {val['val/auc_ema']:.4f}"
                     + (" (best)" if improved else f" ({progress.bad_epochs} without improvement)"))
            if report is not None:
                report(metrics, ckpt)
            if progress.should_stop(st.patience):
                _log(di, f"{key}: early stop after {progress.epoch} epochs (patience {st.patience})")
                break
    finally:
        logger.close()
    result = StageResult(
        stage, progress.best_auc, progress.best_epoch, progress.epoch,
        progress.epoch < st.epochs, str(files["best"]), str(files["last"]), progress.history,
    )
    if di.rank == 0:
        atomic_write_text(files["summary"], json.dumps(asdict(result), indent=2))
    return result


@dataclass
class _Progress:
    """Where a stage stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    best_auc: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)

    def record(self, metrics: dict) -> bool:
        self.history.append({k: float(v) for k, v in metrics.items()})
        auc = metrics["val/auc_ema"]
        improved = self.best_epoch == 0 or (not math.isnan(auc) and auc > self.best_auc)
        if improved:
            self.best_auc, self.best_epoch, self.bad_epochs = float(auc), self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.bad_epochs >= patience


def _initial_model(cfg: Config, stage: int, init_from: Path | None) -> nn.Module:
    if stage == 1:
        return build_model(cfg.model)
    if init_from is None:
        raise StageError("Stage II needs Stage I's checkpoint (init_from) and will not start from other weights")
    state = load_checkpoint(init_from)
    if state["stage"] != 1:
        raise StageError(f"{init_from} is a Stage {state['stage']} checkpoint; Stage II starts from a Stage I one")
    model = build_model(replace(cfg.model, weights="none"))
    model.load_state_dict(state["ema"])
    return model


def make_optimizer(model: nn.Module, st: StageConfig) -> torch.optim.Optimizer:
    if st.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=st.lr, momentum=st.momentum, weight_decay=st.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=1), dim=1).mean()


class _TrainLoop:
    """One epoch of optimizer steps; holds only what every step needs."""

    def __init__(self, model, ema, optimizer, runtime, st, total_steps, warmup_steps, logger, log_every, key, di):
        self.model, self.ema, self.optimizer, self.runtime, self.st = model, ema, optimizer, runtime, st
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.logger, self.log_every, self.key, self.di = logger, log_every, key, di

    def run_epoch(self, loader, steps_per_epoch: int, step: int, epoch: int, rng: np.random.Generator) -> dict:
        st, rt = self.st, self.runtime
        self.model.train()
        loss_sum = torch.zeros((), device=rt.device)
        window_loss, window_start, window_images, window_steps = torch.zeros((), device=rt.device), time.time(), 0, 0
        micro_steps, decay, lr = steps_per_epoch * st.accum_steps, 0.0, 0.0
        for i, (images, labels, _) in enumerate(loader):
            if i >= micro_steps:
                break
            if i == 0:
                self.logger.images("train/augmented_samples", make_grid(denormalize(images[:16]), nrow=8), step)
            lr = lr_at(step, self.total_steps, self.warmup_steps, st.lr, st.final_lr)
            set_lr(self.optimizer, lr)
            images = images.to(rt.device, non_blocking=True, memory_format=torch.channels_last)
            targets = soft_targets(labels, 2, st.label_smoothing).to(rt.device)
            images, targets, _ = mixup(images, targets, st.mixup_alpha, rng)
            last_micro = (i + 1) % st.accum_steps == 0
            sync = contextlib.nullcontext() if last_micro or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with rt.autocast():
                    logits = self.model(images)
                loss = soft_cross_entropy(logits, targets) / st.accum_steps
                rt.backward(loss)
            loss_sum += loss.detach()
            window_loss += loss.detach()
            window_images += len(images)
            if not last_micro:
                continue
            rt.step(self.optimizer)
            step += 1
            window_steps += 1
            decay = self.ema.update(unwrap(self.model), step)
            if step % self.log_every == 0:  # the only per-step synchronisation point
                elapsed = time.time() - window_start
                mean_loss = window_loss.item() / window_steps
                self.logger.scalar("train/loss", mean_loss, step)
                self.logger.scalar("train/lr", lr, step)
                self.logger.scalar("train/ema_decay", decay, step)
                self.logger.scalar("train/images_per_sec", window_images * self.di.world_size / elapsed, step)
                _log(self.di, f"{self.key} epoch {epoch + 1} step {step} loss {mean_loss:.4f} lr {lr:.2e} "
                              f"{window_images * self.di.world_size / elapsed:.1f} img/s")
                window_loss.zero_()
                window_start, window_images, window_steps = time.time(), 0, 0
        mean_loss = loss_sum.item() / (micro_steps // st.accum_steps)
        if not math.isfinite(mean_loss):
            raise StageError(f"{self.key}: training diverged (mean loss {mean_loss}) in epoch {epoch + 1}; "
                             f"lower {self.key}.lr (now {st.lr:g}) or raise {self.key}.batch_size")
        return {"step": step, "train/loss": mean_loss, "train/lr": lr, "train/ema_decay": decay,
                "train/strong_augment": float(epoch >= st.light_epochs)}


def validate(model: nn.Module, ema_model: nn.Module, samples: Sequence[Sample], image_size: int,
             runtime: Runtime, cfg: Config, di: DistInfo) -> dict[str, float]:
    """AUC and accuracy at 0.5 of the raw and the EMA weights on the validation samples."""
    labels = np.array([s.label for s in samples])
    out = {}
    for name, suffix, net in (("raw", "", model), ("ema", "_ema", ema_model)):
        scores = predict_scores(net, samples, image_size, runtime, cfg, di)
        if not np.isfinite(scores).all():
            raise StageError(f"the {name} model gives non-finite validation scores: its weights or BatchNorm "
                             f"statistics have blown up; lower the learning rate or train more steps per epoch")
        m = binary_metrics(labels, scores, 0.5)
        out[f"val/auc{suffix}"] = roc_auc(labels, scores)
        out[f"val/accuracy{suffix}"] = m["accuracy"]
    return out


@torch.no_grad()
def predict_scores(model: nn.Module, samples: Sequence[Sample], image_size: int, runtime: Runtime,
                   cfg: Config, di: DistInfo | None = None) -> np.ndarray:
    """P(fake) for every sample, in order. Ranks share the work and gather the scores."""
    di = di or DistInfo()
    mine = list(range(di.rank, len(samples), di.world_size))
    scores = np.empty(0, dtype=np.float64)
    if mine:
        ds = ImageDataset([samples[i] for i in mine], eval_transform(image_size), _decode(cfg, image_size))
        loader = DataLoader(ds, batch_size=cfg.eval.batch_size, num_workers=cfg.data.loader_workers,
                            pin_memory=runtime.device.type == "cuda")
        scores = _score_loader(model, loader, runtime, cfg.eval.hflip_tta)
    if di.world_size == 1:
        return scores
    gathered: list = [None] * di.world_size
    dist.all_gather_object(gathered, (mine, scores))
    full = np.empty(len(samples), dtype=np.float64)
    for idx, sc in gathered:
        full[idx] = sc
    return full


def _score_loader(model: nn.Module, loader: DataLoader, runtime: Runtime, hflip: bool) -> np.ndarray:
    was_training = model.training
    model.eval()
    chunks = []
    for images, _, _ in loader:
        chunks.append(score_batch(model, images, runtime, hflip))
    model.train(was_training)
    return torch.cat(chunks).double().numpy() if chunks else np.empty(0)


@torch.no_grad()
def score_batch(model: nn.Module, images: torch.Tensor, runtime: Runtime, hflip: bool) -> torch.Tensor:
    """P(fake) of a batch (on the CPU), optionally averaged with the mirrored images: the same
    test-time augmentation for validation, test and prediction (the original's differed)."""
    images = images.to(runtime.device, non_blocking=True, memory_format=torch.channels_last)
    with runtime.autocast():
        probs = fake_probability(model(images))
        if hflip:
            probs = (probs + fake_probability(model(torch.flip(images, dims=[3])))) / 2
    return probs.cpu()


def _train_loader(ds, sampler, micro: int, cfg: Config, runtime: Runtime, epoch: int, rank: int) -> DataLoader:
    # A fresh loader per epoch: its workers fork with the dataset's current transform (the
    # light -> strong switch) and a generator seeded by (seed, rank, epoch) for their RNGs.
    gen = torch.Generator().manual_seed(_mix_seed(cfg.seed, rank, epoch, 11))
    return DataLoader(ds, batch_size=micro, sampler=sampler, num_workers=cfg.data.loader_workers,
                      drop_last=True, pin_memory=runtime.device.type == "cuda", generator=gen,
                      persistent_workers=False)


def _decode(cfg: Config, image_size: int) -> int | None:
    return image_size if cfg.data.decode_draft else None


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed every RNG the main process uses from (seed, rank, epoch): resumed epochs replay exactly."""
    s = _mix_seed(seed, rank, epoch)
    torch.manual_seed(s)
    random.seed(s)


def _save(files, improved, di, cfg, stage, model, ema, optimizer, runtime, progress) -> Path | None:
    """Rank 0 writes last.pt (and best.pt when improved); every rank waits for it."""
    path = None
    if di.rank == 0:
        state = {
            "format_version": 1, "stage": stage, "config": to_dict(cfg),
            "model": unwrap(model).state_dict(), "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": runtime.scaler.state_dict() if runtime.scaler else {},
            "step": progress.step, "epoch": progress.epoch, "best_auc_ema": progress.best_auc,
            "best_epoch": progress.best_epoch, "bad_epochs": progress.bad_epochs, "history": progress.history,
        }
        # best.pt first: a resume from last.pt never comes back to this epoch, so a worker killed
        # between the two writes would otherwise leave a run whose best epoch has no best.pt.
        if improved:  # best.pt starts Stage II and is evaluated; only last.pt resumes training
            save_checkpoint(files["best"], {k: v for k, v in state.items() if k not in ("optimizer", "scaler")})
        save_checkpoint(files["last"], state)
        path = files["last"]
    if di.world_size > 1:
        dist.barrier()
    return path


def _restore(path: Path, stage: int, model, ema, optimizer, runtime) -> _Progress:
    state = load_checkpoint(path)
    if state["stage"] != stage:
        raise CheckpointError(f"{path} is a Stage {state['stage']} checkpoint, cannot resume Stage {stage} from it")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    if runtime.scaler and state.get("scaler"):
        runtime.scaler.load_state_dict(state["scaler"])
    return _Progress(state["step"], state["epoch"], state["best_auc_ema"], state["best_epoch"],
                     state["bad_epochs"], list(state["history"]))


def _log(di: DistInfo, message: str) -> None:
    if di.rank == 0:
        print(message, flush=True)
