"""Ray Tune glue: Optuna proposes, ASHA stops, and each trial runs its stages on Ray Train.

A trial is a Tune function trainable that ``fit()``s one ``TorchTrainer`` per stage it trains,
with ``TuneReportCallback`` forwarding each epoch's metrics (the Ray Train V2 pattern; a trainer
passed straight to ``Tuner`` fails under V2). A trial's folder is a TrueFace run folder: its
``config.yaml``, ``stageN/{best,last}.pt``, ``stageN/stage.json`` and ``tensorboard/``.

What ASHA and Optuna compare (``trial_result``): ``objective``, the FINAL stage's
``best/select_auc_ema`` (best EMA validation AUC by ``eval.select_on`` so far, on that stage's
validation set), by ``objective_epoch``, that stage's epoch. Earlier stages of a ``--stage both``
trial report ``objective`` NaN and ``objective_epoch`` 0: Tune's strict metric check needs the
key in every result, ASHA records nothing below its first rung (epoch >= 1), and Optuna's value
is the trial's last result, always a final-stage one. So Stage I runs to its budget unjudged and
no Stage I number ever meets a Stage II one. A trial ASHA stopped reaches Optuna as pruned
(FinalStageOptunaSearch): its epoch's score never meets whole trials' final ones as their equal.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trueface.atomic import atomic_write_text
from trueface.config import Config, ScalingConfig, from_dict, to_yaml
from trueface.config.search_space import FirstEffect, SearchSpace, SearchSpaceError, parse_search_space
from trueface.checkpoint import StageResult, finished_stage
from trueface.run import RunPaths
from trueface.storage import Mirror, join
from trueface.tensorboard import write_hparams

SPEC_FILE = "trueface-tune.json"  # how the search was started: what --resume and jobs.aggregate read
SPEC_VERSION = 2  # 2: objective = the final stage's best/select_auc_ema (1 compared best/auc_ema of any stage)
SCORE = "best/select_auc_ema"  # the engine's best selection AUC (EMA) so far in the stage: never falls
OBJECTIVE = "objective"  # what Optuna and ASHA compare: SCORE of the trial's final stage, NaN before it
OBJECTIVE_EPOCH = "objective_epoch"  # ASHA's clock: the final stage's epoch, 0 before it
TRIAL_EPOCH = "trial_epoch"  # epochs trained by the trial over all its stages (for the record)
TRIAL_DRIVER_CPUS = 0.1  # the trial function only waits on its trainer; the workers hold the CPUs
HPARAM_METRICS = ("best/select_auc_ema", "val/select_auc_ema", "val/auc_ema", "val/auc")


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


def trial_result(metrics: dict, epoch_offset: int = 0, final_stage: bool | None = None) -> dict:
    """An epoch's report as Tune gets it: ``metrics`` (the engine's) plus ``trial_epoch``
    (``epoch_offset``, the epochs of the trial's earlier stages, + this stage's epoch) and, in a
    search (``final_stage`` not None), ``objective`` and ``objective_epoch``: this stage's score
    and epoch in the final stage, NaN and 0 before it (see the module docstring for why both keys
    are always there). Ray Train's workers and a resumed trial both report through here."""
    out = {**metrics, TRIAL_EPOCH: epoch_offset + int(metrics["epoch"])}
    if final_stage is None:
        return out
    if final_stage:
        return {**out, OBJECTIVE: float(metrics[SCORE]), OBJECTIVE_EPOCH: int(metrics["epoch"])}
    return {**out, OBJECTIVE: math.nan, OBJECTIVE_EPOCH: 0}


def finished_trial_result(done: StageResult, epoch_offset: int) -> dict:
    """The one report of a resumed trial whose stages had all finished (``done``: the final
    stage's result; ``epoch_offset``: its earlier stages' epochs): Optuna still needs its score."""
    last = {**(done.history[-1] if done.history else {}), "stage": done.stage, "epoch": done.epochs_run,
            SCORE: done.best_select_auc_ema, "best/epoch": done.best_epoch, "stage_done": 1.0}
    return trial_result(last, epoch_offset, final_stage=True)


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
                          {"stage": stage, "init_from": init_from, "epoch_offset": offset, "attach_checkpoint": False,
                           "final_stage": stage == stages[-1]},
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
        tune.report(finished_trial_result(done, offset - done.epochs_run))


def final_stage_epochs(space: SearchSpace, cfg: Config, stages: list[int]) -> int:
    """ASHA's max_t: the final stage's epochs (the top of its range where the space searches them)."""
    key = f"stage{stages[-1]}.epochs"
    return int(max([cfg.stage(stages[-1]).epochs] + [max(p.extremes()) for p in space.params if p.key == key]))


def asha_rungs(grace_period: int, max_t: int, reduction_factor: int) -> list[int]:
    """The epochs (of the final stage) at which ASHA compares a trial with the others and may stop
    it: Ray's single-bracket milestones grace * rf**k (ray.tune.schedulers.async_hyperband._Bracket,
    same arithmetic), below max_t, where a trial ends anyway."""
    grace = min(grace_period, max_t)
    count = int(np.log(max_t / grace) / np.log(reduction_factor) + 1)
    return sorted(m for m in (grace * reduction_factor ** k for k in range(count)) if m < max_t)


@dataclass(frozen=True)
class Schedule:
    """When ASHA judges a search's trials and when each searched key first acts, in one clock:
    the final stage's epochs."""

    source: str
    stages: tuple[int, ...]
    select_on: str  # eval.select_on: which validation AUC the objective is
    max_t: int
    grace_period: int
    reduction_factor: int
    effects: tuple[FirstEffect, ...]

    @property
    def final(self) -> int:
        return self.stages[-1]

    @property
    def rungs(self) -> list[int]:
        return asha_rungs(self.grace_period, self.max_t, self.reduction_factor)

    def check(self) -> None:
        """Raise SearchSpaceError for a key that never acts, or that acts after ASHA's first rung
        (ASHA would stop trials on epochs where their values of it had made no difference)."""
        for e in self.effects:
            if e.epoch is None:
                raise SearchSpaceError(f"{self.source}: {e.key} never changes training: {e.why}")
        rungs = self.rungs
        late = [e for e in self.effects if e.stage == self.final and rungs and e.epoch > rungs[0]]
        if late:
            raise SearchSpaceError(self._late_key_message(max(late, key=lambda x: x.epoch)))

    def _late_key_message(self, e: FirstEffect) -> str:
        final = _stage(self.final)
        fit = max(x.epoch for x in self.effects if x.stage == self.final)  # the grace every key fits
        then = asha_rungs(fit, self.max_t, self.reduction_factor)
        after = f"ASHA would then stop trials at {final} epochs {_epochs(then)}" if then else \
            "no trial is then stopped before its last epoch"
        return (f"{self.source}: {e.key} first acts at {final} epoch {e.epoch} ({e.why}), but ASHA compares trials "
                f"from {final} epoch {self.rungs[0]} on ({self.describe_rungs()}): it would stop trials on epochs "
                f"where their values of {e.key} made no difference. Use --grace-period {fit} (or grace_period: {fit} "
                f"in the space file; {after}), or drop or narrow {e.key}")

    def describe_rungs(self) -> str:
        where = (f"rungs at {_stage(self.final)} epochs {_epochs(self.rungs)} of {self.max_t}" if self.rungs
                 else f"no rungs before {_stage(self.final)}'s last epoch, {self.max_t}: no trial is stopped early")
        return f"{where}; --grace-period {self.grace_period}, --reduction-factor {self.reduction_factor}"

    def describe(self) -> str:
        final = _stage(self.final)
        lines = [
            f"objective: {final}'s {SCORE} (best EMA validation AUC so far, {self.select_on}), reported as "
            f"{OBJECTIVE!r}; Optuna gets each trial's last (one ASHA stops: pruned, below finished ones)",
            f"ASHA: clock {OBJECTIVE_EPOCH!r} = {final}'s epoch; {self.describe_rungs()}; keeps 1/{self.reduction_factor} per rung",
        ]
        if len(self.stages) > 1:
            earlier = " and ".join(_stage(s) for s in self.stages[:-1])
            lines.append(f"  {earlier} runs to its own end unjudged (its reports: {OBJECTIVE} NaN, {OBJECTIVE_EPOCH} 0)")
        lines.append(f"first epoch each searched key acts in (no rung may come before it), {final} epochs:")
        width = max(len(e.key) for e in self.effects)
        for e in self.effects:
            if e.epoch is None:
                when = f"never in {_stage(e.stage)}"
            elif e.stage != self.final:
                when = f"{_stage(e.stage)} epoch {e.epoch}: before {final}"
            else:
                when = f"epoch {e.epoch}"
            lines.append(f"  {e.key:<{width}}  {when}" + (f" ({e.why})" if e.why else ""))
        return "\n".join(lines)


def schedule(spec: dict) -> Schedule:
    """The search's Schedule from its spec (``steps_per_epoch``: the plan's optimizer steps per
    epoch of each stage, which places an EMA decay's first effect)."""
    space, cfg, stages = search_space(spec), from_dict(spec["config"]), list(spec["stages"])
    steps = {int(k): int(v) for k, v in spec["steps_per_epoch"].items()}
    return Schedule(spec["space_source"], tuple(stages), cfg.eval.select_on, final_stage_epochs(space, cfg, stages),
                    spec["grace_period"], spec["reduction_factor"], tuple(space.first_effects(cfg, stages, steps)))


def _stage(stage: int) -> str:
    return f"Stage {'I' * stage}"


def _epochs(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs))


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
    """Trial folders (and so TensorBoard runs) named by the trial's values: ``00003_s1.lr=0.0012,...``.
    The name is a trial's run_name too, so it keeps to a run name's characters (is_run_name): a
    weights file is named by its file name (Ray refuses a '/' in a trial's folder name), and any
    other character becomes '_'."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial) -> str:
        values = self.space.values(trial.config)
        parts = [f"{_short_key(k)}={_short_value(v)}" for k, v in values.items()]
        return f"{trial.trial_id.rsplit('_', 1)[-1]}_" + ",".join(parts)[:200]


def _short_key(key: str) -> str:
    return key.replace("stage1.", "s1.").replace("stage2.", "s2.").replace("augment.", "")


def _short_value(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    text = text.rstrip("/").rsplit("/", 1)[-1] or text  # a path: its file name
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in text)


# what a trial's workers hold: a search over them sizes trials by the largest value each can take
SCALING_KEYS = ("scaling.num_workers", "scaling.cpus_per_worker", "scaling.gpus_per_worker")


def largest_scaling(cfg: Config, space: SearchSpace | None = None) -> ScalingConfig:
    """``cfg.scaling`` with each SCALING_KEYS key ``space`` searches at the largest value a trial
    can draw (its range's top, its largest choice): the keys are drawn independently, so one trial
    may draw all the tops, and trials at once are counted for that trial, never for fewer workers."""
    tops = {p.key.split(".", 1)[1]: max(p.extremes()) for p in (space.params if space else ()) if p.key in SCALING_KEYS}
    return replace(cfg.scaling, **tops)


def per_trial_resources(cfg: Config, use_gpu: bool, space: SearchSpace | None = None) -> dict[str, float]:
    """What one trial holds at most (``space``: the search's, where it searches SCALING_KEYS)."""
    sc = largest_scaling(cfg, space)
    res = {"CPU": sc.num_workers * sc.cpus_per_worker + TRIAL_DRIVER_CPUS}
    if use_gpu:
        res["GPU"] = sc.num_workers * sc.gpus_per_worker
    return res


def derive_max_concurrent(cluster: dict[str, float], per_trial: dict[str, float], num_samples: int) -> int:
    """How many trials the cluster's resources hold at once (at least 1, at most num_samples)."""
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in per_trial.items() if v > 0)
    return max(1, min(fits, num_samples))


def local_cpus(cfg: Config, max_concurrent: int | None, num_samples: int, space: SearchSpace | None = None) -> int:
    """Logical CPUs for a local Ray: the machine's cores (or what ``max_concurrent`` trials'
    workers ask for, at the largest scaling ``space`` searches), plus one for the trial functions'
    small shares."""
    sc = largest_scaling(cfg, space)
    workers_cpus = sc.num_workers * sc.cpus_per_worker
    cores = os.cpu_count() or 1
    concurrent = max_concurrent or derive_max_concurrent({"CPU": cores}, {"CPU": workers_cpus}, num_samples)
    return max(cores, concurrent * workers_cpus) + 1


def make_trainable(spec: dict):
    from ray import tune

    # The trial function reserves only its share; its workers' resources are its trainer's business.
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"CPU": TRIAL_DRIVER_CPUS})


def make_search(spec: dict):
    """Optuna's TPE (the searcher) and ASHA (the scheduler), both on OBJECTIVE (see trial_result)."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    from jobs.tune_algorithms import FinalStageOptunaSearch

    sched = schedule(spec)
    sampler = optuna.samplers.TPESampler(
        seed=spec["seed"], n_startup_trials=spec["startup_trials"],
        constant_liar=True,  # trials still running count as pending, so parallel trials differ
    )
    searcher = FinalStageOptunaSearch(sched.final, space=search_space(spec).suggest, metric=OBJECTIVE, mode="max",
                                      sampler=sampler)
    scheduler = ASHAScheduler(time_attr=OBJECTIVE_EPOCH, metric=OBJECTIVE, mode="max", max_t=sched.max_t,
                              grace_period=min(sched.grace_period, sched.max_t), reduction_factor=sched.reduction_factor)
    return searcher, scheduler


def trial_finished(result: dict | None, final_stage: int) -> bool:
    """Whether ``result``, a trial's last report, ends its final stage: its last epoch, or an early
    stop by patience (the engine's ``stage_done`` says both). Not so where ASHA stopped the trial."""
    return bool(result) and result.get("stage") == final_stage and bool(result.get("stage_done"))


def make_tuner(spec: dict, trainable, max_concurrent: int, search: tuple | None = None):
    """The search's Tuner; ``search``: the ``make_search(spec)`` pair to use (default: new ones)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from jobs.tune_algorithms import RungKeeper

    space = search_space(spec)
    searcher, scheduler = search or make_search(spec)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec["num_samples"],
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=TrialNamer(space)),
        run_config=tune.RunConfig(
            name=spec["name"], storage_path=spec["storage"],
            # JSON and CSV only: the engine logs TensorBoard curves and HParams itself (Tune's
            # TensorBoard logger would add a second, raw-named HParams session per trial).
            # RungKeeper: ASHA's rungs in the experiment checkpoints, for --resume.
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), RungKeeper(scheduler)],
            failure_config=tune.FailureConfig(max_failures=0),  # retries happen inside Ray Train
            verbose=1,
        ),
    )


def disable_default_loggers() -> None:
    """Must run before a Tuner is built (see make_tuner's callbacks)."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
