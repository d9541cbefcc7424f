"""Cross-domain evaluation tables, plots and the on-disk report.

Usage::

    from trueface.results import Predictions, evaluation_rows, format_table, write_report
    rows = evaluation_rows({"raw": raw_preds, "ema": ema_preds}, thresholds, "youden", roles)
    rows = evaluation_rows(preds, pooled, "youden", roles, per_domain={"ema": {"dalle": 0.31}, ...})
    rows = evaluation_rows(preds, pooled, "youden", roles, calibration=chosen.temperatures)  # + calibrated ECE/Brier
    print(format_table(rows))
    write_report(Path("results/my_run"), rows, {"raw": raw_preds, "ema": ema_preds}, cfg_yaml, header,
                 calibration=chosen.temperatures)   # + reliability_<weights>.png before/after

Every output file is written atomically (temporary file in the same folder, then
``os.replace``), so an interrupted run never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

# Reports are written on headless workers; Agg must be chosen before pyplot is imported.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from trueface.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402
from trueface.calibration import UNCALIBRATED, Temperatures  # noqa: E402
from trueface.metrics import binary_metrics, brier_score, expected_calibration_error, reliability_bins  # noqa: E402
from trueface.metrics import roc_auc, roc_curve  # noqa: E402

__all__ = [
    "COMBINED",
    "COMBINED_ROLE",
    "Predictions",
    "atomic_write_bytes",
    "calibrated",
    "atomic_write_text",
    "evaluation_rows",
    "format_table",
    "write_report",
]

#: Domain name of the rows that pool all test domains.
COMBINED = "combined"
#: Role of the :data:`COMBINED` rows.
COMBINED_ROLE = "all test domains"

# Weights names become file names (roc_<weights>.png); keep them path-safe.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Columns of the console table and their float format.
_TABLE_COLUMNS = ("weights", "domain", "role", "n", "auc", "accuracy", "precision", "recall", "f1", "ece", "threshold",
                  "threshold_source")
# Added after "ece" when the rows are calibrated: the calibrated ECE and the temperature that gave it.
_CALIBRATION_COLUMNS = ("ece_calibrated", "temperature")
_FLOAT_DECIMALS = {"auc": 4, "accuracy": 4, "precision": 4, "recall": 4, "f1": 4, "ece": 4, "threshold": 4,
                   "temperature": 3}


# --------------------------------------------------------------------------- predictions


@dataclass
class Predictions:
    """Per-image scores of one set of weights on one split."""

    paths: list[str]
    domains: list[str]
    labels: np.ndarray  # int 0/1
    scores: np.ndarray  # float P(fake)

    def __post_init__(self) -> None:
        """Normalise types and check that all four columns have the same length."""
        self.paths = [str(p) for p in self.paths]
        self.domains = [str(d) for d in self.domains]
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        lengths = {len(self.paths), len(self.domains), len(self.labels), len(self.scores)}
        if len(lengths) != 1:
            raise ValueError(
                "Predictions columns differ in length: "
                f"paths={len(self.paths)}, domains={len(self.domains)}, "
                f"labels={len(self.labels)}, scores={len(self.scores)}"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def domain_names(self) -> list[str]:
        """Distinct domains in order of first appearance."""
        return list(dict.fromkeys(self.domains))

    def subset(self, domain: str) -> "Predictions":
        """The images of one domain (``ValueError`` if the domain has none)."""
        mask = np.array([d == domain for d in self.domains], dtype=bool)
        if not mask.any():
            raise ValueError(f"no predictions for domain {domain!r}; domains present: {self.domain_names()}")
        idx = np.flatnonzero(mask)
        return Predictions(
            paths=[self.paths[i] for i in idx],
            domains=[self.domains[i] for i in idx],
            labels=self.labels[idx],
            scores=self.scores[idx],
        )

    def to_arrow(self, weights: str) -> pa.Table:
        """Columns path, domain, label, score, weights (one row per image)."""
        return pa.table(
            {
                "path": pa.array(self.paths, type=pa.string()),
                "domain": pa.array(self.domains, type=pa.string()),
                "label": pa.array(self.labels, type=pa.int64()),
                "score": pa.array(self.scores, type=pa.float64()),
                "weights": pa.array([weights] * len(self), type=pa.string()),
            }
        )


# --------------------------------------------------------------------------- rows


def _check_domains(test: dict[str, Predictions], domain_roles: dict[str, str]) -> None:
    """Fail before computing anything if a domain has no role or clashes with COMBINED."""
    for weights, preds in test.items():
        names = preds.domain_names()
        if COMBINED in names:
            raise ValueError(f"domain name {COMBINED!r} is reserved for the pooled rows (weights {weights!r})")
        missing = [d for d in names if d not in domain_roles]
        if missing:
            raise ValueError(f"domain_roles has no role for domain(s) {missing} (weights {weights!r})")


#: ``threshold_source`` of the rows, by scope and whether the domain has a threshold of its own.
POOLED_SOURCE = "pooled validation"
FALLBACK_SOURCE = "pooled validation (no validation split of its own)"
PER_IMAGE_SOURCE = "each image at its own domain's threshold"

# Metrics that follow from the decisions alone; the rest (auc, ece, counts) from the scores.
_DECISION_KEYS = ("accuracy", "precision", "recall", "f1", "tn", "fp", "fn", "tp")


def _per_image_metrics(preds: Predictions, thresholds: np.ndarray) -> dict:
    """binary_metrics when each image has its own threshold: the decisions (score >= its
    threshold) scored as 0/1 predictions at 0.5, AUC and ECE from the scores; threshold NaN."""
    decided = (preds.scores >= thresholds).astype(np.float64)
    on_scores = binary_metrics(preds.labels, preds.scores, 0.5)
    on_decisions = binary_metrics(preds.labels, decided, 0.5)
    return {**on_scores, **{k: on_decisions[k] for k in _DECISION_KEYS}, "threshold": math.nan}


#: ``temperature_source`` of the per_domain scope's combined row.
PER_IMAGE_TEMPERATURE = "each image at its own domain's temperature"


def calibrated(preds: Predictions, weights: str, calibration: Temperatures) -> Predictions:
    """``preds`` with each score at its domain's temperature (``calibration`` of ``weights``)."""
    scores = calibration.calibrate(weights, preds.scores, preds.domains)
    return Predictions(preds.paths, preds.domains, preds.labels, scores)


def _calibration_row(weights: str, domain: str | None, after: Predictions, calibration: Temperatures,
                     per_domain_scope: bool) -> dict:
    """The calibration columns of ``domain``'s row (None: combined); ``after``: the calibrated
    predictions. The temperature is sourced as the row's threshold is."""
    if domain is None and per_domain_scope and calibration.fitted:
        t, source = math.nan, PER_IMAGE_TEMPERATURE
    else:
        t, source = calibration.temperature(weights, domain if per_domain_scope else None)
        if domain is not None and per_domain_scope and source == POOLED_SOURCE:
            source = FALLBACK_SOURCE
    part = after if domain is None else after.subset(domain)
    return {"ece_calibrated": expected_calibration_error(part.labels, part.scores),
            "brier_calibrated": brier_score(part.labels, part.scores), "temperature": t, "temperature_source": source}


def _head(weights: str, domain: str, role: str, policy: str, scope: str, source: str, threshold_file: str) -> dict:
    return {"weights": weights, "domain": domain, "role": role, "threshold_policy": policy,
            "threshold_scope": scope, "threshold_source": source, "threshold_file": threshold_file}


def evaluation_rows(
    test: dict[str, Predictions],
    thresholds: dict[str, float],
    policy: str,
    domain_roles: dict[str, str],
    *,
    per_domain: dict[str, dict[str, float]] | None = None,
    threshold_file: str = "",
    calibration: Temperatures | None = None,
) -> list[dict]:
    """One row per (weights, domain) plus one per weights for all domains together (domain 'combined').

    ``test`` is keyed by weights name (e.g. 'raw', 'ema'); ``thresholds`` by the same names: the
    pooled thresholds (chosen on validation data by the caller); ``domain_roles`` maps a domain to
    an honest description of its role, e.g. 'trained (Stage I+II)', 'trained (Stage II)',
    'held out (never trained on)'; 'combined' gets 'all test domains'.

    ``per_domain`` (weights -> domain -> threshold) selects the per_domain scope: a domain row
    uses its domain's own threshold, or the pooled one where it has none (``threshold_source``
    says which), and the combined row labels each image at its own domain's threshold (its
    ``threshold`` is NaN: there is no single one). Without it every row uses the pooled one.

    ``calibration`` (fitted temperatures, or Temperatures.identity: uncalibrated) adds to every row
    ``temperature``, ``temperature_source``, ``ece_calibrated`` and ``brier_calibrated``: ECE and
    Brier of the scores after temperature scaling, each domain at its own temperature where it has
    one (per_domain scope), as for thresholds. AUC, thresholds and decisions stay those of the raw
    scores: temperature scaling is monotone and changes none of them (see trueface.calibration).

    Each row: weights, domain, role, threshold_policy, threshold_scope, threshold_source,
    threshold_file, then the binary_metrics keys, then the calibration columns if asked for.
    Domains appear in order of first appearance.
    """
    missing = [w for w in test if w not in thresholds]
    if missing:
        raise ValueError(f"no threshold for weights {missing}; thresholds given for {list(thresholds)}")
    _check_domains(test, domain_roles)
    scope = "pooled" if per_domain is None else "per_domain"
    rows = []
    for weights, preds in test.items():
        pooled, own = thresholds[weights], (per_domain or {}).get(weights, {})
        for domain in preds.domain_names():
            if per_domain is None:
                t, source = pooled, POOLED_SOURCE
            else:
                t, source = (own[domain], f"{domain} validation") if domain in own else (pooled, FALLBACK_SOURCE)
            part = preds.subset(domain)
            head = _head(weights, domain, domain_roles[domain], policy, scope, source, threshold_file)
            rows.append({**head, **binary_metrics(part.labels, part.scores, t)})
        if per_domain is None:
            head, metrics = (_head(weights, COMBINED, COMBINED_ROLE, policy, scope, POOLED_SOURCE, threshold_file),
                             binary_metrics(preds.labels, preds.scores, pooled))
        else:
            per_image = np.array([own.get(d, pooled) for d in preds.domains], dtype=np.float64)
            head, metrics = (_head(weights, COMBINED, COMBINED_ROLE, policy, scope, PER_IMAGE_SOURCE, threshold_file),
                             _per_image_metrics(preds, per_image))
        rows.append({**head, **metrics})
    return rows if calibration is None else _with_calibration(rows, test, calibration, per_domain is not None)


def _with_calibration(rows: list[dict], test: dict[str, Predictions], calibration: Temperatures,
                      per_domain_scope: bool) -> list[dict]:
    """``rows`` plus their calibration columns; the pooled scope uses the pooled temperatures only."""
    if not per_domain_scope:
        calibration = replace(calibration, per_domain={})
    after = {w: calibrated(preds, w, calibration) for w, preds in test.items()}
    return [{**r, **_calibration_row(r["weights"], None if r["domain"] == COMBINED else r["domain"],
                                     after[r["weights"]], calibration, per_domain_scope)} for r in rows]


# --------------------------------------------------------------------------- formatting


def _fmt(key: str, value: object) -> str:
    """Cell text: floats rounded per column, NaN as 'nan', everything else via str."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{_FLOAT_DECIMALS.get(key, 4)}f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Aligned plain-text table for the console (text left-aligned, numbers right-aligned)."""
    # train_overlap: only in tables of test roots compared with the checkpoint's training data
    columns = _TABLE_COLUMNS + (("train_overlap",) if any("train_overlap" in r for r in rows) else ())
    if any("ece_calibrated" in r for r in rows):
        at = columns.index("ece") + 1
        columns = columns[:at] + _CALIBRATION_COLUMNS + columns[at:]
    cells = [[_fmt(k, row.get(k, "")) for k in columns] for row in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(columns)]
    numeric = [k not in ("weights", "domain", "role", "threshold_source") for k in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    def cells(values: list[str]) -> str:
        # A literal '|' (e.g. in a role description) would split the cell.
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    lines = [cells(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [cells(r) for r in body]
    return "\n".join(lines)


def _markdown_metrics(rows: list[dict]) -> str:
    """All rows with every column but threshold_file (the header names it), floats rounded to 4 decimals."""
    keys = [k for k in rows[0] if k != "threshold_file"] if rows else []
    return markdown_table(keys, [[_fmt(k, r[k]) for k in keys] for r in rows])


def _markdown_confusion(row: dict) -> str:
    """Confusion matrix of one row: rows = true class, columns = predicted class."""
    body = [["**real**", str(row["tn"]), str(row["fp"])], ["**fake**", str(row["fn"]), str(row["tp"])]]
    return markdown_table(["true \\ predicted", "real", "fake"], body)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise ``table`` to Parquet in memory (so it can be written atomically)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV with a header; floats keep full precision (repr)."""
    buf = io.StringIO()
    keys = list(rows[0]) if rows else []
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def figure_png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes and close it (figures are otherwise kept by pyplot)."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- plots


def _roc_png(weights: str, preds: Predictions) -> bytes:
    """ROC curve per domain plus combined, AUC in the legend, chance diagonal."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    parts = [(d, preds.subset(d)) for d in preds.domain_names()] + [(COMBINED, preds)]
    for name, part in parts:
        if len(np.unique(part.labels)) < 2:
            # No curve exists with one class; keep the domain visible in the legend anyway.
            ax.plot([], [], label=f"{name} (one class, AUC undefined)")
            continue
        fpr, tpr, _ = roc_curve(part.labels, part.scores)
        auc = roc_auc(part.labels, part.scores)
        style = {"color": "black", "linewidth": 2.0} if name == COMBINED else {}
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.4f})", **style)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (real flagged fake)",
           ylabel="true positive rate (fake detected)", title=f"ROC, weights '{weights}'")
    ax.legend(loc="lower right", fontsize="small")
    return figure_png(fig)


def _confusion_png(weights: str, rows: list[dict]) -> bytes:
    """A row of 2x2 confusion matrices, one per domain + combined, counts annotated."""
    # Constrained layout keeps each panel's y label clear of its neighbour and the suptitle.
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3.8), squeeze=False, layout="constrained")
    for ax, row in zip(axes[0], rows):
        matrix = np.array([[row["tn"], row["fp"]], [row["fn"], row["tp"]]])
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
        for (i, j), count in np.ndenumerate(matrix):
            # White text on the dark cells keeps the counts readable.
            dark = count > matrix.max() / 2
            ax.text(j, i, str(count), ha="center", va="center", color="white" if dark else "black")
        ax.set_xticks([0, 1], labels=["real", "fake"])
        ax.set_yticks([0, 1], labels=["real", "fake"])
        # The per_domain scope's combined row has no single threshold (NaN): each image used its domain's.
        value = row["threshold"]
        title = f"{row['domain']}\n" + ("per-domain thresholds" if math.isnan(value) else f"threshold {value:.4f}")
        ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.suptitle(f"Confusion matrices, weights '{weights}'")
    return figure_png(fig)


def _temperature_text(row: dict) -> str:
    """What a reliability panel's calibrated curve used, from its row's calibration columns."""
    t = row.get("temperature")
    if t is None or row.get("temperature_source") == UNCALIBRATED:
        return UNCALIBRATED
    return "per-domain temperatures" if math.isnan(t) else f"temperature {t:.3g}"


def _reliability_panel(top, bottom, parts: list[tuple[str, Predictions, str]]) -> None:
    """One domain's reliability curves (``top``) and images per bin (``bottom``), one series per part."""
    width = 0.8 / 15 / len(parts)  # the bars of a bin side by side, in 80% of its width
    tallest = 1
    for i, (label, part, color) in enumerate(parts):
        bins = reliability_bins(part.labels, part.scores)
        full = bins.count > 0
        top.plot(bins.confidence[full], bins.accuracy[full], marker="o", color=color,
                 label=f"{label} (ECE {bins.ece:.3f})")
        x = (bins.edges[:-1] + bins.edges[1:]) / 2 + (i - (len(parts) - 1) / 2) * width
        bottom.bar(x[full], bins.count[full], width=width, color=color)
        for xi, count in zip(x[full], bins.count[full]):
            bottom.text(xi, count, str(count), ha="center", va="bottom", fontsize=6, rotation=90)
        tallest = max(tallest, int(bins.count.max()))
    top.plot([0.5, 1.0], [0.5, 1.0], linestyle="--", color="grey", linewidth=1, label="calibrated")
    top.legend(loc="best", fontsize="x-small")
    bottom.set_ylim(0, tallest * 1.45)  # room for the counts above the bars


def _part(preds: Predictions, domain: str) -> Predictions:
    """The images of ``domain``, or all of them for COMBINED."""
    return preds if domain == COMBINED else preds.subset(domain)


def _reliability_png(weights: str, preds: Predictions, after: Predictions | None, rows: list[dict]) -> bytes:
    """Reliability diagrams (the top-label bins of ECE), one column per domain + combined: accuracy
    against confidence before temperature scaling and, when ``after`` is given, after it; below
    each, the images per bin."""
    names = preds.domain_names() + [COMBINED]
    by_domain = {r["domain"]: r for r in rows}
    # A fixed grid, not constrained layout: it halves the drawing time of a figure made in every report.
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 5.6), squeeze=False, sharex=True,
                             gridspec_kw={"height_ratios": (3, 1.3), "hspace": 0.12, "wspace": 0.25, "top": 0.84})
    for col, name in enumerate(names):
        parts = [("before", _part(preds, name), "tab:red")]
        parts += [("after", _part(after, name), "tab:blue")] if after is not None else []
        _reliability_panel(axes[0, col], axes[1, col], parts)
        axes[0, col].set(xlim=(0.45, 1.0), ylim=(0.0, 1.02), ylabel="accuracy" if col == 0 else None,
                         title=f"{name}\n{_temperature_text(by_domain.get(name, {}))}")
        axes[1, col].set(xlabel="confidence (P of the predicted class)", ylabel="images per bin" if col == 0 else None)
    fig.suptitle(f"Reliability before / after temperature scaling, weights '{weights}'")
    return figure_png(fig)


# --------------------------------------------------------------------------- report


def _summary_markdown(rows: list[dict], header: dict[str, str], pngs: dict[str, list[str]]) -> str:
    """Text of summary.md: header lines, metrics table, confusion matrices, plot links."""
    out = ["# TrueFace evaluation report", ""]
    out += [f"- **{key}**: {value}" for key, value in header.items()]
    out += ["", "## Metrics", "", _markdown_metrics(rows), "", "## Confusion matrices", ""]
    for row in rows:
        out += [f"### {row['weights']} / {row['domain']}: {row['role']}", "", _markdown_confusion(row), ""]
    out += ["## Plots", ""]
    for weights, names in pngs.items():
        out += [f"- {weights}: " + ", ".join(f"[{n}]({n})" for n in names)]
        out += [f"  ![{n}]({n})" for n in names]
    return "\n".join(out) + "\n"


def _check_weights_names(names: list[str]) -> None:
    bad = [n for n in names if not _SAFE_NAME.match(n)]
    if bad:
        raise ValueError(f"weights names {bad} are not safe file names (letters, digits, '_', '.', '-')")


def write_report(
    out_dir: Path,
    rows: list[dict],
    test: dict[str, Predictions],
    config_yaml: str,
    header: dict[str, str],
    *,
    calibration: Temperatures | None = None,
) -> dict[str, Path]:
    """Write the evaluation report into ``out_dir`` (created if missing).

    Files: ``metrics.csv``, ``metrics.parquet`` (same rows), ``predictions.parquet`` (all
    weights' predictions), ``roc_<weights>.png``, ``confusion_<weights>.png``,
    ``reliability_<weights>.png`` (before and, with fitted ``calibration``, after temperature
    scaling), ``config.yaml`` and, written last so its presence marks a complete report,
    ``summary.md``.  Every file is written atomically.  Returns file name -> path.
    """
    out_dir = Path(out_dir)
    _check_weights_names(list(test))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        written[name] = atomic_write_bytes(out_dir / name, data)

    put("metrics.csv", csv_text(rows).encode("utf-8"))
    put("metrics.parquet", parquet_bytes(pa.Table.from_pylist(rows)))
    tables = [preds.to_arrow(w) for w, preds in test.items()]
    if tables:
        put("predictions.parquet", parquet_bytes(pa.concat_tables(tables)))
    put("config.yaml", config_yaml.encode("utf-8"))
    pngs: dict[str, list[str]] = {}
    for weights, preds in test.items():
        roc, conf, rel = f"roc_{weights}.png", f"confusion_{weights}.png", f"reliability_{weights}.png"
        put(roc, _roc_png(weights, preds))
        weights_rows = [r for r in rows if r["weights"] == weights]
        names = [roc]
        if weights_rows:
            put(conf, _confusion_png(weights, weights_rows))
            names.append(conf)
        after = calibrated(preds, weights, calibration) if calibration is not None and calibration.fitted else None
        put(rel, _reliability_png(weights, preds, after, weights_rows))
        pngs[weights] = names + [rel]
    put("summary.md", _summary_markdown(rows, header, pngs).encode("utf-8"))
    return written
