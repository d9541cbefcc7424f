"""The robustness sweep's report: AUC per perturbation, severity and test domain, as tables and a plot.

Usage::

    rows = run_sweep(checkpoint, clean_report, [("jpeg", 30, "/cache/.../jpeg-q30/faces")], out_dir / "robustness")
    print(sweep_table(rows, "ema"))

``run_sweep`` scores the perturbed copies (trueface.robustness.sweep_rows) and, on rank 0, writes into
its folder ``robustness.csv`` and ``robustness.parquet`` (every row: perturbation, severity,
severity_value, weights, domain incl. combined, n, auc, accuracy at the clean thresholds, threshold,
auc_drop = clean AUC - AUC), ``robustness.png`` (AUC against severity, one panel per perturbation kind,
one line per test domain and combined, EMA weights) and, last so its presence marks a complete report,
``robustness.md``. Every file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless workers; before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from trueface.atomic import atomic_write_bytes  # noqa: E402
from trueface.data.layout import discover_layout  # noqa: E402
from trueface.distributed import DistInfo  # noqa: E402
from trueface.evaluation import EvaluationReport  # noqa: E402
from trueface.results import COMBINED, csv_text, figure_png, markdown_table, parquet_bytes  # noqa: E402
from trueface.robustness import KINDS, Perturbation, sweep_rows  # noqa: E402

FOLDER = "robustness"
#: What each kind does, for the report (the module docstring of trueface.robustness says more).
DESCRIPTIONS = {
    "jpeg": "re-encoded as baseline JPEG (4:2:0) at the quality shown; severity 100 - quality",
    "blur": "Gaussian blur (PIL) with the standard deviation shown, in pixels of the stored image; severity sigma",
    "downscale": "each side resized by the factor shown and back (bicubic, antialiased); severity 1 - factor",
    "crop": "a crop keeping the fraction shown of each side at a seeded random offset, resized back (bicubic); "
            "severity 1 - fraction",
}


def run_sweep(checkpoint: Path, clean: EvaluationReport, roots: Sequence[tuple[str, float, str]], out_dir: Path,
              dist_info: DistInfo | None = None) -> list[dict]:
    """Score every perturbed copy (``roots``: kind, value, data root of the copy) at the clean report's
    thresholds; rank 0 writes the report into ``out_dir``. Returns the rows."""
    di = dist_info or DistInfo.current()
    perturbed = {Perturbation(kind, value): discover_layout(root) for kind, value, root in roots}
    rows = sweep_rows(checkpoint, clean, perturbed, di)
    if di.rank == 0:
        header = {"checkpoint": str(checkpoint), "thresholds (chosen on the clean data)": clean.threshold_source,
                  "perturbed copies": ", ".join(sorted({str(Path(r).parent.parent) for _, _, r in roots}))}
        write_sweep_report(Path(out_dir), rows, header)
    return rows


def write_sweep_report(out_dir: Path, rows: list[dict], header: dict[str, str]) -> dict[str, Path]:
    """robustness.csv / .parquet / .png / .md in ``out_dir``; returns file name -> path."""
    files = {
        "robustness.csv": csv_text(rows).encode("utf-8"),
        "robustness.parquet": parquet_bytes(pa.Table.from_pylist(rows)),
        "robustness.png": sweep_png(rows, "ema"),
        "robustness.md": sweep_markdown(rows, header).encode("utf-8"),  # last: marks the report complete
    }
    return {name: atomic_write_bytes(Path(out_dir) / name, data) for name, data in files.items()}


def sweep_markdown(rows: list[dict], header: dict[str, str]) -> str:
    """robustness.md: the header, what each perturbation is, AUC (and its drop) and accuracy per domain."""
    out = ["# TrueFace robustness sweep", ""] + [f"- **{k}**: {v}" for k, v in header.items()]
    out += ["", "## Perturbations", ""] + [f"- **{k}**: {DESCRIPTIONS[k]}" for k in KINDS]
    for weights in ("ema", "raw"):
        out += ["", f"## AUC (drop from clean), {weights} weights", "", markdown_table(*_pivot(rows, weights, "auc"))]
    out += ["", "## Accuracy at the clean thresholds, ema weights", "", markdown_table(*_pivot(rows, "ema", "accuracy"))]
    out += ["", "## AUC against severity (ema weights)", "", "![robustness.png](robustness.png)", "",
            "Every row, raw and ema: [robustness.csv](robustness.csv), robustness.parquet."]
    return "\n".join(out) + "\n"


def sweep_table(rows: list[dict], weights: str = "ema") -> str:
    """The AUC pivot (drop from clean in brackets) as aligned plain text, for the console."""
    header, body = _pivot(rows, weights, "auc")
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [[v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))] for line in [header, *body]]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(line).rstrip() for line in lines)


def _pivot(rows: list[dict], weights: str, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and body: one line per (perturbation, severity), one column per domain, combined last."""
    mine = [r for r in rows if r["weights"] == weights]
    domains = list(dict.fromkeys(r["domain"] for r in mine if r["domain"] != COMBINED)) + [COMBINED]
    cells = {(r["perturbation"], r["severity"], r["domain"]): r for r in mine}
    lines = list(dict.fromkeys((r["perturbation"], r["severity"]) for r in mine))
    body = [[kind, label] + [_cell(cells.get((kind, label, d)), metric) for d in domains] for kind, label in lines]
    return ["perturbation", "severity"] + domains, body


def _cell(row: dict | None, metric: str) -> str:
    if row is None:
        return ""
    value = row[metric]
    if math.isnan(value):
        return "nan"
    if metric != "auc" or row["perturbation"] == "clean":
        return f"{value:.4f}"
    change = round(-row["auc_drop"], 4) + 0.0  # + 0.0: no "-0.0000"
    return f"{value:.4f} ({change:+.4f})"


def sweep_png(rows: list[dict], weights: str = "ema") -> bytes:
    """AUC against severity, one panel per perturbation kind (the clean AUC at severity 0), one line per
    test domain and a thick black one for combined."""
    mine = [r for r in rows if r["weights"] == weights]
    domains = list(dict.fromkeys(r["domain"] for r in mine if r["domain"] != COMBINED)) + [COMBINED]
    kinds = [k for k in KINDS if any(r["perturbation"] == k for r in mine)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 3.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        points = [r for r in mine if r["perturbation"] in ("clean", kind)]
        for domain in domains:
            line = sorted((r["severity_value"], r["auc"]) for r in points if r["domain"] == domain)
            style = {"color": "black", "linewidth": 2.2} if domain == COMBINED else {"linewidth": 1.2}
            ax.plot(*zip(*line), marker="o", markersize=3.5, label=domain, **style)
        ticks = sorted({(r["severity_value"], r["severity"]) for r in points})
        ax.set_xticks([t for t, _ in ticks], labels=[lab for _, lab in ticks], rotation=45, fontsize="small")
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)  # chance
        ax.set(title=kind, xlabel="severity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"ROC-AUC ({weights} weights)")
    axes[0][-1].legend(fontsize="small", loc="lower left")
    fig.suptitle("AUC against perturbation severity")
    return figure_png(fig)


__all__ = ["DESCRIPTIONS", "FOLDER", "run_sweep", "sweep_markdown", "sweep_png", "sweep_table",
           "write_sweep_report"]
