"""The report of a hyperparameter search: one row per trial, ranked, as tables and a plot.

Usage::

    rows = rank_trials(rows)       # best first
    print(format_trials(rows, param_keys))
    write_search_report(Path("results/demo-..."), rows, param_keys, best_config_yaml, header, test_md)

A row is a flat mapping: ``trial``, one column per searched config key, ``best_auc_ema``,
``best_auc`` (raw weights), ``final_stage`` (the stage whose validation scored it),
``epochs``, ``outcome``, ``wall_min``, ``checkpoint``. Nothing here knows about Ray.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
import pyarrow as pa

from trueface.atomic import atomic_write_bytes, atomic_write_text
from trueface.results import csv_text, figure_png, markdown_table, parquet_bytes

SCORE = "best_auc_ema"
OUTCOME_COLOURS = {"completed": "tab:green", "early-stopped": "tab:olive", "stopped by ASHA": "tab:orange",
                   "error": "tab:red", "unfinished": "tab:grey"}


def rank_trials(rows: list[dict]) -> list[dict]:
    """Best first: trials that reached the last stage, then by best EMA validation AUC (NaN last).

    A ``--stage both`` trial stopped during Stage I was scored on Stage I's validation set,
    which is not comparable with Stage II's, so it ranks below every trial that got further.
    """
    def key(row: dict) -> tuple:
        score = row.get(SCORE)
        valid = score is not None and not math.isnan(score)
        return (-int(row.get("final_stage") or 0), not valid, -(score if valid else 0.0), row["trial"])

    return [{**row, "rank": i + 1} for i, row in enumerate(sorted(rows, key=key))]


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _columns(param_keys: list[str], with_checkpoint: bool) -> list[str]:
    cols = ["rank", "trial", *param_keys, "best_auc_ema", "best_auc", "final_stage", "epochs", "outcome", "wall_min"]
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
    """Best EMA validation AUC against each searched parameter, one panel each, coloured by outcome.

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
        ax.set(xlabel=f"1 - {key}" if key.endswith("ema_decay") else key, ylabel="best validation AUC (EMA)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize="small")
    fig.suptitle("Search: validation AUC against each parameter")
    return figure_png(fig)


def _plot_x(key: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return 1 - value if key.endswith("ema_decay") else value


def write_search_report(out_dir: Path, rows: list[dict], params: list[tuple[str, bool]], best_config_yaml: str,
                        header: dict[str, str], test_markdown: str | None) -> dict[str, Path]:
    """``trials.{csv,parquet}``, ``params.png``, ``best_config.yaml`` and, last, ``summary.md``."""
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
           "", "![validation AUC against each parameter](params.png)", ""]
    if test_markdown:
        md += ["## Best trial on the test splits", "", test_markdown, ""]
    md += ["## Best config", "", "Train it with the full pipeline:", "",
           f"    python -m jobs.pipeline --config {out_dir / 'best_config.yaml'}", ""]
    written["summary.md"] = atomic_write_text(out_dir / "summary.md", "\n".join(md))
    return written
