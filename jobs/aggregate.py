"""Aggregate a search into ``results/<name>/``: the ranked trials, the best config, its test table;
or compare any set of runs, searches and ablations in one cross-domain table.

Usage::

    python -m jobs.aggregate runs/tune/<name>              # also run by jobs.tune at the end
    python -m jobs.aggregate runs/tune/<name> --out /tmp/report --no-test
    python -m jobs.aggregate s3://bucket/tune/<name>       # a search kept in S3
    python -m jobs.aggregate runs/a runs/b results/abl-x --reference full   # a comparison
    python -m jobs.aggregate runs/a runs/b --weights raw --out /tmp/raw   # the raw weights' table

One path that holds a search (``trueface-tune.json``) aggregates that search, as below. Anything
else (several paths; a run, an evaluation report or an ablation) is compared: trueface.compare
builds the table (rows: runs or ablation variants; columns: each test domain and combined; cells:
mean AUC with its 95% interval, over seeds where there are several, else a bootstrap over the test
images) and writes comparison.md, comparison.csv, comparison.parquet, heatmap.png and, with a
reference, forest.png into ``--out`` (default ``results/compare-<date>-<time>``).

Writes ``summary.md`` (trials best first, the best trial's test table), ``trials.csv`` and
``trials.parquet`` (one row per trial), ``best_config.yaml`` (which ``python -m jobs.pipeline
--config`` takes as is), ``params.png`` (the objective against each parameter),
``importances.png`` (Optuna's parameter importances) and ``test/`` (the best trial's full
evaluation report). Trials are ranked on the search's objective, the final stage's
``best/select_auc_ema`` (validation only); the test splits are scored for the best trial alone,
after it was chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from jobs import ray_tune
from jobs.common import metrics_table
from trueface.atomic import atomic_write_text
from trueface.compare import WEIGHTS, CompareError, compare, read_job_file, units_from_paths
from trueface.config import Config, apply_values, from_dict, to_yaml
from trueface.data.layout import discover_layout
from trueface.search_report import (TEST_DIR, TESTED_FILE, format_trials, param_importances, rank_trials,
                                    stale_test_report, write_search_report)
from trueface.storage import Mirror, StorageError, absolute, fetch, join

Evaluator = Callable[[Config, str, Mirror], None]  # (trial config, checkpoint location, results folder)


@dataclass(frozen=True)
class TrialInfo:
    """What Tune knows of a trial: its id, folder, status and sampled parameters."""

    trial_id: str
    path: Path
    status: str  # PENDING | RUNNING | PAUSED | TERMINATED | ERROR
    params: dict


def load_trials(experiment: Mirror) -> list[TrialInfo]:
    """Tune's trials of the search kept at ``experiment`` (a path or URI; Tune reads either), each
    with the folder of its working copy (``experiment.local``), where its files were pulled."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(experiment.location)
    except Exception as exc:  # Tune raises several types for a folder that is not an experiment
        raise SystemExit(f"error: {experiment.location} holds no Tune experiment state yet ({exc}); "
                         f"was the search started? (python -m jobs.tune)") from exc
    return [TrialInfo(t.trial_id, experiment.local / Path(t.path).name, t.status, dict(t.config))
            for t in analysis.trials]


def read_results(path: Path) -> list[dict]:
    """Tune's ``result.json`` (one JSON object per report); a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def trial_row(info: TrialInfo, spec: dict, checkpoints: set[str] | frozenset[str] = frozenset(),
              location: str | None = None) -> dict:
    """One trial's row of the report (see trueface.search_report for the columns). ``checkpoints``:
    the relative paths of the ``best.pt`` files the experiment holds; ``location``: where it was
    read from (default: where the search wrote it)."""
    space = ray_tune.search_space(spec)
    results = read_results(info.path / "result.json")
    final_stage = max((int(r["stage"]) for r in results if "stage" in r), default=None)
    scored = [r for r in results if r.get("stage") == final_stage]
    epochs = int(results[-1].get(ray_tune.TRIAL_EPOCH, 0)) if results else 0
    checkpoint = f"{info.path.name}/stage{final_stage}/best.pt" if final_stage else None
    return {
        "trial": info.path.name,
        **space.values(info.params),
        # Only the search's final stage reports a number here (earlier stages: NaN), so a trial
        # that never reached it has none: no Stage I score is ever ranked against a Stage II one.
        "objective": _best(results, ray_tune.OBJECTIVE),
        "best_auc_ema": _best(scored, "val/auc_ema"),
        "best_auc": _best(scored, "val/auc"),
        "final_stage": final_stage,
        "epochs": epochs,
        "outcome": _outcome(info, results, spec),
        "wall_min": round(results[-1].get("time_total_s", math.nan) / 60, 2) if results else math.nan,
        "checkpoint": join(location or ray_tune.experiment_location(spec), checkpoint) if checkpoint in checkpoints else None,
    }


def _best(results: list[dict], key: str) -> float:
    values = [float(r[key]) for r in results if key in r and r[key] is not None and math.isfinite(float(r[key]))]
    return max(values) if values else math.nan


def _outcome(info: TrialInfo, results: list[dict], spec: dict) -> str:
    """From the reports themselves: ASHA may kill a trial right after its last report, before the
    trial function could write anything, so no marker file would be reliable."""
    if info.status == "ERROR":
        return "error"
    if info.status != "TERMINATED":
        return "unfinished"
    last = results[-1] if results else {}
    if last.get("stage") == spec["stages"][-1] and last.get("stage_done"):
        cfg = ray_tune.trial_config(spec, info.params, info.path.name)  # its own epochs, where they are searched
        stopped = [s for s in spec["stages"] if any(
            r.get("stage") == s and r.get("stage_done") and r["epoch"] < cfg.stage(s).epochs for r in results)]
        return f"early-stopped (patience, stage {stopped[-1]})" if stopped else "completed"
    return f"stopped by ASHA at Stage {'I' * int(last.get('stage', 0))} epoch {last.get(ray_tune.OBJECTIVE_EPOCH, 0)}"


def best_config_yaml(spec: dict, best: TrialInfo, row: dict) -> str:
    space = ray_tune.search_space(spec)
    cfg = apply_values(from_dict(spec["base_config"]), space.values(best.params))
    cfg = replace(cfg, run_name=f"{spec['name']}-best")
    searched = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in space.values(best.params).items())
    head = [
        f"# Best trial of search {spec['name']}: {best.path.name}",
        f"# objective (Stage {row['final_stage']} {ray_tune.SCORE}, validation) {row['objective']:.4f}; "
        f"pooled validation AUC (EMA) {row['best_auc_ema']:.4f}, raw {row['best_auc']:.4f}",
        f"# searched: {searched}",
        "# Train it: python -m jobs.pipeline --config <this file>",
    ]
    if spec["stages"] == [2]:
        head.append(f"# (the search fine-tuned Stage II from {spec['init']}; the pipeline trains Stage I too)")
    return "\n".join(head) + "\n" + to_yaml(cfg)


def local_evaluator(cfg: Config, checkpoint: str, out: Mirror) -> None:
    """Score the test splits in this process (no Ray): the engine on this machine's CPU or GPU."""
    from trueface.evaluation import ThresholdRequest, evaluate_checkpoint

    evaluate_checkpoint(fetch(checkpoint, cfg.data.cache_dir), discover_layout(cfg.data.root, cfg.data.exclude), out.local,
                        test_domains=tuple(cfg.data.test_domains), thresholds=ThresholdRequest("valid"))


def ray_evaluator(cfg: Config, checkpoint: str, out: Mirror) -> None:
    """Score the test splits on one Ray Train worker (a GPU one where the cluster has GPUs)."""
    from jobs import ray_train
    from trueface.evaluation import ThresholdRequest

    ray_train.evaluate(cfg, "evaluate", checkpoint, cfg.data.root, out.location,
                       test_domains=cfg.data.test_domains, thresholds=ThresholdRequest("valid"))
    out.pull()


def aggregate(experiment: str | Path, out: str | Path | None = None, evaluate: Evaluator | None = local_evaluator,
              cache_dir: str | None = None) -> Mirror:
    """Write the search report of the search kept at ``experiment`` (a path or URI) into ``out``
    (default: the search's results folder; a path or URI) and return that folder's mirror.
    ``evaluate=None`` leaves the test table out."""
    exp = ray_tune.experiment_mirror(absolute(experiment), cache_dir)
    exp.pull(ray_tune.SPEC_FILE)
    spec_path = exp.local / ray_tune.SPEC_FILE
    if not spec_path.is_file():
        raise SystemExit(f"error: {exp.location} is not a TrueFace search (no {ray_tune.SPEC_FILE}); "
                         f"pass <storage>/<name>, e.g. runs/tune/demo-20261127-101500")
    spec = read_spec(spec_path, exp.location)
    cache = from_dict(spec["config"]).data.cache_dir
    exp.pull(skip_suffixes=(".pt",))  # reports, configs, TensorBoard: checkpoints stay where they are
    report = Mirror.of(absolute(out or spec["results_dir"]), cache)
    infos = {info.path.name: info for info in load_trials(exp)}
    if not infos:
        raise SystemExit(f"error: search {spec['name']} has no trials yet")
    files = exp.files()
    rows = rank_trials([trial_row(info, spec, set(files), exp.location) for info in infos.values()])
    best_row = rows[0]
    best = infos[best_row["trial"]]
    test_md = None
    if evaluate is not None and best_row["checkpoint"]:
        checkpoint = f"{best.path.name}/stage{best_row['final_stage']}/best.pt"
        stamp = {"trial": best.path.name, "checkpoint": best_row["checkpoint"], "modified": files[checkpoint].mtime_ns}
        test_md = _best_trial_test(spec, best, stamp, report.child(TEST_DIR), evaluate)
    space = ray_tune.search_space(spec)
    header = {
        "search": spec["name"], "trials": f"{len(rows)} of {spec['num_samples']}", "space": spec["space_source"],
        "stages trained": ", ".join(map(str, spec["stages"])) + (f" (Stage II from {spec['init']})" if spec.get("init") else ""),
        "ranked by": f"objective: the best {from_dict(spec['config']).eval.select_on} validation AUC of the EMA "
                     f"weights ({ray_tune.SCORE}) in Stage {'I' * spec['stages'][-1]}, the search's final stage; "
                     f"a trial stopped by ASHA has the one it had when stopped",
        "best trial": f"{best_row['trial']} ({best_row['objective']:.4f})",
        "trial folders": exp.location, "tensorboard": f"tensorboard --logdir {exp.local}",
        "command": spec.get("command", ""),
    }
    params = [(p.key, p.form in ("loguniform", "decay")) for p in space.params]
    write_search_report(report.local, rows, params, best_config_yaml(spec, best, best_row), header, test_md,
                        importances=param_importances(rows, space))
    report.push()
    return report


# What aggregate reads of a search's spec file without a default (jobs.tune writes them all).
SPEC_KEYS = ("name", "config", "results_dir", "stages", "space", "space_source", "num_samples")


def read_spec(path: Path, location: str, keys: Sequence[str] = SPEC_KEYS) -> dict:
    """A search's ``trueface-tune.json``, or an exit naming the file and what is wrong with it
    (not JSON, not an object, or without one of ``keys``)."""
    try:
        spec = read_job_file(location, path, "search", "python -m jobs.tune")
    except CompareError as exc:
        raise SystemExit(f"error: {exc}") from None
    missing = [k for k in keys if k not in spec]
    if missing:
        raise SystemExit(f"error: {location}/{path.name} lacks {', '.join(missing)}; it is not a complete search "
                         f"spec as python -m jobs.tune writes it (was it edited by hand?); restore it")
    return spec


def _best_trial_test(spec: dict, best: TrialInfo, stamp: dict, out: Mirror, evaluate: Evaluator) -> str:
    """The best trial's test table (evaluated once per best checkpoint, then read back)."""
    marker = out.local / TESTED_FILE
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp and (out.local / "summary.md").is_file()):
        print(f"scoring the best trial ({best.path.name}) on the test splits ...", flush=True)
        evaluate(ray_tune.trial_config(spec, best.params, best.path.name), stamp["checkpoint"], out)
        atomic_write_text(marker, json.dumps(stamp))
    return "```\n" + metrics_table(out.local) + "\n```\n\nFull report: [test/summary.md](test/summary.md)"


def print_summary(report: Mirror, experiment: Mirror) -> None:
    import pyarrow.parquet as pq

    out_dir = report.local
    rows = pq.read_table(out_dir / "trials.parquet").to_pylist()
    spec = read_spec(experiment.local / ray_tune.SPEC_FILE, experiment.location, ("space", "space_source"))
    keys = ray_tune.search_space(spec).keys
    print("\n" + format_trials(rows, keys))
    stale = stale_test_report(out_dir)
    if stale:
        print(f"\nno test table: {stale}. Run python -m jobs.aggregate {experiment.location} without --no-test "
              "to score the best trial")
    elif (out_dir / TEST_DIR / "metrics.parquet").is_file():
        print(f"\nbest trial {rows[0]['trial']} on the test splits:\n" + metrics_table(out_dir / TEST_DIR))
    print(f"\nreport:      {report.location}/summary.md (+ trials.csv, trials.parquet, params.png, importances.png, test/)")
    print(f"best config: python -m jobs.pipeline --config {out_dir}/best_config.yaml")
    print(f"tensorboard: tensorboard --logdir {experiment.local}"
          + (f" (a working copy of {experiment.location})" if experiment.remote else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.aggregate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="one search's folder, <storage>/<name> (e.g. runs/tune/demo-... or s3://bucket/tune/demo-...); "
                             "or runs, evaluation reports, searches and ablations to compare (paths or URIs)")
    parser.add_argument("--out", help="report folder, a path or a URI (default: the search's results/<name>; "
                                      "for a comparison results/compare-<date>-<time>)")
    parser.add_argument("--no-test", action="store_true", help="search only: leave out the best trial's test table")
    parser.add_argument("--reference", metavar="LABEL",
                        help="comparison only: the row every other is compared with (default: an ablation's own)")
    parser.add_argument("--weights", choices=WEIGHTS,
                        help="comparison only: weights read where a path does not say which (default: ema; an "
                             "ablation's rows say their own)")
    args = parser.parse_args(argv)
    try:
        if len(args.paths) == 1 and _is_search(args.paths[0]):
            if args.reference or args.weights:
                parser.error("--reference and --weights apply to comparisons; to compare a search with others, "
                             "give them too")
            return _aggregate_search(args.paths[0], args.out, args.no_test)
        if args.no_test:
            parser.error("--no-test applies to one search; it has no meaning for a comparison")
        command = "python -m jobs.aggregate " + shlex.join(sys.argv[1:] if argv is None else list(argv))
        return _compare(args.paths, args.out, args.reference, args.weights or "ema", command)
    except StorageError as exc:
        sys.exit(f"storage error: {exc}")


def _is_search(path: str) -> bool:
    return Mirror.of(absolute(path), Config().data.cache_dir).exists(ray_tune.SPEC_FILE)


def _aggregate_search(experiment: str, out: str | None, no_test: bool) -> int:
    report = aggregate(experiment, out, evaluate=None if no_test else local_evaluator)
    print_summary(report, ray_tune.experiment_mirror(absolute(experiment)))
    return 0


def _compare(paths: list[str], out: str | None, reference: str | None, weights: str, command: str) -> int:
    """Compare the units found at ``paths``; write the report to ``out``, print the table and files."""
    cache = Config().data.cache_dir
    report = Mirror.of(absolute(out or f"results/compare-{time.strftime('%Y%m%d-%H%M%S')}"), cache)
    try:
        found = units_from_paths(paths, weights, cache)
        result = compare(found.units, report.local, reference or found.reference,
                         header={"command": command})
    except CompareError as exc:
        sys.exit(f"error: {exc}")
    report.push()
    print(result.markdown)
    print(f"report: {report.location}/ (" + ", ".join(result.files) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
