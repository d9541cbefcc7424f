"""Ray Tune glue: Optuna proposes, ASHA stops, and each trial runs its stages on Ray Train.

A trial is a Tune function trainable that ``fit()``s one ``TorchTrainer`` per stage it trains,
with ``TuneReportCallback`` forwarding each epoch's metrics (the Ray Train V2 pattern; a trainer
passed straight to ``Tuner`` fails under V2). A trial's folder is a TrueFace run folder: its
``config.yaml``, ``stageN/{best,last}.pt``, ``stageN/stage.json`` and ``tensorboard/``.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from trueface.atomic import atomic_write_text
from trueface.config import Config, from_dict, to_yaml
from trueface.config.search_space import SearchSpace, parse_search_space
from trueface.checkpoint import finished_stage
from trueface.run import RunPaths
from trueface.storage import Mirror, join
from trueface.tensorboard import write_hparams

SPEC_FILE = "trueface-tune.json"  # how the search was started: what --resume and jobs.aggregate read
METRIC = "best/auc_ema"  # per stage: the best EMA validation AUC so far (never falls, unlike val/auc_ema)
TIME_ATTR = "trial_epoch"  # epochs trained by the trial, over its stages: ASHA's clock
TRIAL_DRIVER_CPUS = 0.1  # the trial function only waits on its trainer; the workers hold the CPUs
HPARAM_METRICS = ("best/auc_ema", "val/auc_ema", "val/auc")


def trial_config(spec: dict, params: dict, trial_name: str) -> Config:
    """The trial's config: the search's base config, the sampled values, the trial's folder
    ``<storage>/<name>/<trial_name>`` as its run folder."""
    cfg = search_space(spec).apply(from_dict(spec["config"]), params)
    return replace(cfg, run_name=trial_name, output=replace(cfg.output, runs_dir=experiment_location(spec)))


def experiment_location(spec: dict) -> str:
    """``<storage>/<name>``: a path, or a URI (then trials work in staging copies; see trueface.storage)."""
    return join(spec["storage"], spec["name"])


def experiment_mirror(spec_or_location: dict | str, cache_dir: str | None = None) -> Mirror:
    location = experiment_location(spec_or_location) if isinstance(spec_or_location, dict) else spec_or_location
    if cache_dir is None:
        cache_dir = from_dict(spec_or_location["config"]).data.cache_dir if isinstance(spec_or_location, dict) \
            else Config().data.cache_dir
    return Mirror.of(location, cache_dir)


def search_space(spec: dict) -> SearchSpace:
    return parse_search_space(spec["space"], spec["space_source"])


def run_trial(params: dict, spec: dict) -> None:
    """Tune function trainable: train the trial's stages, resuming whatever a previous attempt left."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs import ray_train

    ctx = tune.get_context()
    # Not get_trial_dir(): that is a local staging copy which Tune syncs to the storage, and
    # syncing gigabytes of checkpoints every few seconds would cost more than the training.
    trial_name = Path(ctx.get_trial_dir()).name
    cfg = trial_config(spec, params, trial_name)
    paths = RunPaths.of(cfg)
    run = paths.run_mirror()
    stages = list(spec["stages"])
    run.pull(*(f"stage{s}/stage.json" for s in stages))  # what an earlier attempt (on any node) finished
    atomic_write_text(paths.run_dir / "config.yaml", to_yaml(cfg))
    space = search_space(spec)
    write_hparams(paths.tensorboard_dir, space.values(params),
                  [(f"stage{s}", tag) for s in stages for tag in HPARAM_METRICS], trial_name,
                  {p.key: list(p.values) if p.form == "choice" else (p.low, p.high) for p in space.params})
    run.push("config.yaml", "tensorboard")

    init_from, offset, reported, done = spec.get("init"), 0, False, None
    for stage in stages:
        stage_dir = paths.stage_dir(stage)
        done = finished_stage(stage_dir)
        if done is None:
            ray_train.fit(ray_train.stage_worker, cfg, f"{ctx.get_trial_id()}-stage{stage}",
                          {"stage": stage, "init_from": init_from, "epoch_offset": offset, "attach_checkpoint": False},
                          fresh=not run.exists(f"stage{stage}/last.pt"), callbacks=[TuneReportCallback()])
            reported = True
            run.pull(f"stage{stage}/stage.json")
            done = finished_stage(stage_dir)
            if done is None:
                raise RuntimeError(f"stage {stage} of trial {trial_name} ended without writing "
                                   f"{paths.location(f'stage{stage}/stage.json')}")
        # Training of this stage is over: last.pt (twice best.pt's size) only ever resumed it.
        run.delete(f"stage{stage}/last.pt")
        offset += done.epochs_run
        init_from = paths.location(f"stage{stage}/best.pt")
    if not reported and done is not None:
        # A resumed trial whose stages had all finished: Tune and Optuna still need its score.
        tune.report({**done.history[-1], METRIC: done.best_auc_ema, TIME_ATTR: offset, "stage_done": 1.0})


def prune_last_checkpoints(experiment: Mirror, trial_names: list[str]) -> int:
    """Delete ``stage*/last.pt`` of trials that Tune will never resume (finished or stopped by
    ASHA, which kills a trial before it can tidy up); returns the bytes freed. Their ``best.pt``
    stays: the report points at it and Stage II or the pipeline can start from it."""
    freed = 0
    for name in trial_names:
        for rel, stat in experiment.files(name).items():
            if rel.endswith("/last.pt") and rel.split("/")[-2].startswith("stage"):
                experiment.delete(rel)
                freed += stat.size
    return freed


class TrialNamer:
    """Trial folders (and so TensorBoard runs) named by the trial's values: ``00003_s1.lr=0.0012,...``."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> str:
        values = self.space.values(trial.config)
        parts = [f"{_short_key(k)}={_short_value(v)}" for k, v in values.items()]
        return f"{trial.trial_id.rsplit('_', 1)[-1]}_" + ",".join(parts)[:200]


def _short_key(key: str) -> str:
    return key.replace("stage1.", "s1.").replace("stage2.", "s2.").replace("augment.", "")


def _short_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def per_trial_resources(cfg: Config, use_gpu: bool) -> dict[str, float]:
    sc = cfg.scaling
    res = {"CPU": sc.num_workers * sc.cpus_per_worker + TRIAL_DRIVER_CPUS}
    if use_gpu:
        res["GPU"] = sc.num_workers * sc.gpus_per_worker
    return res


def derive_max_concurrent(cluster: dict[str, float], per_trial: dict[str, float], num_samples: int) -> int:
    """How many trials the cluster's resources hold at once (at least 1, at most num_samples)."""
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0)
    return max(1, min(fits, num_samples))


def local_cpus(cfg: Config, max_concurrent: int | None, num_samples: int) -> int:
    """Logical CPUs for a local Ray: the machine's cores (or what ``max_concurrent`` trials'
    workers ask for), plus one for the trial functions' small shares."""
    workers_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    cores = os.cpu_count() or 1
    concurrent = max_concurrent or derive_max_concurrent({"CPU": cores}, {"CPU": workers_cpus}, num_samples)
    return max(cores, concurrent * workers_cpus) + 1


def make_trainable(spec: dict):
    from ray import tune

    # The trial function reserves only its share; its workers' resources are its trainer's business.
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"CPU": TRIAL_DRIVER_CPUS})


def make_tuner(spec: dict, trainable, max_concurrent: int):
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    space = search_space(spec)
    cfg = from_dict(spec["config"])
    max_t = sum(cfg.stage(s).epochs for s in spec["stages"])
    sampler = optuna.samplers.TPESampler(
        seed=spec["seed"], n_startup_trials=spec["startup_trials"],
        constant_liar=True,  # trials still running count as pending, so parallel trials differ
    )
    searcher = OptunaSearch(space=space.suggest, metric=METRIC, mode="max", sampler=sampler)
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=max_t,
                              grace_period=min(spec["grace_period"], max_t), reduction_factor=spec["reduction_factor"])
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec["num_samples"],
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=TrialNamer(space)),
        run_config=tune.RunConfig(
            name=spec["name"], storage_path=spec["storage"],
            # JSON and CSV only: the engine logs TensorBoard curves and HParams itself (Tune's
            # TensorBoard logger would add a second, raw-named HParams session per trial).
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside Ray Train
            verbose=1,
        ),
    )


def disable_default_loggers() -> None:
    """Must run before a Tuner is built (see make_tuner's callbacks)."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
