"""Hyperparameter search on Ray Tune: Optuna (TPE) proposes, ASHA stops weak trials early.

Usage::

    python -m jobs.tune                                          # demo: 8 Stage I trials on the CPU
    python -m jobs.tune --space search_spaces/paper.yaml --config paper --stage both \\
        --data-root /data/faces --num-samples 64 --address auto
    python -m jobs.tune --space paper-stage2 --config paper --stage 2 --init runs/paper/stage1/best.pt
    python -m jobs.tune --resume NAME                            # finish an interrupted search
    python -m jobs.tune --dry-run                                # the plan only

Every trial trains with the same seed (same initial weights and data order), so trials differ by
their parameters only. Trials are compared on the final stage's ``best/select_auc_ema`` at equal
epochs of that stage (see jobs.ray_tune); a space whose keys act after ASHA's first rung is
refused. Each trial's folder ``<storage>/<name>/<trial>/`` holds its config, checkpoints and
TensorBoard logs; ``results/<name>/`` gets the aggregated tables at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time

import yaml
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from jobs import ray_tune
from jobs.common import (add_config_arguments, add_ray_arguments, check_model_weights, config_from_args,
                         exit_on_config_problems, exit_unless_data_here, init_ray, nonempty, warn_if_outputs_vanish)
from trueface.atomic import atomic_write_text
from trueface.checkpoint import CheckpointError, load_checkpoint
from trueface.config import Config, ConfigError, apply_values, from_dict, to_dict
from trueface.config.loading import is_run_name
from trueface.config.search_space import SearchSpace, SearchSpaceError, load_search_space
from trueface.data.layout import DataLayout, DataLayoutError
from trueface.data.check import DataCheckError
from trueface.run import planned_steps_per_epoch, prepare_run
from trueface.storage import Mirror, StorageError, absolute, check_location, check_writable, fetch, is_uri, join

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
STAGE_CHOICES = {"1": [1], "2": [2], "both": [1, 2]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, argv, storage = parse_with_storage(parser, argv)
    if args.resume:
        _refuse_settings_with_resume(parser, args)
        spec = _load_spec(storage, args.resume)
        exit_unless_data_here(from_dict(spec["config"]), f"search {args.resume}")
        print(f"resuming search {args.resume} ({spec['num_samples']} trials) with the settings it was started with",
              flush=True)
    else:
        spec = _new_spec(args, storage, command="python -m jobs.tune " + shlex.join(argv))
    print(describe(spec), flush=True)
    _check_schedule(spec)  # after the plan, which shows the rungs and when each key acts
    check_searched_weights(spec)  # files the space names: a dry run checks them too
    if args.dry_run:
        return 0
    # the config's own weights: not in a dry run, which may plan a cluster's search on a machine
    # without the cluster's ImageNet weights (the cluster job commands are checked so)
    check_model_weights(from_dict(spec["config"]))
    exp = ray_tune.experiment_mirror(spec)
    try:
        check_writable(exp.location, "--storage")
        if not args.resume and exp.remote and exp.exists(ray_tune.SPEC_FILE):
            _refuse_existing(exp, spec["name"], args.storage)
    except StorageError as exc:
        sys.exit(f"error: {exc}")
    if not args.resume:
        atomic_write_text(exp.local / ray_tune.SPEC_FILE, json.dumps(spec, indent=2))
        atomic_write_text(exp.local / "search_space.yaml", yaml.safe_dump(spec["space"], sort_keys=False))
        exp.push(ray_tune.SPEC_FILE, "search_space.yaml")
    return _run(spec, exp, args)


def check_searched_weights(spec: dict) -> None:
    """Load each ``model.weights`` a trial can draw (a searched choice) as check_model_weights
    loads the base config's, before Ray starts: a missing or ill-fitting file would fail its
    trials in their workers."""
    cfg, space = from_dict(spec["config"]), ray_tune.search_space(spec)
    for param in (p for p in space.params if p.key == "model.weights"):
        for value in param.values:
            if value != cfg.model.weights:  # the config's own is loaded already
                check_model_weights(replace(cfg, model=replace(cfg.model, weights=str(value))),
                                    f"{space.source}: model.weights choice {value!r}",
                                    f"Fix the path or remove it from the choice in {space.source}")


def parse_with_storage(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                       ) -> tuple[argparse.Namespace, list[str], str]:
    """Parsed arguments, the argument list (for the record), and ``--storage`` checked and absolute."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides on either side of the flags
    try:
        check_location(args.storage, "--storage")
    except StorageError as exc:
        sys.exit(f"error: {exc}")
    return args, argv, absolute(args.storage)


def add_trial_arguments(p: argparse.ArgumentParser) -> None:
    """Resources of each trial (jobs.tune and jobs.ablate)."""
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (scaling.num_workers)")
    p.add_argument("--cpus-per-worker", type=int, help="CPUs per worker (scaling.cpus_per_worker)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (scaling.gpus_per_worker)")


def trial_resources(args: argparse.Namespace) -> dict:
    """The config values of add_trial_arguments' flags that were given."""
    given = {"scaling.num_workers": args.workers_per_trial, "scaling.cpus_per_worker": args.cpus_per_worker,
             "scaling.gpus_per_worker": args.gpus_per_worker}
    return {k: v for k, v in given.items() if v is not None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, default="tune-demo")
    add_ray_arguments(p)
    p.add_argument("--space", type=nonempty, default="demo",
                   help=f"search space: a name in search_spaces/ ({', '.join(_space_names())}) or a path to a YAML file "
                        f"(a name wins over a local file or folder of that name: write ./NAME for those); default: demo")
    p.add_argument("--stage", choices=list(STAGE_CHOICES), default="1",
                   help="what a trial trains: 1 (Stage I), 2 (Stage II from --init), both; default: 1")
    p.add_argument("--init", type=nonempty, help="Stage I checkpoint every --stage 2 trial starts from, a path or URI "
                                  "(e.g. runs/demo/stage1/best.pt)")
    p.add_argument("--num-samples", type=int, default=8, help="trials to run (default: 8)")
    add_trial_arguments(p)
    p.add_argument("--grace-period", type=int,
                   help="epochs of the final stage every trial trains before ASHA may stop it (default: the space's "
                        "grace_period, else 1); must not come before a searched key first acts")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA keeps the best 1/this at each rung (default: 2)")
    p.add_argument("--startup-trials", type=int,
                   help="random trials before TPE models the results (default: half the trials, 2 to 10)")
    p.add_argument("--name", type=nonempty,
                   help="search name: <storage>/<name>/ and results/<name>/ (default: <space>-<date>-<time>)")
    p.add_argument("--storage", type=nonempty, default="runs/tune",
                   help="where searches live: a local path, or on a cluster a shared filesystem every node mounts (default: runs/tune)")
    p.add_argument("--resume", metavar="NAME", type=nonempty, help="finish the interrupted search NAME (in --storage)")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; run nothing")
    return p


def _refuse_settings_with_resume(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A resumed search keeps the settings it was started with; silently ignoring others would mislead."""
    allowed = {"resume", "storage", "address", "dry_run"}
    given = sorted(f"--{k.replace('_', '-')}" if k != "overrides" else "KEY=VALUE overrides"
                   for k, v in vars(args).items() if k not in allowed and v != parser.get_default(k) and v != [])
    if given:
        sys.exit(f"error: --resume continues a search with the settings it was started with; drop {', '.join(given)} "
                 f"(or start a new search with --name)")


def _space_folders() -> list[Path]:
    """Where named spaces live: ``search_spaces/`` of the working directory (a Ray job's uploaded
    copy) first, then this checkout's."""
    return list(dict.fromkeys([Path.cwd() / "search_spaces", SPACES_DIR]))


def _space_names() -> list[str]:
    # ablation*.yaml are jobs.ablate's specs, kept beside the spaces they ablate
    return sorted({p.stem for folder in _space_folders() for p in folder.glob("*.yaml")
                   if not p.stem.startswith("ablation")})


def _space_path(name: str) -> Path:
    """``--space``: a path where it looks like one (it ends in .yaml/.yml or holds a '/'), else a
    named space, ``search_spaces/<name>.yaml`` (see _space_folders), else a file of that name.
    A name wins over a file or folder of the same name in the working directory: ``--space demo``
    means the shipped demo wherever it is run from (``./demo`` names the local file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or "/" in name or path.name != name:
        return _not_a_folder(path, name)
    named = next((f / f"{name}.yaml" for f in _space_folders() if (f / f"{name}.yaml").is_file()), None)
    if named is not None:
        return named
    if path.is_file():
        return path
    _not_a_folder(path, name)
    raise SearchSpaceError(f"--space {name}: no search space of that name (spaces: {', '.join(_space_names())}) and "
                           f"no such file; give one of the names, or a path to a YAML file")


def _not_a_folder(path: Path, name: str) -> Path:
    """``path``, unless it is a folder (which read_yaml_file would call missing)."""
    if path.is_dir():
        inside = sorted(str(p) for p in path.glob("*.y*ml"))[:5]
        raise SearchSpaceError(f"--space {name} is a folder; a search space is a .yaml file: give the path to one"
                               + (f" ({', '.join(inside)})" if inside else "") + ", or a space name")
    return path


def _new_spec(args: argparse.Namespace, storage: str, command: str) -> dict:
    """Everything a search needs, checked before Ray starts; exits with a message on any error."""
    base = config_from_args(args)
    warn_if_outputs_vanish(base, (("--storage", args.storage),))
    stages = STAGE_CHOICES[args.stage]
    try:
        base = apply_values(base, trial_resources(args))
        space_path = _space_path(args.space)
        space = load_search_space(space_path)
        prepared = prepare_run(base)
        cfg, layout = prepared.cfg, prepared.layout
        space.check(cfg, stages)
    except (ConfigError, DataLayoutError, StorageError) as exc:
        sys.exit(f"error: {exc}")
    except DataCheckError as exc:
        sys.exit(f"{exc}\nRun python -m jobs.check_data --data-root {base.data.root or '<root>'} for the full report.")
    exit_on_trial_batch_problems(cfg, space, layout, stages)
    if prepared.check.findings:  # every trial trains on what the check let through: say what that is
        print(prepared.check.summary(), flush=True)
    init = _check_init(args, stages, cfg)
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--grace-period", args.grace_period, 1),
                             ("--reduction-factor", args.reduction_factor, 2), ("--max-concurrent", args.max_concurrent, 1),
                             ("--startup-trials", args.startup_trials, 0)):
        if value is not None and value < low:
            sys.exit(f"error: {flag} must be >= {low}, got {value}")
    grace = args.grace_period or space.grace_period or 1
    startup = min(10, max(2, args.num_samples // 2)) if args.startup_trials is None else args.startup_trials
    name = args.name or f"{space_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not is_run_name(name):
        sys.exit(f"error: --name {name!r} must be one folder name of letters, digits, '-', '_', '.', '=', ','")
    exp = ray_tune.experiment_mirror(join(storage, name), cfg.data.cache_dir)
    if exp.local.exists():  # a URI's search is looked for once the dry run is over (see main)
        _refuse_existing(exp, name, args.storage)
    return {
        "version": ray_tune.SPEC_VERSION, "name": name, "storage": storage, "command": command.strip(),
        "config": to_dict(cfg), "base_config": to_dict(base),
        "space": space.to_dict(), "space_source": str(space_path),
        "stages": stages, "init": init,
        "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
        "seed": cfg.seed, "startup_trials": startup,
        "grace_period": grace, "reduction_factor": args.reduction_factor,
        "steps_per_epoch": steps_per_epoch(cfg, layout, stages, space),
        "results_dir": join(cfg.output.results_dir, name), "address": args.address,
    }


def _check_schedule(spec: dict) -> None:
    """Refuse (before Ray starts, in a dry run too) a space whose keys never act, or act after
    ASHA's first rung; the message says which --grace-period fits."""
    try:
        ray_tune.schedule(spec).check()
    except ConfigError as exc:
        data = from_dict(spec["config"]).data.root
        sys.exit(f"error: {exc}\n  (epochs and steps per epoch ({spec['steps_per_epoch']} by stage) are those of this "
                 f"config on the data in {data})")


# searched keys that change a stage's optimizer steps per epoch
STEP_KEYS = ("samples_per_epoch", "batch_size", "accum_steps", "balance")
# what decides whether the workers can share a trial's batches; a dotted key is the same for every stage
BATCH_KEYS = (*STEP_KEYS, "mixup_alpha", "scaling.num_workers")


def range_end_configs(cfg: Config, stage: int, space: SearchSpace | None, keys: tuple[str, ...]) -> list[Config]:
    """The trial configs at every combination of the range ends of the stage's searched ``keys``
    (a stage's own, like ``batch_size``, or dotted, like ``scaling.num_workers``; just ``cfg`` where
    none is searched). SearchSpace.check has refused any combination the config refuses; skipping
    one here only keeps this usable on an unchecked space."""
    return [trial for _, trial in range_end_trials(cfg, stage, space, keys)]


def range_end_trials(cfg: Config, stage: int, space: SearchSpace | None, keys: tuple[str, ...]
                     ) -> list[tuple[dict, Config]]:
    """``range_end_configs``, each with the searched values it was made with."""
    wanted = {k if "." in k else f"stage{stage}.{k}" for k in keys}
    params = [p for p in (space.params if space else ()) if p.key in wanted]
    out = []
    for values in itertools.product(*(p.extremes() for p in params)):
        chosen = {p.key: v for p, v in zip(params, values)}
        try:
            out.append((chosen, apply_values(cfg, chosen)))
        except ConfigError:
            continue
    return out


def exit_on_trial_batch_problems(cfg: Config, space: SearchSpace, layout: DataLayout, stages: list[int]) -> None:
    """End the search, before Ray starts, where the workers could not share the batches of a trial
    at the range ends of the searched batch keys (BATCH_KEYS) or at a value inside a searched int
    range; a problem of searched values names them and the space file."""
    from trueface.run import batch_problems  # torch: only once the space is read

    problems: list[str] = []
    for stage in stages:
        for values, trial in range_end_trials(cfg, stage, space, BATCH_KEYS):
            drawn = ", ".join(f"{k}={v}" for k, v in values.items())
            for problem in batch_problems(trial, layout, [stage]):
                if drawn:
                    problem += (f" (a trial can draw {drawn} from {space.source}: change those keys' ranges there "
                                f"so that every combination divides)")
                problems.append(problem)
    exit_on_config_problems(problems + inner_batch_problems(cfg, stages, space))


def inner_batch_problems(cfg: Config, stages: list[int], space: SearchSpace) -> list[str]:
    """Batch splits the workers refuse at a value inside a searched ``int`` range of a stage's
    batch_size or accum_steps, or of scaling.num_workers, which ``range_end_configs`` does not
    reach: over 2 workers, batch sizes 16 and 64 divide and a trial's 37 would fail; a batch of 16
    divides over 1 and 4 workers, not over a trial's 3. At most one problem per stage."""
    from trueface.train import batch_split_problem  # torch: only once the space is read

    problems = []
    workers_param = next((p for p in space.params if p.key == "scaling.num_workers"), None)
    for stage in stages:
        key, st = f"stage{stage}", cfg.stage(stage)
        params = {p.key.split(".", 1)[1]: p for p in space.params if p.key.startswith(f"{key}.")}
        searched = [params.get("batch_size"), params.get("accum_steps"), workers_param]
        if not any(p is not None and p.form == "int" for p in searched):
            continue
        mixup = max([st.mixup_alpha] if "mixup_alpha" not in params else params["mixup_alpha"].extremes())
        found = next((problem for batch in _every_value(params.get("batch_size"), st.batch_size)
                      for accum in _every_value(params.get("accum_steps"), st.accum_steps)
                      for workers in _every_value(workers_param, cfg.scaling.num_workers)
                      if (problem := batch_split_problem(replace(st, batch_size=int(batch), accum_steps=int(accum),
                                                                 mixup_alpha=float(mixup)), int(workers), key))), "")
        if found:
            problems.append(f"{found} (a value inside a searched int range, which trials draw too: search "
                            f"{key}.batch_size, {key}.accum_steps or scaling.num_workers with choice: [...] of "
                            f"values that work)")
    return problems


def _every_value(param, default) -> Sequence:
    """Every value a trial can draw for ``param`` (``[default]`` where it is not searched)."""
    if param is None:
        return [default]
    return param.int_values() if param.form == "int" else param.extremes()


def steps_per_epoch(cfg: Config, layout: DataLayout, stages: list[int], space: SearchSpace | None = None) -> dict[str, int]:
    """Optimizer steps per epoch of each stage (as trueface.train counts them); JSON keys, so strings.
    Where ``space`` searches a key that changes them, the fewest any trial takes (every combination of
    those keys' range ends): an effect counted in steps then falls in its latest epoch, which is the
    one the schedule's check must see."""
    return {str(stage): min((planned_steps_per_epoch(t, layout, stage)
                             for t in range_end_configs(cfg, stage, space, STEP_KEYS)),
                            default=planned_steps_per_epoch(cfg, layout, stage)) for stage in stages}


def _refuse_existing(exp: Mirror, name: str, storage_flag: str) -> None:
    sys.exit(f"error: a search named {name!r} already exists at {exp.location}.\n"
             f"  Resume it:       python -m jobs.tune --resume {name}{_storage_flag(storage_flag)}\n"
             f"  or start anew:   add --name <another name> (or delete {exp.location}"
             + (f" and {exp.local})" if exp.remote else ")"))


def _check_init(args: argparse.Namespace, stages: list[int], cfg: Config, archs: Sequence[str] = ()) -> str | None:
    """``--init``'s absolute location, checked: a Stage I checkpoint of the architecture every
    trial trains (``cfg``'s model.arch and ``archs``, those of rows or trials that set their own),
    or the job ends here; a mismatch would fail every trial in its worker."""
    if stages != [2]:
        if args.init:
            sys.exit(f"error: --init is for --stage 2; --stage {args.stage} trains Stage I itself")
        return None
    if args.init is None:
        sys.exit("error: --stage 2 needs --init CKPT, the Stage I checkpoint every trial starts from "
                 "(e.g. runs/demo/stage1/best.pt from python -m jobs.pipeline)")
    try:
        state = load_checkpoint(fetch(args.init, cfg.data.cache_dir))
    except (CheckpointError, StorageError) as exc:
        sys.exit(f"error: --init: {exc}")
    if state.get("stage") != 1:
        sys.exit(f"error: --init {args.init} is a Stage {state.get('stage')} checkpoint; Stage II starts from a Stage I one")
    from trueface.train import saved_arch  # torch is loaded already (load_checkpoint)

    saved = saved_arch(state)
    other = next((a for a in dict.fromkeys([cfg.model.arch, *archs]) if a != saved), None)
    if other is not None:
        sys.exit(f"error: --init {args.init} holds a {saved} (its saved config's model.arch), but trials would train "
                 f"model.arch={other}: Stage II starts from its weights, which fit a {saved} only. Set "
                 f"model.arch={saved}, or give a Stage I checkpoint of a {other}")
    return absolute(args.init)


def _storage_flag(storage: str) -> str:
    return "" if storage == "runs/tune" else f" --storage {storage}"


def _load_spec(storage: str, name: str) -> dict:
    exp = ray_tune.experiment_mirror(join(storage, name))
    exp.pull(ray_tune.SPEC_FILE)
    path = exp.local / ray_tune.SPEC_FILE
    if not path.is_file():
        known = [] if is_uri(storage) else sorted(p.parent.name for p in Path(storage).glob(f"*/{ray_tune.SPEC_FILE}"))
        sys.exit(f"error: no search named {name!r} in {storage}"
                 + (f"; searches there: {', '.join(known)}" if known else "") + " (--storage chooses the folder)")
    spec = json.loads(path.read_text())
    if spec.get("version") != ray_tune.SPEC_VERSION:
        sys.exit(f"error: search {name!r} was started by an older TrueFace, whose trials compared best/auc_ema of "
                 f"whichever stage they were in; its trials cannot be resumed under the final-stage objective. "
                 f"Start a new search (its finished trials stay readable with python -m jobs.aggregate)")
    return spec


def describe(spec: dict) -> str:
    cfg = from_dict(spec["config"])
    what = {(1,): "Stage I", (2,): f"Stage II from {spec['init']}", (1, 2): "Stage I then Stage II"}[tuple(spec["stages"])]
    epochs = sum(cfg.stage(s).epochs for s in spec["stages"])
    space = ray_tune.search_space(spec)
    sc = ray_tune.largest_scaling(cfg, space)
    most = " (at most: the space searches them)" if set(space.keys) & set(ray_tune.SCALING_KEYS) else ""
    exp = ray_tune.experiment_mirror(spec)
    return "\n".join([
        f"search {spec['name']}: {spec['num_samples']} trials of {what}, at most {epochs} epochs each",
        f"space {spec['space_source']}:",
        space.describe(),
        f"Optuna TPE (seed {spec['seed']}, first {spec['startup_trials']} trials random) proposes; ASHA stops",
        ray_tune.schedule(spec).describe(),
        f"per trial: {sc.num_workers} worker(s) x {sc.cpus_per_worker} CPU "
        f"(GPU {sc.use_gpu} x {sc.gpus_per_worker:g}){most}; "
        f"trials at once: {spec['max_concurrent'] or 'as many as the resources hold'}",
        f"trials:      {exp.location}/<trial>/ (config.yaml, stageN/best.pt)",
        f"tensorboard: tensorboard --logdir {exp.local}" + (f" (a working copy of {exp.location})" if exp.remote else ""),
        f"results:     {spec['results_dir']}/",
    ])


def _run(spec: dict, exp: Mirror, args: argparse.Namespace) -> int:
    cfg = from_dict(spec["config"])
    address = args.address or spec.get("address")
    started = time.time()
    space = ray_tune.search_space(spec)  # where it searches the workers, trials are counted at its largest
    init_ray(address, cfg, num_cpus=None if address else ray_tune.local_cpus(cfg, spec["max_concurrent"],
                                                                             spec["num_samples"], space))
    import ray
    from ray import tune

    from jobs import aggregate, ray_train

    use_gpu = ray_train.scaling_config(cfg).use_gpu
    per_trial = ray_tune.per_trial_resources(cfg, use_gpu, space)
    max_concurrent = spec["max_concurrent"] or ray_tune.derive_max_concurrent(ray.cluster_resources(), per_trial, spec["num_samples"])
    print(f"running {max_concurrent} trial(s) at once, each holding {per_trial}", flush=True)
    ray_tune.disable_default_loggers()
    trainable = ray_tune.make_trainable(spec)
    if args.resume:
        tuner = tune.Tuner.restore(exp.location, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray_tune.make_tuner(spec, trainable, max_concurrent)
    tuner.fit()
    trials = aggregate.load_trials(exp)
    freed = ray_tune.prune_last_checkpoints(exp, [t.path.name for t in trials if t.status == "TERMINATED"])
    if freed:
        print(f"deleted the resume checkpoints (last.pt) of trials that are over: {freed / 2**30:.1f} GiB freed", flush=True)
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    if unfinished or len(trials) < spec["num_samples"]:
        print(f"\nsearch {spec['name']} interrupted: {len(trials) - len(unfinished)} of {spec['num_samples']} trials "
              f"finished.\n  Resume it: python -m jobs.tune --resume {spec['name']}{_storage_flag(args.storage)}", flush=True)
        return 130
    failed = [t for t in trials if t.status == "ERROR"]
    if failed:
        print(f"\n{len(failed)} trial(s) failed; their errors are in:\n  "
              + "\n  ".join(join(exp.location, t.path.name, "error.txt") for t in failed), flush=True)
        if len(failed) == len(trials):
            print("no trial finished: fix the error, then python -m jobs.tune --resume "
                  f"{spec['name']}{_storage_flag(args.storage)} reruns the failed trials", flush=True)
            return 1
    # On a cluster the test splits are scored on a (GPU) worker; locally in this process, which
    # saves the ~40 s a Ray Train run takes to start.
    report = aggregate.aggregate(exp.location, evaluate=aggregate.ray_evaluator if address else aggregate.local_evaluator,
                                 cache_dir=cfg.data.cache_dir)
    print(f"\nsearch finished in {(time.time() - started) / 60:.1f} min")
    aggregate.print_summary(report, exp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
