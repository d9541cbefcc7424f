"""Ablations on Ray Tune: each recipe component switched off in turn, over seeds, with intervals.

Usage::

    python -m jobs.ablate                                    # demo: Stage I of tune-demo, 2 seeds
    python -m jobs.ablate --config demo --stage both --seeds 3
    python -m jobs.ablate --components ema,strong-augmentation --seeds 2
    python -m jobs.ablate --stage 2 --init runs/demo/stage1/best.pt
    python -m jobs.ablate --leave-one-domain-out --config demo --stage both
    python -m jobs.ablate --resume NAME                      # finish an interrupted ablation
    python -m jobs.ablate --dry-run                          # the plan only

The components and their "off" values come from ``--spec`` (default search_spaces/ablation.yaml;
trueface/ablation.py documents the format). Every (trained config, seed) is one Tune trial of a
grid search, without early stopping: Stage I trials first, then the Stage II trials that start
from them, so configs that differ only in Stage II share one Stage I per seed. Rows that change
only how a checkpoint is scored (EMA off, flip TTA off, Stage II off) are evaluations of the full
recipe's trials. Each trial scores its checkpoint on the test splits (thresholds chosen on the
validation splits) on its own Ray Train workers; ``results/<name>/`` gets the comparison table
(trueface.compare: mean AUC per row and domain with a 95% interval, the difference to the full
recipe with its interval) and its plots.

Layout: ``<storage>/<name>/trials/<config>-seed<k>/`` are run folders (config.yaml, stageN/,
tensorboard/), ``<storage>/<name>/tune-stageN/`` Tune's state, ``results/<name>/evals/<row>/seed<k>/``
the evaluation reports the table is built from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from jobs import ray_tune
from jobs.ablate_report import job_seeds, trained_text, write_ablation_report
from jobs.common import (add_config_arguments, add_ray_arguments, check_model_weights, config_from_args,
                         exit_on_batch_problems, exit_unless_data_here, init_ray, nonempty, warn_if_outputs_vanish)
from jobs.tune import (STAGE_CHOICES, _check_init, _refuse_settings_with_resume, add_trial_arguments, parse_with_storage,
                       trial_resources)
from trueface.ablation import (AblationPlan, AblationSpecError, Evaluation, TrainingGroup, load_ablation_spec,
                               parse_ablation_spec, plan_ablation, plan_leave_one_domain_out, read_ablation_yaml)
from trueface.atomic import atomic_write_text
from trueface.config import Config, ConfigError, apply_values, from_dict, to_dict
from trueface.config.loading import is_run_name
from trueface.data.check import DataCheckError
from trueface.data.layout import DataLayoutError
from trueface.run import RunPaths, epoch_samples, prepare_run
from trueface.storage import Mirror, StorageError, check_writable, join

SPEC_FILE = "trueface-ablate.json"  # how the ablation was started: what --resume reads
SPEC_VERSION = 1
DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "search_spaces" / "ablation.yaml"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, argv, storage = parse_with_storage(parser, argv)
    if args.resume:
        _refuse_settings_with_resume(parser, args)
        job = _load_job(storage, args.resume)
        exit_unless_data_here(from_dict(job["config"]), f"ablation {args.resume}")
        print(f"resuming ablation {args.resume} with the settings it was started with", flush=True)
    else:
        job = _new_job(args, storage, command="python -m jobs.ablate " + shlex.join(argv))
    plan = job_plan(job)
    print(describe(job, plan), flush=True)
    if args.dry_run:
        return 0
    check_model_weights(from_dict(job["config"]))
    check_row_weights(job, plan)
    exp = experiment_mirror(job)
    try:
        check_writable(exp.location, "--storage")
        check_writable(job["results_dir"], "output.results_dir")
    except StorageError as exc:
        sys.exit(f"error: {exc}")
    if not args.resume:
        atomic_write_text(exp.local / SPEC_FILE, json.dumps(job, indent=2))
        exp.push(SPEC_FILE)
    return _run(job, plan, exp, args.address or job.get("address"))


def check_row_weights(job: dict, plan: AblationPlan) -> None:
    """Load each row's own initial weights (a component's ``model.weights``) as check_model_weights
    loads the config's, before Ray starts, the error naming the rows and components that set it: a
    missing or ill-fitting file would otherwise fail those rows' trials in their workers."""
    cfg = from_dict(job["config"])
    components = parse_ablation_spec(job["spec"], job["spec_source"]).components if job["spec"] else ()
    for weights in dict.fromkeys(g.values["model.weights"] for g in plan.groups if "model.weights" in g.values):
        rows = [v.name for v in plan.variants
                if plan.evaluation(v.evaluation)[0].values.get("model.weights") == weights]
        names = [c.name for c in components if c.values.get("model.weights") == weights]
        setters = ", ".join(f"components.{n}.when_off.set" for n in names)
        check_model_weights(apply_values(cfg, {"model.weights": weights}),
                            f"{job['spec_source']}: model.weights {weights!r} of row(s) {', '.join(rows)} ({setters})",
                            f"Fix the value in {job['spec_source']}, or leave {', '.join(names)} out (--components "
                            f"lists the components to run)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.ablate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, default="tune-demo")
    add_ray_arguments(p)
    p.add_argument("--spec", type=nonempty, help="ablation spec YAML (default: search_spaces/ablation.yaml)")
    p.add_argument("--components", type=nonempty,
                   help="comma-separated component names of the spec to ablate (default: all)")
    p.add_argument("--leave-one-domain-out", action="store_true",
                   help="instead of components: fine-tune Stage II without each of its domains and test on it")
    p.add_argument("--stage", choices=list(STAGE_CHOICES), default="1",
                   help="what the recipe trains: 1 (Stage I), 2 (Stage II from --init), both; default: 1")
    p.add_argument("--init", type=nonempty,
                   help="Stage I checkpoint every --stage 2 trial starts from, a path or URI")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (default: 2; 1 gives bootstrap intervals)")
    add_trial_arguments(p)
    p.add_argument("--name", type=nonempty,
                   help="ablation name: <storage>/<name>/ and results/<name>/ (default: abl-<date>-<time>)")
    p.add_argument("--storage", type=nonempty, default="runs/ablate",
                   help="where ablations live: a local path, or on a cluster a filesystem every node mounts or a URI "
                        "(default: runs/ablate)")
    p.add_argument("--resume", type=nonempty, metavar="NAME",
                   help="finish the interrupted ablation NAME (in --storage)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; run nothing")
    return p


# --------------------------------------------------------------------------- the job


def _new_job(args: argparse.Namespace, storage: str, command: str) -> dict:
    """Everything the ablation needs, checked before Ray starts; exits with a message on any error."""
    base = config_from_args(args)
    warn_if_outputs_vanish(base, (("--storage", args.storage),))
    stages = STAGE_CHOICES[args.stage]
    if args.seeds < 1:
        sys.exit(f"error: --seeds must be >= 1, got {args.seeds}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        sys.exit(f"error: --max-concurrent must be >= 1, got {args.max_concurrent}")
    _refuse_components_with_lodo(args)
    spec_source = None if args.leave_one_domain_out else args.spec or str(DEFAULT_SPEC)
    try:
        base = apply_values(base, trial_resources(args))
        prepared = prepare_run(base)
        spec_data = None if args.leave_one_domain_out else _spec_data(spec_source, args.components)
    except (ConfigError, DataLayoutError, StorageError) as exc:
        sys.exit(f"error: {exc}")
    except DataCheckError as exc:
        sys.exit(f"{exc}\nRun python -m jobs.check_data --data-root {base.data.root or '<root>'} for the full report.")
    if prepared.check.findings:
        print(prepared.check.summary(), flush=True)
    cfg = fixed_epoch_sizes(prepared.cfg, prepared.layout, stages)
    name = args.name or f"{'lodo' if args.leave_one_domain_out else 'abl'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_run_name(name):
        sys.exit(f"error: --name {name!r} must be one folder name of letters, digits, '-', '_', '.', '=', ','")
    job = {
        "version": SPEC_VERSION, "name": name, "storage": storage, "command": command.strip(),
        "kind": "leave-one-domain-out" if args.leave_one_domain_out else "ablation",
        "config": to_dict(cfg), "spec": spec_data, "spec_source": spec_source,
        "stages": stages, "init": None, "seeds": args.seeds, "max_concurrent": args.max_concurrent,
        "results_dir": join(cfg.output.results_dir, name), "address": args.address,
    }
    try:
        plan = job_plan(job)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    trials = group_configs(plan, cfg, spec_source)
    # every Stage II trial of a --stage 2 job starts from --init: each row's model.arch must fit it
    job["init"] = _check_init(args, stages, cfg, [t.model.arch for t in trials])
    exit_on_batch_problems(trials, prepared.layout, stages)
    exp = experiment_mirror(job)
    if exp.local.exists() or (exp.remote and exp.exists(SPEC_FILE)):
        sys.exit(f"error: an ablation named {name!r} already exists at {exp.location}.\n"
                 f"  Resume it:       python -m jobs.ablate --resume {name}"
                 + ("" if args.storage == "runs/ablate" else f" --storage {args.storage}")
                 + "\n  or start anew:   add --name <another name>")
    return job


def _refuse_components_with_lodo(args: argparse.Namespace) -> None:
    """--leave-one-domain-out trains its own rows (one per Stage II domain left out), not the spec's
    components. Refused rather than combined: each component off with each domain left out is
    another experiment (a cross table), and a flag that was silently dropped, or a --spec file that
    does not exist, read as if it had been used."""
    given = [flag for flag, value in (("--spec", args.spec), ("--components", args.components)) if value is not None]
    if args.leave_one_domain_out and given:
        sys.exit(f"error: --leave-one-domain-out leaves each Stage II domain out of the full recipe; it switches no "
                 f"components off, so {' and '.join(given)} would be ignored: drop {' and '.join(given)}, or run "
                 f"the ablation of the components without --leave-one-domain-out")


def group_configs(plan: AblationPlan, cfg: Config, source: str | None) -> list[Config]:
    """Each trained group's config (seed 0), the job ending with the group and its values named
    where the config refuses them (plan_ablation has checked each component's and the plain row's
    values; this catches what a group combines beyond those)."""
    trials = []
    for group in plan.groups:
        try:
            trials.append(group.config(cfg, 0))
        except ConfigError as exc:
            values = ", ".join(f"{k}={v}" for k, v in group.values.items())
            sys.exit(f"error: {source or plan.kind}: the trials {group.name!r} ({values}) are refused by the config: "
                     f"{exc}")
    return trials


def fixed_epoch_sizes(cfg: Config, layout, stages) -> Config:
    """``cfg`` with each trained stage's ``samples_per_epoch`` fixed at the reference's epoch where
    it is 0, when the balancing and the domains set the epoch's size: a row that balances otherwise
    (domain-balance) or leaves a domain out then trains as many images an epoch as the reference,
    and the table compares the balancing or the domain, not the amount of training."""
    fixed = {f"stage{s}.samples_per_epoch": epoch_samples(cfg, layout, s) for s in stages
             if cfg.stage(s).samples_per_epoch == 0}
    for key, size in fixed.items():
        print(f"{key} fixed at {size}, the reference's epoch, for every row", flush=True)
    return apply_values(cfg, fixed) if fixed else cfg


def _spec_data(path: str, components: str | None) -> dict:
    """The spec file's content, restricted to ``components`` (checked against the file's names)."""
    spec = load_ablation_spec(path)
    data = read_ablation_yaml(path)
    if components is not None:
        wanted = [c.strip() for c in components.split(",") if c.strip()]
        if not wanted:  # "," would otherwise ablate every component, as if the flag were left out
            raise AblationSpecError(f"--components {components!r} names no component; give names of "
                                    f"{spec.source} ({', '.join(c.name for c in spec.components)})")
        unknown = [c for c in wanted if c not in data["components"]]
        if unknown:
            raise AblationSpecError(f"--components: {', '.join(unknown)} not in {spec.source} "
                                    f"(components: {', '.join(c.name for c in spec.components)})")
        data["components"] = {k: v for k, v in data["components"].items() if k in wanted}
    return data


def job_plan(job: dict) -> AblationPlan:
    cfg, stages = from_dict(job["config"]), tuple(job["stages"])
    if job["kind"] == "leave-one-domain-out":
        return plan_leave_one_domain_out(cfg, stages)
    return plan_ablation(parse_ablation_spec(job["spec"], job["spec_source"]), cfg, stages)


def experiment_location(job: dict) -> str:
    return join(job["storage"], job["name"])


def experiment_mirror(job: dict) -> Mirror:
    return Mirror.of(experiment_location(job), from_dict(job["config"]).data.cache_dir)


def _load_job(storage: str, name: str) -> dict:
    exp = Mirror.of(join(storage, name), Config().data.cache_dir)
    exp.pull(SPEC_FILE)
    path = exp.local / SPEC_FILE
    if not path.is_file():
        sys.exit(f"error: no ablation named {name!r} in {storage} (--storage chooses the folder)")
    job = json.loads(path.read_text())
    if job.get("version") != SPEC_VERSION:
        sys.exit(f"error: ablation {name!r} was started by another TrueFace version ({job.get('version')}); start a new one")
    return job


def describe(job: dict, plan: AblationPlan) -> str:
    cfg = from_dict(job["config"])
    sc = cfg.scaling
    title = "leave-one-domain-out" if job["kind"] == "leave-one-domain-out" else f"ablation of {job['spec_source']}"
    return "\n".join([
        f"{job['name']}: {title}; the recipe trains {trained_text(job)}; {job['seeds']} seed(s) "
        f"({', '.join(map(str, job_seeds(job)))}); grid search, no early stopping",
        plan.describe(job["seeds"]),
        f"per trial: {sc.num_workers} worker(s) x {sc.cpus_per_worker} CPU (GPU {sc.use_gpu} x {sc.gpus_per_worker:g}); "
        f"trials at once: {job['max_concurrent'] or 'as many as the resources hold'}",
        f"trials:  {experiment_location(job)}/trials/<config>-seed<k>/",
        f"results: {job['results_dir']}/",
    ])


# --------------------------------------------------------------------------- trials


def trial_config(job: dict, group: TrainingGroup, seed: int) -> Config:
    """A trial's config: the job's, the group's values, seed + k, its run folder under trials/."""
    cfg = group.config(from_dict(job["config"]), seed)
    return replace(cfg, run_name=f"{group.folder}-seed{seed}",
                   output=replace(cfg.output, runs_dir=join(experiment_location(job), "trials")))


def evaluation_location(job: dict, evaluation: Evaluation, seed: int) -> str:
    return join(job["results_dir"], evaluation.folder, f"seed{seed}")


def init_location(job: dict, group: TrainingGroup, seed: int) -> str | None:
    if group.stage == 1:
        return None
    if group.init_group is None:
        return job["init"]
    return join(experiment_location(job), "trials", f"{group.init_group}-seed{seed}", "stage1", "best.pt")


def run_ablation_trial(params: dict, job: dict) -> None:
    """Tune function trainable: train one stage of one (config, seed), then score its evaluations,
    all on one Ray Train worker group; what an earlier attempt finished is skipped."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs import ray_train
    from trueface.checkpoint import finished_stage

    plan = job_plan(job)
    stage, seed = int(params["stage"]), int(params["seed"])
    group = next(g for g in plan.phase(stage) if g.name == params["group"])
    cfg = trial_config(job, group, seed)
    paths = RunPaths.of(cfg)
    run = paths.run_mirror()
    run.pull(f"stage{stage}/stage.json")
    evaluations = [{"variant": e.variant, "eval_values": e.eval_values, "out": evaluation_location(job, e, seed)}
                   for e in group.evaluations]
    cache = cfg.data.cache_dir
    pending = [e for e in evaluations if not Mirror.of(e["out"], cache).exists("summary.md")]
    if finished_stage(paths.stage_dir(stage)) is not None and not pending:
        tune.report({"stage": stage, "done": 1})
        return
    from trueface.config import to_yaml

    atomic_write_text(paths.run_dir / "config.yaml", to_yaml(cfg))
    run.push("config.yaml")
    ray_train.fit(ablation_worker, cfg, f"{cfg.run_name}-stage{stage}",
                  {"stage": stage, "init_from": init_location(job, group, seed), "attach_checkpoint": False,
                   "evaluations": pending},
                  fresh=not run.exists(f"stage{stage}/last.pt"), callbacks=[TuneReportCallback()])
    run.delete(f"stage{stage}/last.pt")  # the stage is over: last.pt only ever resumed it


def ablation_worker(config: dict) -> None:
    """Ray Train worker: the stage (jobs.ray_train.stage_worker, skipped when finished), then
    every pending evaluation of its best.pt (scored on all workers, written by rank 0)."""
    import ray.train

    from jobs import ray_train
    from trueface.checkpoint import finished_stage
    from trueface.data.layout import discover_layout
    from trueface.evaluation import ThresholdRequest, evaluate_checkpoint
    from trueface.storage import fetch

    cfg, stage = from_dict(config["cfg"]), int(config["stage"])
    paths = RunPaths.of(cfg)
    paths.run_mirror().pull(f"stage{stage}/stage.json")
    if finished_stage(paths.stage_dir(stage)) is None:
        ray_train.stage_worker(config)
    cfg, di = ray_train._worker_setup(cfg)
    checkpoint = fetch(paths.location(f"stage{stage}/best.pt"), cfg.data.cache_dir)
    layout = discover_layout(cfg.data.root, cfg.data.exclude)
    for ev in config.get("evaluations", []):
        out = Mirror.of(ev["out"], cfg.data.cache_dir)
        evaluate_checkpoint(checkpoint, layout, out.local, test_domains=tuple(cfg.data.test_domains),
                            thresholds=ThresholdRequest("valid", chosen_by=f"jobs.ablate ({ev['variant']})"),
                            dist_info=di, config_values=ev["eval_values"])
        if di.rank == 0:
            out.push()
    ray.train.report({"stage": stage, "done": 1})


# --------------------------------------------------------------------------- running


def _run(job: dict, plan: AblationPlan, exp: Mirror, address: str | None) -> int:
    cfg = from_dict(job["config"])
    started = time.time()
    trials = {s: len(plan.phase(s)) * job["seeds"] for s in plan.stages}
    init_ray(address, cfg, num_cpus=None if address else ray_tune.local_cpus(cfg, job["max_concurrent"], max(trials.values())))
    import ray
    from ray import tune

    from jobs import ray_train

    per_trial = ray_tune.per_trial_resources(cfg, ray_train.scaling_config(cfg).use_gpu)
    trainable = tune.with_resources(tune.with_parameters(run_ablation_trial, job=job), {"CPU": ray_tune.TRIAL_DRIVER_CPUS})
    for stage in plan.stages:
        groups = plan.phase(stage)
        concurrent = job["max_concurrent"] or ray_tune.derive_max_concurrent(ray.cluster_resources(), per_trial, trials[stage])
        print(f"Stage {'I' * stage}: {trials[stage]} trial(s), {concurrent} at once, each holding {per_trial}", flush=True)
        name = f"tune-stage{stage}"
        if exp.exists(f"{name}/tuner.pkl"):
            tuner = tune.Tuner.restore(join(exp.location, name), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"stage": stage, "group": tune.grid_search([g.name for g in groups]),
                             "seed": tune.grid_search(list(range(job["seeds"])))},
                tune_config=tune.TuneConfig(max_concurrent_trials=concurrent,
                                            trial_dirname_creator=lambda t: f"{t.config['group']}-seed{t.config['seed']}"),
                run_config=tune.RunConfig(name=name, storage_path=exp.location, verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
        failed = [r for r in grid if r.error]
        if failed:
            print(f"\n{len(failed)} Stage {'I' * stage} trial(s) failed:\n  " + "\n  ".join(
                f"{r.path}: {str(r.error).splitlines()[0][:300]}" for r in failed), flush=True)
            print(f"fix the cause, then python -m jobs.ablate --resume {job['name']} reruns them", flush=True)
            return 1
    minutes = (time.time() - started) / 60
    summary = write_ablation_report(job, plan, minutes)
    print(f"\n{job['kind']} finished in {minutes:.1f} min")
    print(summary)
    print(f"\nreport: {job['results_dir']}/summary.md (+ comparison.csv, comparison.parquet, heatmap.png, forest.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
