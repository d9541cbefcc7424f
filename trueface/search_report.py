"""The report of a hyperparameter search: one row per trial, ranked, as tables and a plot.

Usage::

    rows = rank_trials(rows)       # best first
    print(format_trials(rows, param_keys))
    write_search_report(Path("results/demo-..."), rows, params, best_config_yaml, header, test_md,
                        importances=param_importances(rows, space))

A row is a flat mapping: ``trial``, one column per searched config key, ``objective`` (the
search's final stage's best selection AUC of the EMA weights on validation; NaN for a trial that
never reached that stage), ``best_auc_ema`` and ``best_auc`` (pooled validation AUC, EMA and raw
weights, of the trial's last stage), ``final_stage`` (the last stage it reported), ``epochs``,
``outcome``, ``wall_min``, ``checkpoint``. Nothing here knows about Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
import pyarrow as pa
import pyarrow.parquet as pq

from trueface.atomic import atomic_write_bytes, atomic_write_text
from trueface.config.search_space import SearchSpace
from trueface.results import csv_text, figure_png, markdown_table, parquet_bytes

SCORE = "objective"
TEST_DIR = "test"  # in the report folder: the best trial's test report (jobs.aggregate)
TESTED_FILE = "evaluated.json"  # in TEST_DIR: the trial and checkpoint it scored
MIN_IMPORTANCE_TRIALS = 3  # fANOVA's forest needs a few points to split on
OUTCOME_COLOURS = {"completed": "tab:green", "early-stopped": "tab:olive", "stopped by ASHA": "tab:orange",
                   "error": "tab:red", "unfinished": "tab:grey"}


def rank_trials(rows: list[dict]) -> list[dict]:
    """Best first by the objective (NaN last), trials that got further first among equals, and
    trials that failed after every other: Optuna was told they failed, and the best config must
    not be one that diverged or crashed, however well it scored before.

    Only the final stage reports an objective, so a ``--stage both`` trial that ended in Stage I
    has none and ranks below every trial that was scored.
    """
    def key(row: dict) -> tuple:
        score = row.get(SCORE)
        valid = score is not None and not math.isnan(score)
        return (row.get("outcome") == "error", -int(row.get("final_stage") or 0), not valid,
                -(score if valid else 0.0), row["trial"])

    return [{**row, "rank": i + 1} for i, row in enumerate(sorted(rows, key=key))]


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _columns(param_keys: list[str], with_checkpoint: bool) -> list[str]:
    cols = ["rank", "trial", *param_keys, "objective", "best_auc_ema", "best_auc", "final_stage", "epochs", "outcome",
            "wall_min"]
    return cols + (["checkpoint"] if with_checkpoint else [])


def format_trials(rows: list[dict], param_keys: list[str]) -> str:
    """Aligned console table of the ranked trials (numbers right-aligned). A trial is shown by
    its id alone: its folder name repeats the values the next columns show."""
    cols = _columns(param_keys, with_checkpoint=False)
    cells = [[_cell(r["trial"].split("_", 1)[0] if c == "trial" else r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    text_cols = {"trial", "outcome"}

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if c in text_cols else v.rjust(w) for v, w, c in zip(values, widths, cols)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(c) for c in cells])


def params_png(rows: list[dict], params: list[tuple[str, bool]]) -> bytes:
    """The objective against each searched parameter, one panel each, coloured by outcome.

    ``params`` are ``(key, log_x)``; a decay parameter is drawn against 1 - value on a log axis.
    """
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.6), squeeze=False, layout="constrained")
    for ax, (key, log_x) in zip(axes[0], params):
        for outcome, colour in OUTCOME_COLOURS.items():
            pts = [(r[key], r[SCORE]) for r in rows if r.get("outcome", "").startswith(outcome)
                   and r.get(SCORE) is not None and not math.isnan(r[SCORE]) and r.get(key) is not None]
            if not pts:
                continue
            xs = [_plot_x(key, x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], color=colour, label=outcome, s=28, alpha=0.85)
        if log_x:
            ax.set_xscale("log")
            # 1-2-5 ticks in plain numbers: matplotlib's labelled minor ticks collide within a decade.
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=f"1 - {key}" if key.endswith("ema_decay") else key, ylabel="objective (validation AUC, EMA)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize="small")
    fig.suptitle("Search: the objective against each parameter")
    return figure_png(fig)


@dataclass(frozen=True)
class Importances:
    """Optuna's parameter importances by config key (largest first), or none and ``note`` says why."""

    values: dict[str, float] = field(default_factory=dict)
    trials: int = 0
    note: str = ""


def param_importances(rows: list[dict], space: SearchSpace, seed: int = 0) -> Importances:
    """fANOVA importances (``optuna.importance.get_param_importances``) of the searched keys for
    the objective, on a study rebuilt from the rows that have one (a trial ASHA stopped counts with
    the objective it had then), with each key's own distribution. Too few trials, or one
    objective for all, give no importances and a note that says so."""
    import optuna

    scored = [r for r in rows if _finite(r.get(SCORE)) and all(r.get(p.key) is not None for p in space.params)]
    if len(scored) < MIN_IMPORTANCE_TRIALS:
        return Importances(trials=len(scored), note=f"{len(scored)} trial(s) have an objective; parameter importances "
                                                    f"need at least {MIN_IMPORTANCE_TRIALS}")
    if len({float(r[SCORE]) for r in scored}) < 2:
        return Importances(trials=len(scored), note=f"all {len(scored)} trials have the same objective "
                                                    f"({float(scored[0][SCORE]):.4g}): no parameter explains any of it")
    dists = {p.name: p.distribution() for p in space.params}
    trials = [optuna.trial.create_trial(params={p.name: _sampled(p, dists[p.name], r[p.key]) for p in space.params},
                                        distributions=dists, value=float(r[SCORE])) for r in scored]
    study = _quiet_study()
    study.add_trials(trials)
    by_name = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed))
    keys = {p.name: p.key for p in space.params}
    return Importances({keys[n]: float(v) for n, v in by_name.items()}, len(scored))


def _quiet_study():
    """An in-memory study for the importances, created without Optuna's "A new study created in
    memory with name: no-name-..." on stderr: printed under a search's final report, it read as a
    second search starting. Optuna's verbosity is put back as it was."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(direction="maximize")
    finally:
        optuna.logging.set_verbosity(verbosity)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sampled(param, dist, value):
    """The value Optuna sampled for a row's config value (clamped: 1 - (1 - x) may leave the range by an ulp)."""
    if param.form == "choice":
        return value
    if param.form == "int":
        return int(value)
    return min(max(float(param.to_sampled(value)), dist.low), dist.high)


def importances_png(imp: Importances) -> bytes:
    """A horizontal bar per searched key, the most important on top."""
    keys = list(imp.values)[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(keys) + 1.4), layout="constrained")
    ax.barh(keys, [imp.values[k] for k in keys], color="tab:blue")
    ax.set(xlabel="importance (fANOVA share of the objective's variance)", xlim=(0, 1))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Parameter importances over {imp.trials} trials")
    return figure_png(fig)


def _plot_x(key: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return 1 - value if key.endswith("ema_decay") else value


def write_search_report(out_dir: Path, rows: list[dict], params: list[tuple[str, bool]], best_config_yaml: str,
                        header: dict[str, str], test_markdown: str | None,
                        importances: Importances | None = None) -> dict[str, Path]:
    """``trials.{csv,parquet}``, ``params.png``, ``importances.png`` (where ``importances`` has
    values), ``best_config.yaml`` and, last, ``summary.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in params]
    cols = _columns(keys, with_checkpoint=True)
    table = [{c: r.get(c) for c in cols} for r in rows]
    written = {
        "trials.csv": atomic_write_text(out_dir / "trials.csv", csv_text(table)),
        "trials.parquet": atomic_write_bytes(out_dir / "trials.parquet", parquet_bytes(pa.Table.from_pylist(table))),
        "best_config.yaml": atomic_write_text(out_dir / "best_config.yaml", best_config_yaml),
        "params.png": atomic_write_bytes(out_dir / "params.png", params_png(rows, params)),
    }
    md = ["# TrueFace search report", ""]
    md += [f"- **{k}**: {v}" for k, v in header.items()]
    md += ["", "## Trials, best first", "", markdown_table(cols, [[_cell(r.get(c)) for c in cols] for r in table]),
           "", "![the objective against each parameter](params.png)", ""]
    if importances is not None:
        md += ["## Parameter importances", ""]
        if importances.values:
            written["importances.png"] = atomic_write_bytes(out_dir / "importances.png", importances_png(importances))
            md += [f"fANOVA (Optuna) over the {importances.trials} trials with an objective: the share of its variance "
                   "each parameter explains. Rough with few trials.", "",
                   markdown_table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.values.items()]),
                   "", "![parameter importances](importances.png)", ""]
        else:
            (out_dir / "importances.png").unlink(missing_ok=True)  # an earlier report's, of other trials
            md += [f"None: {importances.note}.", ""]
    if test_markdown:
        md += ["## Best trial on the test splits", "", test_markdown, ""]
    md += ["## Best config", "", "Train it with the full pipeline:", "",
           f"    python -m jobs.pipeline --config {out_dir / 'best_config.yaml'}", ""]
    written["summary.md"] = atomic_write_text(out_dir / "summary.md", "\n".join(md))
    return written


def stale_test_report(report_dir: Path) -> str:
    """Why ``report_dir``'s test report is not its best trial's ('' when it is, or there is none).
    An aggregation that scored no trial (--no-test, or the best trial's checkpoint gone) keeps the
    test report of the trial that was best before, which must not be shown as the new best's."""
    import json

    marker, trials = report_dir / TEST_DIR / TESTED_FILE, report_dir / "trials.parquet"
    if not (marker.is_file() and trials.is_file()):
        return ""
    tested = json.loads(marker.read_text()).get("trial")
    names = pq.read_table(trials, columns=["trial"]).column("trial").to_pylist()
    best = names[0] if names else None
    if tested == best:
        return ""
    return f"its {TEST_DIR}/ holds the test scores of trial {tested}, which was best when it was scored; the best trial is now {best}"
