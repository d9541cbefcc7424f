"""Aggregate a search into ``results/<name>/``: the ranked trials, the best config, its test table.

Usage::

    python -m jobs.aggregate runs/tune/<name>              # also run by jobs.tune at the end
    python -m jobs.aggregate runs/tune/<name> --out /tmp/report --no-test

Writes ``summary.md`` (trials best first, the best trial's test table), ``trials.csv`` and
``trials.parquet`` (one row per trial), ``best_config.yaml`` (which ``python -m jobs.pipeline
--config`` takes as is), ``params.png`` (validation AUC against each parameter) and ``test/``
(the best trial's full evaluation report). Trials are ranked on validation AUC only; the test
splits are scored for the best trial alone, after it was chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from jobs import ray_tune
from jobs.common import metrics_table
from trueface.atomic import atomic_write_text
from trueface.config import Config, apply_values, from_dict, to_yaml
from trueface.data.layout import discover_layout
from trueface.search_report import format_trials, rank_trials, write_search_report

Evaluator = Callable[[Config, Path, Path], None]  # (trial config, checkpoint, out_dir)
TEST_DIR = "test"


@dataclass(frozen=True)
class TrialInfo:
    """What Tune knows of a trial: its id, folder, status and sampled parameters."""

    trial_id: str
    path: Path
    status: str  # PENDING | RUNNING | PAUSED | TERMINATED | ERROR
    params: dict


def load_trials(exp_dir: Path) -> list[TrialInfo]:
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(exp_dir))
    except Exception as exc:  # Tune raises several types for a folder that is not an experiment
        raise SystemExit(f"error: {exp_dir} holds no Tune experiment state yet ({exc}); "
                         f"was the search started? (python -m jobs.tune)") from exc
    return [TrialInfo(t.trial_id, Path(t.path), t.status, dict(t.config)) for t in analysis.trials]


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


def trial_row(info: TrialInfo, spec: dict) -> dict:
    """One trial's row of the report (see trueface.search_report for the columns)."""
    space = ray_tune.search_space(spec)
    results = read_results(info.path / "result.json")
    final_stage = max((int(r["stage"]) for r in results if "stage" in r), default=None)
    scored = [r for r in results if r.get("stage") == final_stage]
    epochs = int(results[-1].get(ray_tune.TIME_ATTR, 0)) if results else 0
    checkpoint = info.path / f"stage{final_stage}" / "best.pt" if final_stage else None
    return {
        "trial": info.path.name,
        **space.values(info.params),
        "best_auc_ema": _best(scored, "val/auc_ema"),
        "best_auc": _best(scored, "val/auc"),
        "final_stage": final_stage,
        "epochs": epochs,
        "outcome": _outcome(info, results, spec),
        "wall_min": round(results[-1].get("time_total_s", math.nan) / 60, 2) if results else math.nan,
        "checkpoint": str(checkpoint) if checkpoint and checkpoint.is_file() else None,
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
        cfg = from_dict(spec["config"])
        stopped = [s for s in spec["stages"] if any(
            r.get("stage") == s and r.get("stage_done") and r["epoch"] < cfg.stage(s).epochs for r in results)]
        return f"early-stopped (patience, stage {stopped[-1]})" if stopped else "completed"
    return f"stopped by ASHA at epoch {last.get(ray_tune.TIME_ATTR, 0)}"


def best_config_yaml(spec: dict, best: TrialInfo, row: dict) -> str:
    space = ray_tune.search_space(spec)
    cfg = apply_values(from_dict(spec["base_config"]), space.values(best.params))
    cfg = replace(cfg, run_name=f"{spec['name']}-best")
    searched = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in space.values(best.params).items())
    head = [
        f"# Best trial of search {spec['name']}: {best.path.name}",
        f"# validation AUC (EMA) {row['best_auc_ema']:.4f}, raw {row['best_auc']:.4f}, Stage {row['final_stage']}",
        f"# searched: {searched}",
        "# Train it: python -m jobs.pipeline --config <this file>",
    ]
    if spec["stages"] == [2]:
        head.append(f"# (the search fine-tuned Stage II from {spec['init']}; the pipeline trains Stage I too)")
    return "\n".join(head) + "\n" + to_yaml(cfg)


def local_evaluator(cfg: Config, checkpoint: Path, out_dir: Path) -> None:
    """Score the test splits in this process (no Ray): the engine on this machine's CPU or GPU."""
    from trueface.evaluation import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, discover_layout(cfg.data.root), out_dir,
                        test_domains=tuple(cfg.data.test_domains), threshold_from="valid")


def ray_evaluator(cfg: Config, checkpoint: Path, out_dir: Path) -> None:
    """Score the test splits on one Ray Train worker (a GPU one where the cluster has GPUs)."""
    from jobs import ray_train

    ray_train.evaluate(cfg, "evaluate", checkpoint, cfg.data.root, out_dir,
                       test_domains=cfg.data.test_domains, threshold_from="valid")


def aggregate(exp_dir: Path, out_dir: Path | None = None, evaluate: Evaluator | None = local_evaluator) -> Path:
    """Write the search report of ``exp_dir`` into ``out_dir`` (default: the search's results
    folder) and return that folder. ``evaluate=None`` leaves the test table out."""
    exp_dir = Path(exp_dir).absolute()
    spec_path = exp_dir / ray_tune.SPEC_FILE
    if not spec_path.is_file():
        raise SystemExit(f"error: {exp_dir} is not a TrueFace search (no {ray_tune.SPEC_FILE}); "
                         f"pass <storage>/<name>, e.g. runs/tune/demo-20261127-101500")
    spec = json.loads(spec_path.read_text())
    out_dir = Path(out_dir or spec["results_dir"]).absolute()
    infos = {info.path.name: info for info in load_trials(exp_dir)}
    if not infos:
        raise SystemExit(f"error: search {spec['name']} has no trials yet")
    rows = rank_trials([trial_row(info, spec) for info in infos.values()])
    best_row = rows[0]
    best = infos[best_row["trial"]]
    test_md = None
    if evaluate is not None and best_row["checkpoint"]:
        test_md = _best_trial_test(spec, best, Path(best_row["checkpoint"]), out_dir / TEST_DIR, evaluate)
    space = ray_tune.search_space(spec)
    header = {
        "search": spec["name"], "trials": f"{len(rows)} of {spec['num_samples']}", "space": spec["space_source"],
        "stages trained": ", ".join(map(str, spec["stages"])) + (f" (Stage II from {spec['init']})" if spec["init"] else ""),
        "ranked by": "best validation AUC of the EMA weights in the trial's last stage",
        "best trial": f"{best_row['trial']} ({best_row['best_auc_ema']:.4f})",
        "trial folders": str(exp_dir), "tensorboard": f"tensorboard --logdir {exp_dir}",
        "command": spec.get("command", ""),
    }
    params = [(p.key, p.form in ("loguniform", "decay")) for p in space.params]
    write_search_report(out_dir, rows, params, best_config_yaml(spec, best, best_row), header, test_md)
    return out_dir


def _best_trial_test(spec: dict, best: TrialInfo, checkpoint: Path, out_dir: Path, evaluate: Evaluator) -> str:
    """The best trial's test table (evaluated once per best checkpoint, then read back)."""
    marker = out_dir / "evaluated.json"
    stamp = {"trial": best.path.name, "checkpoint": str(checkpoint), "mtime": checkpoint.stat().st_mtime}
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp and (out_dir / "summary.md").is_file()):
        print(f"scoring the best trial ({best.path.name}) on the test splits ...", flush=True)
        evaluate(ray_tune.trial_config(spec, best.params, best.path), checkpoint, out_dir)
        atomic_write_text(marker, json.dumps(stamp))
    return "```\n" + metrics_table(out_dir) + "\n```\n\nFull report: [test/summary.md](test/summary.md)"


def print_summary(out_dir: Path, exp_dir: Path) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(out_dir / "trials.parquet").to_pylist()
    spec = json.loads((exp_dir / ray_tune.SPEC_FILE).read_text())
    keys = ray_tune.search_space(spec).keys
    print("\n" + format_trials(rows, keys))
    if (out_dir / TEST_DIR / "metrics.parquet").is_file():
        print(f"\nbest trial {rows[0]['trial']} on the test splits:\n" + metrics_table(out_dir / TEST_DIR))
    print(f"\nreport:      {out_dir}/summary.md (+ trials.csv, trials.parquet, params.png, test/)")
    print(f"best config: python -m jobs.pipeline --config {out_dir}/best_config.yaml")
    print(f"tensorboard: tensorboard --logdir {exp_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.aggregate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path, help="the search's folder, <storage>/<name> (e.g. runs/tune/demo-...)")
    parser.add_argument("--out", type=Path, help="report folder (default: results/<name>)")
    parser.add_argument("--no-test", action="store_true", help="leave out the best trial's test table")
    args = parser.parse_args(argv)
    out = aggregate(args.experiment, args.out, evaluate=None if args.no_test else local_evaluator)
    print_summary(out, args.experiment.absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
