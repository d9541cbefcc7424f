"""The format-shortcut audit: can file metadata alone (format, size, JPEG quality, EXIF, bytes)
tell a domain's real images from its fakes? If it can, a detector can score well by learning the
file format instead of the faces, and its AUC says nothing about faces.

Usage::

    audits = audit(rows)                    # rows: the scan table as a list of dicts
    for a in audits:
        if a.warning:                       # a.auc_low > WARN_AUC: one line per finding
            print(a.domain, a.describe())   # "format separates real from fake in the test split: ..."
    plot_shortcuts(rows, audits, Path("results/data"))   # one PNG per domain

Per domain (all its splits together), a small gradient-boosted tree model (fixed random_state)
predicts the label from the metadata fields; its AUC is cross-validated (stratified k-fold,
k = min(5, the smaller class count)). Each (domain, split) cell with at least ``MIN_CELL_CLASS``
images of each class is also audited alone (``DomainAudit.cells``): pooling hides a shortcut that
only one split has (test fakes PNG, train and valid all JPEG: pooled AUC 0.56, test alone 1.0).
``audit`` lists each domain's pooled audit, then the cells that warn about something the pooled
verdict does not already say, so the audits with ``warning`` set are one finding each.

The warning is on a lower confidence bound, not the AUC itself: at 10-40 images per class a fair
domain's cross-validated AUC passed 0.6 three to four times in 20. ``auc_low`` is the lower end of
a 95% interval from the Hanley-McNeil standard error of an AUC (real and fake counts), inverted
like a Wilson interval: the smallest AUC whose value plus 1.96 standard errors reaches the
measured one, so it stays informative at AUC 1.0, where the plain standard error is 0. Closed
form: no refits, no bootstrap. Two-sided 95% (1.96) rather than one-sided (1.645) because a
domain is judged up to four times (pooled and per split), and a false alarm sends users to
re-encode their data. Measured on a fair mixture (both classes JPEG or PNG, 256 or 512 px, q75 or
q90, some EXIF, 30-60 KB), 20 seeds each at 10/20/30/40 images a class: the AUC passed 0.6 in
6/2/3/5, the bound in 1/0/0/1. False alarms are rarer, not gone: a cross-validated AUC varies more
than one fixed score's (the model adapts to each sample's chance associations). A planted
file-size shift of 1.5 standard deviations (AUC about 0.86) warns at 100 images a class.

Each field is also scored alone, to name the one that separates: by the cross-validated AUC of
a histogram model on that field (the training folds' fake share in each value's bin, smoothed
towards the fold's share; few-valued fields bin by value), on the same folds as the full model.
Unlike the raw value's AUC it sees a field that separates without being monotone (reals at 128
or 512 px, fakes at 256 px: raw AUC 0.5, binned 1.0), and it costs a few array passes, not
another gradient-boosted model per field. Models see at most ``MAX_PER_CLASS`` images of each
class (a seeded sample): the bound is then within about 0.01 of the AUC, and the model fits stop
growing with the data. 140,000 synthetic rows in 3 splits (pooled and 3 cells audited) took 30 s
on a busy 2-core machine, against 22-24 s for the old pooled-only audit of all rows. Rows with an
``error`` are ignored. ``describe()`` does not name the domain (the caller prints it).
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
#: A domain (or split) gets a warning when the lower confidence bound of its metadata AUC is above
#: this: its labels are readable from the files' metadata.
WARN_AUC = 0.6
#: How ``auc_low`` is computed, in words (the report prints it).
BOUND_METHOD = ("the lower end of the AUC's 95% confidence interval, from the Hanley-McNeil standard error for the "
                "real and fake counts, inverted like a Wilson interval")
#: A (domain, split) cell is audited alone when it has at least this many images of each class.
MIN_CELL_CLASS = 10
#: The models see at most this many images of each class (a seeded sample).
MAX_PER_CLASS = 10_000

_CATEGORICAL = {"format"}
_MAX_FOLDS = 5
_SEED = 0
_Z = 1.959963984540054  # the lower end of a two-sided 95% interval: each domain is judged up to 4 times
_CLASS_NAMES = ("real", "fake")
_MAX_BAR_LEVELS = 8
_MAX_BINS = 255  # as HistGradientBoosting bins a feature
_MIN_BIN = 5  # images per bin, on average, of a field scored alone
_SPLIT_ORDER = {"train": 0, "valid": 1, "test": 2}


@dataclass
class DomainAudit:
    domain: str
    n_real: int
    n_fake: int
    auc: float  # cross-validated metadata AUC; NaN when it cannot be measured (see reason)
    field_auc: dict[str, float] = field(default_factory=dict)  # each field alone
    separating_field: str = ""  # the field with the highest single-field AUC
    warning: bool = False  # auc_low > WARN_AUC
    difference: str = ""  # how the classes differ on separating_field, in words
    reason: str = ""  # why auc is NaN
    folds: int = 0
    n_ignored: int = 0  # rows with an error
    split: str = ""  # "" for all the domain's splits together, else the one split audited alone
    auc_low: float = math.nan  # BOUND_METHOD
    cells: list[DomainAudit] = field(default_factory=list)  # the splits audited alone (pooled audit only)

    def describe(self) -> str:
        """One line: the verdict (and where), the AUC and how the classes differ on the strongest field."""
        where = f" in the {self.split} split" if self.split else self._warned_splits()
        if math.isnan(self.auc):
            return f"metadata AUC n/a{where}: {self.reason}"
        measured = f"metadata AUC {self.auc:.2f}, lower bound {self.auc_low:.2f}"
        if self.warning:
            return f"{self.separating_field} separates real from fake{where}: {measured} ({self.difference})"
        strongest = self.field_auc.get(self.separating_field, math.nan)
        return (f"no metadata shortcut{where}: {measured} (strongest field {self.separating_field}, "
                f"AUC {strongest:.2f}: {self.difference})")

    def _warned_splits(self) -> str:
        """Where a pooled warning comes from, when only some of the splits audited alone show it."""
        same = [c.split for c in self.cells if c.warning and c.separating_field == self.separating_field]
        if not self.warning or not same or len(same) == len(self.cells):
            return ""
        return f" in the {' and '.join(same)} split{'s' if len(same) > 1 else ''}"


def audit(rows: list[dict]) -> list[DomainAudit]:
    """Each domain's audit (all splits together, by domain name), each followed by those of its
    cells that warn about what its pooled verdict does not say (a shortcut only some splits have,
    or another field): the warnings in the list are one finding each."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_domain[str(row.get("domain", ""))].append(row)
    out = []
    for d in sorted(by_domain):
        pooled = audit_domain(by_domain[d])
        out.append(pooled)
        out += [c for c in pooled.cells if c.warning and not _said_by(pooled, c)]
    return out


def _said_by(pooled: DomainAudit, cell: DomainAudit) -> bool:
    return pooled.warning and cell.separating_field == pooled.separating_field


def audit_domain(rows: list[dict]) -> DomainAudit:
    """The metadata audit of one domain's rows, with its large enough splits audited alone in
    ``cells``; never raises on too little data (auc NaN, reason)."""
    domains = sorted({str(r.get("domain", "")) for r in rows})
    if len(domains) > 1:
        raise ValueError(f"audit_domain: rows of several domains ({', '.join(domains)}); use audit(rows)")
    usable = [r for r in rows if not r.get("error")]
    result = _audit_rows(domains[0] if domains else "", "", usable, n_ignored=len(rows) - len(usable))
    splits = sorted({str(r.get("split", "")) for r in usable}, key=lambda s: (_SPLIT_ORDER.get(s, 3), s))
    if len(splits) > 1:  # one split: its cell is the pooled audit again
        for split in splits:
            cell_rows = [r for r in usable if str(r.get("split", "")) == split]
            if min(_class_counts(cell_rows)) >= MIN_CELL_CLASS:
                result.cells.append(_audit_rows(result.domain, split, cell_rows))
    return result


def _class_counts(rows: list[dict]) -> tuple[int, int]:
    labels = [int(r["label"]) for r in rows]
    return labels.count(0), labels.count(1)


def _audit_rows(domain: str, split: str, usable: list[dict], n_ignored: int = 0) -> DomainAudit:
    """The audit of ``usable`` rows (those without an error: audit_domain leaves the others out,
    once, and counts them in ``n_ignored``)."""
    labels = np.array([int(r["label"]) for r in usable], dtype=int)
    result = DomainAudit(domain=domain, split=split, n_real=int((labels == 0).sum()),
                         n_fake=int((labels == 1).sum()), auc=math.nan, n_ignored=n_ignored)
    bad_labels = sorted(set(labels.tolist()) - {0, 1})
    if bad_labels:
        raise ValueError(f"audit_domain: domain {domain!r} has labels {bad_labels}; expected 0 (real) or 1 (fake)")
    smaller = min(result.n_real, result.n_fake)
    if smaller < 2:
        result.reason = f"needs at least 2 images of each class (real {result.n_real}, fake {result.n_fake})"
        return result
    keep = _sample(labels)
    usable, labels = [usable[k] for k in keep], labels[keep]
    result.folds = min(_MAX_FOLDS, smaller)
    folds = _folds(labels, result.folds)
    columns = _columns(usable)
    result.auc = _cv_auc(_design(columns, METADATA_FIELDS), labels, folds)
    result.auc_low = auc_lower_bound(result.auc, int((labels == 0).sum()), int((labels == 1).sum()))
    result.field_auc = {f: _field_auc(columns[f], labels, folds) for f in METADATA_FIELDS}
    result.separating_field = max(METADATA_FIELDS, key=lambda f: result.field_auc[f])  # first wins a tie
    result.warning = bool(result.auc_low > WARN_AUC)
    result.difference = _difference(columns, result.separating_field, labels)
    return result


def _sample(labels: np.ndarray) -> np.ndarray:
    """Indices of at most MAX_PER_CLASS rows of each class (seeded, in their order): the models'
    cost stops growing with the data once the bound is tight anyway."""
    rng = np.random.default_rng(_SEED)
    keep = []
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        keep.append(np.sort(rng.choice(idx, MAX_PER_CLASS, replace=False)) if len(idx) > MAX_PER_CLASS else idx)
    return np.sort(np.concatenate(keep))


def _folds(y: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(folds, shuffle=True, random_state=_SEED).split(np.zeros(len(y)), y))


def auc_lower_bound(auc: float, n_real: int, n_fake: int, z: float = _Z) -> float:
    """The smallest AUC ``a`` whose ``a + z * se(a)`` reaches ``auc`` (se: Hanley and McNeil 1982,
    for n_real negatives and n_fake positives). Inverting the test, as a Wilson interval does,
    keeps the bound below 1 at AUC 1.0, where se(auc) itself is 0 however few the images."""
    if math.isnan(auc):
        return math.nan
    grid = np.linspace(0.0, 1.0, 2001)
    q1, q2 = grid / (2 - grid), 2 * grid**2 / (1 + grid)
    var = (grid * (1 - grid) + (n_fake - 1) * (q1 - grid**2) + (n_real - 1) * (q2 - grid**2)) / (n_real * n_fake)
    reach = grid + z * np.sqrt(np.maximum(var, 0.0))
    return float(grid[np.argmax(reach >= auc - 1e-12)])


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


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean AUC over the stratified ``folds`` of a small gradient-boosted tree model."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from threadpoolctl import threadpool_limits

    if np.all(x == x[0]):  # no feature varies: nothing to learn, and no model needed to say so
        return 0.5
    aucs = []
    # One OpenMP thread: on a busy machine its spinning threads made a fit 40x slower (8.3 s vs
    # 0.2 s for 20,000 rows), and a handful of features gains nothing from more.
    with threadpool_limits(limits=1, user_api="openmp"):
        for train, test in folds:
            # Leaves of 20 (the default) would let a tiny domain's trees make no split at all.
            model = HistGradientBoostingClassifier(max_iter=100, min_samples_leaf=min(20, max(1, len(train) // 10)),
                                                   early_stopping=False, random_state=_SEED)
            model.fit(x[train], y[train])
            aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return float(np.mean(aucs))


def _field_auc(values: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean AUC over ``folds`` of one field's histogram model: each bin scores the training folds'
    fake share in it, smoothed by one image's worth of the overall share (an unseen bin scores
    that share). Any shape of separation counts, not only a monotone one."""
    from sklearn.metrics import roc_auc_score

    codes = _bins(values)
    if codes.max(initial=0) == 0:  # a constant field separates nothing
        return 0.5
    aucs = []
    for train, test in folds:
        prior = float(y[train].mean())
        fakes = np.bincount(codes[train], weights=y[train], minlength=codes.max() + 1)
        counts = np.bincount(codes[train], minlength=codes.max() + 1)
        aucs.append(roc_auc_score(y[test], ((fakes + prior) / (counts + 1))[codes[test]]))
    return float(np.mean(aucs))


def _bins(values: np.ndarray) -> np.ndarray:
    """A bin number per value: each value its own bin when there are few values (formats, sizes in
    px, qualities), else quantile bins of about _MIN_BIN images (at most _MAX_BINS). Labels are not
    looked at, so the bins may be drawn on all the rows before the folds split them."""
    levels, codes = np.unique(values.astype(str) if values.dtype == object else values, return_inverse=True)
    n_bins = min(_MAX_BINS, max(2, len(values) // _MIN_BIN))
    if len(levels) <= n_bins:
        return codes
    edges = np.unique(np.quantile(values.astype(float), np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.searchsorted(edges, values.astype(float), side="right")


def _difference(columns: dict[str, np.ndarray], name: str, y: np.ndarray) -> str:
    """How real and fake differ on one field, e.g. "real: JPEG 100%; fake: PNG 100%"."""
    values = columns[name]
    per_class = [values[y == label] for label in (0, 1)]
    if name in _CATEGORICAL:
        return "; ".join(f"{cls}: {_top_shares(v)}" for cls, v in zip(_CLASS_NAMES, per_class))
    if name == "exif":
        return ", ".join(f"{cls} {np.mean(v) * 100:.0f}% with EXIF" for cls, v in zip(_CLASS_NAMES, per_class))
    if len(set(values.tolist())) <= _MAX_BAR_LEVELS:  # shares, not medians: 128 and 512 px against 256 px
        return "; ".join(f"{cls}: {_top_shares(np.array([_fmt(name, float(x)) for x in v], dtype=object))}"
                         for cls, v in zip(_CLASS_NAMES, per_class))
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
    categories), titled with the metadata AUC and the splits that warn alone. The split cells in
    ``audits`` get no plot of their own. Written atomically; returns the paths."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to switch (renders with Agg)

    out_dir = Path(out_dir)
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if not row.get("error"):
            by_domain[str(row.get("domain", ""))].append(row)
    written, used = [], set()
    for result in (a for a in audits if not a.split):
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
        verdict += "".join(f"; {c.split} alone: {c.separating_field}" for c in result.cells if c.warning)
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
