"""Ray Train glue: one TorchTrainer per stage (and one for evaluation) around ``trueface.train`` and ``trueface.evaluation``.

The worker functions are module-level so Ray can import them on every worker (the project is
installed, or shipped with ``ray job submit --working-dir .``). Every worker calls
``ray.train.report`` once per epoch; rank 0 attaches the checkpoint it has just written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict, replace
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.ray_tune import trial_result  # the search owns its report keys (objective, ASHA clock)
from trueface.config import Config, from_dict, to_dict
from trueface.data.layout import discover_layout
from trueface.distributed import DistInfo, barrier
from trueface.evaluation import ThresholdRequest, evaluate_checkpoint
from trueface.robustness_report import FOLDER as ROBUSTNESS_FOLDER
from trueface.robustness_report import run_sweep
from trueface.run import RunPaths
from trueface.storage import Mirror, absolute, fetch, join
from trueface.thresholds import fetch_checkpoint, push_beside
from trueface.train import run_stage

CHECKPOINT_FILE = "checkpoint.pt"


def scaling_config(cfg: Config, num_workers: int | None = None) -> ScalingConfig:
    sc = cfg.scaling
    use_gpu = sc.use_gpu == "true" or (sc.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    resources = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if use_gpu else {})}
    return ScalingConfig(num_workers=num_workers or sc.num_workers, use_gpu=use_gpu,
                         resources_per_worker=resources, placement_strategy=sc.placement_strategy)


def fit(train_fn, cfg: Config, name: str, loop_config: dict, num_workers: int | None = None,
        fresh: bool = False, callbacks: list | None = None):
    """Run ``train_fn`` on a worker group; raises when the run fails after its retries.

    Ray Train restores a run of the same name from its storage. ``fresh`` first removes that
    state: the stage folder, not Ray's copy, says whether there is anything to resume.
    ``callbacks`` are Ray Train callbacks (Tune passes its ``TuneReportCallback``).
    """
    paths = RunPaths.of(cfg)
    if fresh:
        paths.run_mirror().delete(f"ray/{name}")
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"cfg": to_dict(cfg), **loop_config},
        scaling_config=scaling_config(cfg, num_workers),
        run_config=RunConfig(
            name=name,
            storage_path=paths.ray_storage,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),  # best.pt/last.pt live in the stage folder
            callbacks=callbacks or None,
        ),
    )
    with _driver_sigint_handler_kept():
        return trainer.fit()


@contextlib.contextmanager
def _driver_sigint_handler_kept():
    """Puts the driver's SIGINT handler back after ``fit``. Ray Train (2.60) installs one that
    aborts its run and leaves it installed: after the run a Ctrl-C would "abort" a finished run,
    swallowing the first two presses, and the handler's reference to the run's controller keeps
    that controller and its Ray Data DatasetManager alive (two processes waking about 100 times a
    second each) until the next ``fit`` replaces it. Off the main thread (Tune's trials) Ray
    installs none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker_setup(cfg: Config) -> tuple[Config, DistInfo]:
    """The config this Ray Train worker runs with, and its rank. A worker Ray gave a GPU trains on
    that one (``get_device``); a worker given none trains on the CPU with
    ``scaling.cpus_per_worker`` threads, ``runtime.device: auto`` made ``cpu``: Ray 2.60 leaves
    ``CUDA_VISIBLE_DEVICES`` as it is for a worker without GPUs (``scaling.use_gpu: false`` on a
    GPU node), so torch there still sees the node's GPUs, and auto would train on one Ray gave
    to another worker."""
    # Train V2 logs every report's full metrics dict at INFO; the engine prints its own epoch line.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        if cfg.runtime.device == "cuda":
            raise ValueError("runtime.device=cuda, but Ray gave this worker no GPU: set scaling.use_gpu=true "
                             "(or auto, on a cluster with GPUs), or runtime.device=auto")
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
        cfg = replace(cfg, runtime=replace(cfg.runtime, device="cpu"))
    ctx = ray.train.get_context()
    return cfg, DistInfo(ctx.get_world_rank(), ctx.get_world_size())


def stage_worker(config: dict) -> None:
    """Train one stage on this worker; resumes from Ray's checkpoint after a worker failure, or from
    the stage's ``last.pt``. With a URI storage, rank 0 uploads each epoch's files before reporting
    (a scheduler may stop the trial right after a report) and the stage summary at the end."""
    cfg, di = _worker_setup(from_dict(config["cfg"]))
    stage = int(config["stage"])
    paths = RunPaths.of(cfg)
    run = paths.run_mirror()
    layout = discover_layout(cfg.data.root, cfg.data.exclude)
    st = cfg.stage(stage)
    train, val = layout.gather(st.domains, "train"), layout.gather(st.domains, "valid")
    init_from = fetch(config["init_from"], cfg.data.cache_dir) if config.get("init_from") else None
    uploads = (f"stage{stage}", f"tensorboard/stage{stage}")

    def report(metrics: dict, checkpoint_path: Path | None) -> None:
        if di.rank == 0:
            run.push(*uploads)
        _report(metrics, checkpoint_path, epoch_offset=int(config.get("epoch_offset", 0)),
                attach_checkpoint=bool(config.get("attach_checkpoint", True)), final_stage=config.get("final_stage"))

    if di.rank == 0:  # the only uploader, and none of its uploads is in flight yet
        for partial in run.remove_partial_uploads(*uploads):
            print(f"stage{stage}: removed {join(run.location, partial)}, an upload cut off by a killed worker", flush=True)
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is None:
        run.pull(f"stage{stage}/last.pt")  # another node (or a lost one) may have written it
        # ranks on one node share its staging folder: rank 0 removes the partial files of killed
        # writers there (run_stage), which must not catch another rank's download in flight
        barrier(di)
    with (ray_ckpt.as_directory() if ray_ckpt else contextlib.nullcontext(None)) as ckpt_dir:
        resume = Path(ckpt_dir) / CHECKPOINT_FILE if ckpt_dir else None
        run_stage(cfg, stage, train, val, paths.stage_dir(stage), dist_info=di, report=report,
                  log_dir=paths.stage_tensorboard_dir(stage), init_from=init_from, resume_from=resume)
    if di.rank == 0:
        run.push(*uploads)


def evaluate(cfg: Config, name: str, checkpoint: str | Path, data_root: str | Path, out: str | Path, *,
             test_domains: tuple[str, ...] | list[str] = (), thresholds: ThresholdRequest = ThresholdRequest(),
             exclude: tuple[str, ...] = (), train_overlap: dict[str, int] | None = None,
             robustness: list[tuple[str, float, str]] | None = None):
    """Score ``checkpoint`` (a path or URI) on ``data_root``'s test splits on one Ray Train worker
    (a GPU one where the cluster has GPUs); the tables go to ``out`` (a path or URI; see
    trueface.evaluation). ``thresholds`` (trueface.evaluation.ThresholdRequest) says where the
    thresholds come from, by ``cfg.eval``'s policy and scope unless it names others, and whether
    they are saved beside the checkpoint (``thresholds.json``; the checkpoint is never rewritten).
    ``exclude``: files of ``data_root`` the data check left out; ``train_overlap``: see
    trueface.evaluation.evaluate_checkpoint. ``robustness``: (kind, value, data root) of perturbed copies of
    the test splits (jobs.evaluate --robustness), scored in the same worker run at the clean thresholds
    into ``out``/robustness/ (trueface.robustness_report), so the sweep pays for one worker start."""
    return fit(evaluate_worker, cfg, name, {
        "checkpoint": absolute(checkpoint), "data_root": str(Path(data_root).absolute()),
        "out": absolute(out), "test_domains": list(test_domains), "thresholds": asdict(thresholds),
        "exclude": list(exclude), "train_overlap": train_overlap,
        "robustness": [list(r) for r in robustness or ()],
    }, num_workers=1, fresh=True)


def evaluate_worker(config: dict) -> None:
    """Evaluate a checkpoint on a data root into the results folder (see trueface.evaluation), then
    the robustness sweep's perturbed copies, if any, at the same thresholds."""
    cfg, di = _worker_setup(from_dict(config["cfg"]))
    checkpoint = fetch_checkpoint(config["checkpoint"], cfg.data.cache_dir)  # with a URI's saved thresholds, if any
    out = Mirror.of(config["out"], cfg.data.cache_dir)
    request = ThresholdRequest(**config["thresholds"])
    # The run's config (cfg) decides policy and scope, not the one saved in the checkpoint: a rerun
    # with eval.threshold_scope=per_domain evaluates per domain.
    request = replace(request, policy=request.policy or cfg.eval.threshold_policy,
                      scope=request.scope or cfg.eval.threshold_scope)
    report = evaluate_checkpoint(checkpoint, discover_layout(config["data_root"], config.get("exclude", ())), out.local,
                                 test_domains=tuple(config.get("test_domains", ())), thresholds=request, dist_info=di,
                                 train_overlap=config.get("train_overlap"))
    if config.get("robustness"):
        run_sweep(checkpoint, report, [tuple(r) for r in config["robustness"]], out.local / ROBUSTNESS_FOLDER, di)
    out.push()
    if request.save:
        push_beside(config["checkpoint"], cfg.data.cache_dir)  # written beside fetch()'s staged copy
    ray.train.report({"done": 1})


def _report(metrics: dict, checkpoint_path: Path | None, epoch_offset: int = 0,
            attach_checkpoint: bool = True, final_stage: bool | None = None) -> None:
    """Report an epoch's metrics as jobs.ray_tune.trial_result shapes them: plus ``trial_epoch``
    (epochs trained in earlier stages + this stage's) and, in a Tune trial (``final_stage`` set
    by the loop config), the search's objective and ASHA's clock. ``attach_checkpoint=False``
    leaves Ray's copy out where ``last.pt`` sits on storage every worker reaches (Tune trials)."""
    metrics = trial_result(metrics, epoch_offset, None if final_stage is None else bool(final_stage))
    if checkpoint_path is None or not attach_checkpoint:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="trueface-ckpt-"))
    try:
        try:  # a hard link costs nothing; Ray copies it to its storage during report()
            os.link(checkpoint_path, tmp / CHECKPOINT_FILE)
        except OSError:
            shutil.copy2(checkpoint_path, tmp / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

