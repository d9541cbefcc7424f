"""The format-shortcut audit: can file metadata alone (format, size, JPEG quality, EXIF, bytes)
tell a domain's real images from its fakes? If it can, a detector can score well by learning the
file format instead of the faces, and its AUC says nothing about faces.

Usage::

    audits = audit(rows)                    # rows: the scan table as a list of dicts
    for a in audits:
        print(a.domain, a.describe())       # "format separates real from fake: metadata AUC 1.00 (...)"
        if a.warning:                       # a.auc > WARN_AUC
            ...
    plot_shortcuts(rows, audits, Path("results/data"))   # one PNG per domain

Per domain (all its splits together), a small gradient-boosted tree model (fixed random_state)
predicts the label from the metadata fields; its AUC is cross-validated (stratified k-fold,
k = min(5, the smaller class count)). Each field is also scored alone: a numeric field by the AUC
of its raw value, direction-free (max(auc, 1 - auc)); ``format`` by the cross-validated AUC of
the one-hot format alone. Rows with an ``error`` are ignored. ``describe()`` does not name the
domain (the caller prints it).
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trueface.atomic import atomic_write_bytes
from trueface.data.scan import JPEG_FORMATS

METADATA_FIELDS = ("format", "width", "height", "jpeg_quality", "exif", "file_size")
#: Above this metadata AUC a domain gets a warning: its labels are readable from the files' metadata.
WARN_AUC = 0.6

_CATEGORICAL = {"format"}
_MAX_FOLDS = 5
_SEED = 0
_CLASS_NAMES = ("real", "fake")
_MAX_BAR_LEVELS = 8


@dataclass
class DomainAudit:
    domain: str
    n_real: int
    n_fake: int
    auc: float  # cross-validated metadata AUC; NaN when it cannot be measured (see reason)
    field_auc: dict[str, float] = field(default_factory=dict)  # each field alone
    separating_field: str = ""  # the field with the highest single-field AUC
    warning: bool = False  # auc > WARN_AUC
    difference: str = ""  # how the classes differ on separating_field, in words
    reason: str = ""  # why auc is NaN
    folds: int = 0
    n_ignored: int = 0  # rows with an error

    def describe(self) -> str:
        """One line: the verdict, the AUC and how the classes differ on the strongest field."""
        if math.isnan(self.auc):
            return f"metadata AUC n/a: {self.reason}"
        if self.warning:
            return f"{self.separating_field} separates real from fake: metadata AUC {self.auc:.2f} ({self.difference})"
        strongest = self.field_auc.get(self.separating_field, math.nan)
        return (f"no metadata shortcut: metadata AUC {self.auc:.2f} (strongest field {self.separating_field}, "
                f"AUC {strongest:.2f}: {self.difference})")


def audit(rows: list[dict]) -> list[DomainAudit]:
    """One DomainAudit per domain in ``rows`` (all splits of a domain together), by domain name."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_domain[str(row.get("domain", ""))].append(row)
    return [audit_domain(by_domain[d]) for d in sorted(by_domain)]


def audit_domain(rows: list[dict]) -> DomainAudit:
    """The metadata audit of one domain's rows; never raises on too little data (auc NaN, reason)."""
    domains = sorted({str(r.get("domain", "")) for r in rows})
    if len(domains) > 1:
        raise ValueError(f"audit_domain: rows of several domains ({', '.join(domains)}); use audit(rows)")
    usable = [r for r in rows if not r.get("error")]
    labels = np.array([int(r["label"]) for r in usable], dtype=int)
    result = DomainAudit(domain=domains[0] if domains else "", n_real=int((labels == 0).sum()),
                         n_fake=int((labels == 1).sum()), auc=math.nan, n_ignored=len(rows) - len(usable))
    bad_labels = sorted(set(labels.tolist()) - {0, 1})
    if bad_labels:
        raise ValueError(f"audit_domain: domain {result.domain!r} has labels {bad_labels}; expected 0 (real) or 1 (fake)")
    smaller = min(result.n_real, result.n_fake)
    if smaller < 2:
        result.reason = f"needs at least 2 images of each class (real {result.n_real}, fake {result.n_fake})"
        return result
    result.folds = min(_MAX_FOLDS, smaller)
    columns = _columns(usable)
    result.auc = _cv_auc(_design(columns, METADATA_FIELDS), labels, result.folds)
    result.field_auc = {f: _field_auc(columns, f, labels, result.folds) for f in METADATA_FIELDS}
    result.separating_field = max(METADATA_FIELDS, key=lambda f: result.field_auc[f])  # first wins a tie
    result.warning = bool(result.auc > WARN_AUC)
    result.difference = _difference(columns, result.separating_field, labels)
    return result


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Each metadata field as an array; JPEG quality is -1 for anything not a JPEG (a phone's MPO,
    the multi-picture JPEG, is one)."""
    formats = np.array([str(r.get("format") or "?") for r in rows], dtype=object)
    quality = np.array([int(r.get("jpeg_quality", -1)) for r in rows], dtype=float)
    quality[~np.isin(formats.astype(str), JPEG_FORMATS)] = -1
    return {
        "format": formats,
        "width": np.array([float(r.get("width", -1)) for r in rows]),
        "height": np.array([float(r.get("height", -1)) for r in rows]),
        "jpeg_quality": quality,
        "exif": np.array([float(bool(r.get("exif", False))) for r in rows]),
        "file_size": np.array([float(r.get("file_size", -1)) for r in rows]),
    }


def _design(columns: dict[str, np.ndarray], fields: tuple[str, ...]) -> np.ndarray:
    parts = []
    for name in fields:
        values = columns[name]
        if name in _CATEGORICAL:
            parts.extend((values == level).astype(float) for level in sorted(set(values)))
        else:
            parts.append(values)
    return np.column_stack(parts)


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: int) -> float:
    """Mean AUC over stratified folds of a small gradient-boosted tree model."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from threadpoolctl import threadpool_limits

    if np.all(x == x[0]):  # no feature varies: nothing to learn, and no model needed to say so
        return 0.5
    aucs = []
    # One OpenMP thread: on a busy machine its spinning threads made a fit 40x slower (8.3 s vs
    # 0.2 s for 20,000 rows), and a handful of features gains nothing from more.
    with threadpool_limits(limits=1, user_api="openmp"):
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=_SEED).split(x, y):
            # Leaves of 20 (the default) would let a tiny domain's trees make no split at all.
            model = HistGradientBoostingClassifier(max_iter=100, min_samples_leaf=min(20, max(1, len(train) // 10)),
                                                   early_stopping=False, random_state=_SEED)
            model.fit(x[train], y[train])
            aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return float(np.mean(aucs))


def _field_auc(columns: dict[str, np.ndarray], name: str, y: np.ndarray, folds: int) -> float:
    if name in _CATEGORICAL:
        return _cv_auc(_design(columns, (name,)), y, folds)
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(y, columns[name]))
    return max(auc, 1.0 - auc)


def _difference(columns: dict[str, np.ndarray], name: str, y: np.ndarray) -> str:
    """How real and fake differ on one field, e.g. "real: JPEG 100%; fake: PNG 100%"."""
    values = columns[name]
    per_class = [values[y == label] for label in (0, 1)]
    if name in _CATEGORICAL:
        return "; ".join(f"{cls}: {_top_shares(v)}" for cls, v in zip(_CLASS_NAMES, per_class))
    if name == "exif":
        return ", ".join(f"{cls} {np.mean(v) * 100:.0f}% with EXIF" for cls, v in zip(_CLASS_NAMES, per_class))
    return ", ".join(f"{cls} median {_fmt(name, float(np.median(v)))}" for cls, v in zip(_CLASS_NAMES, per_class))


def _top_shares(values: np.ndarray, top: int = 2) -> str:
    counts = Counter(values.tolist()).most_common(top)
    return ", ".join(f"{level} {n / len(values) * 100:.0f}%" for level, n in counts)


def _fmt(name: str, value: float) -> str:
    if name == "file_size":
        for unit, size in (("MB", 1e6), ("KB", 1e3)):
            if value >= size:
                return f"{value / size:.3g} {unit}"  # 3 digits: 11.3 KB vs 10.9 KB, not 11 vs 11
        return f"{value:.0f} B"
    if name == "jpeg_quality":
        return f"q{value:.0f}" if value >= 0 else "n/a (-1)"  # not a JPEG, or quality unknown
    return f"{value:.0f} px"


def plot_shortcuts(rows: list[dict], audits: list[DomainAudit], out_dir: Path) -> list[Path]:
    """One PNG per audited domain, ``shortcuts_<domain>.png`` in ``out_dir``: each metadata
    field's distribution by class (share of the class; histograms for numbers, bars for
    categories), titled with the metadata AUC. Written atomically; returns the paths."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to switch (renders with Agg)

    out_dir = Path(out_dir)
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if not row.get("error"):
            by_domain[str(row.get("domain", ""))].append(row)
    written, used = [], set()
    for result in audits:
        usable = by_domain.get(result.domain, [])
        fig = Figure(figsize=(13, 7), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        if usable:
            columns = _columns(usable)
            y = np.array([int(r["label"]) for r in usable])
            for ax, name in zip(axes, METADATA_FIELDS):
                _plot_field(ax, name, columns[name], y, result.field_auc.get(name, math.nan))
        auc = "n/a" if math.isnan(result.auc) else f"{result.auc:.2f}"
        verdict = f"shortcut: {result.separating_field}" if result.warning else (result.reason or "no shortcut")
        fig.suptitle(f"{result.domain}: metadata AUC {auc} ({verdict}); real {result.n_real}, fake {result.n_fake}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        path = out_dir / f"shortcuts_{_unique_slug(result.domain, used)}.png"
        written.append(atomic_write_bytes(path, buffer.getvalue()))
    return written


def _plot_field(ax, name: str, values: np.ndarray, y: np.ndarray, auc: float) -> None:
    colours = ("tab:blue", "tab:red")
    levels = sorted(set(values.tolist()))
    if name in _CATEGORICAL or len(levels) <= _MAX_BAR_LEVELS:  # few values (256 px, q75, EXIF): bars read better
        positions = np.arange(len(levels))
        for k, (cls, colour) in enumerate(zip(_CLASS_NAMES, colours)):
            of_class = values[y == k]
            shares = [np.mean(of_class == level) if len(of_class) else 0.0 for level in levels]
            ax.bar(positions + (k - 0.5) * 0.4, shares, width=0.4, color=colour, label=cls)
        ax.set_xticks(positions, [_level_name(name, v) for v in levels])
    else:
        scale, unit = (1e3, " (KB)") if name == "file_size" else (1.0, "")
        edges = np.histogram_bin_edges(values / scale, bins=min(30, max(1, len(set(values.tolist())))))
        for k, (cls, colour) in enumerate(zip(_CLASS_NAMES, colours)):
            of_class = values[y == k] / scale
            if len(of_class):
                ax.hist(of_class, bins=edges, weights=np.full(len(of_class), 1 / len(of_class)),
                        alpha=0.5, color=colour, label=cls)
        ax.set_xlabel(name + unit)
    ax.set_ylabel("share of class")
    ax.set_title(f"{name} (AUC alone {'n/a' if math.isnan(auc) else f'{auc:.2f}'})")
    ax.legend()


def _level_name(name: str, value) -> str:
    if name == "exif":
        return "EXIF" if value else "no EXIF"
    if name in _CATEGORICAL:
        return str(value)
    return _fmt(name, float(value))


def _unique_slug(domain: str, used: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", domain).strip("._") or "domain"
    candidate, n = slug, 2
    while candidate in used:
        candidate, n = f"{slug}_{n}", n + 1
    used.add(candidate)
    return candidate
