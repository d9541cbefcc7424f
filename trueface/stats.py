"""Confidence intervals for AUCs and their differences: over seeds (Student t) or over test images
(a percentile bootstrap), 95% by default.

Usage::

    from trueface.stats import bootstrap_auc, paired_bootstrap_auc_diff, paired_t_diff, t_interval
    t_interval([0.71, 0.69, 0.74]).text()                 # '0.713 [0.651, 0.776]' (t over seeds)
    bootstrap_auc(labels, scores)                          # one run: resample the test images
    diff = paired_t_diff(aucs_variant, aucs_full)          # matched seeds
    diff = welch_t_diff(aucs_variant, aucs_full)           # seeds not matched (unpaired)
    diff = paired_bootstrap_auc_diff(labels, scores_variant, scores_full)   # same images, one seed
    diff.includes_zero                                     # True: no evidence of a difference

Which to use: seeds measure what a reader cares about (would the recipe do as well if trained
again?); with one seed only, the bootstrap over test images still says how much the number owes
to the particular test images, but nothing about training noise: another seed may land outside it.

The bootstrap resamples real and fake images separately (stratified by label), so every resample
has both classes and the same class counts as the test set; given ``strata`` (each image's domain,
for a column that pools domains) it resamples within each (domain, class) cell, so every resample
also keeps each domain's counts, as the test set fixes them. Its AUCs are computed for all
resamples at once from multiplicity counts (no per-resample sort): 2,000 resamples of 10,000
images take 0.3 s on one CPU core of a 2-core build machine (best of 3;
measured with ``python -m trueface.stats``, which prints it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from trueface.metrics import _check_pair, roc_auc

__all__ = [
    "BOOTSTRAP_IMAGES",
    "PAIRED_BOOTSTRAP_IMAGES",
    "PAIRED_T_SEEDS",
    "SINGLE_VALUE",
    "T_SEEDS",
    "WELCH_T_SEEDS",
    "Interval",
    "bootstrap_auc",
    "paired_bootstrap_auc_diff",
    "paired_t_diff",
    "resampled_aucs",
    "t_interval",
    "welch_t_diff",
]

#: ``Interval.method`` values.
T_SEEDS = "t over seeds"
BOOTSTRAP_IMAGES = "bootstrap over images"
PAIRED_T_SEEDS = "paired t over seeds"
WELCH_T_SEEDS = "Welch t over seeds"
PAIRED_BOOTSTRAP_IMAGES = "paired bootstrap over images"
SINGLE_VALUE = "single value"

# Resamples per chunk: bounds the (chunk x images) index matrix to ~20 MB at 10,000 images.
_CHUNK_IMAGES = 2_500_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval. ``n``: seeds (t methods) or test images
    (bootstrap methods). A single value has NaN bounds: no interval can be given."""

    mean: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95

    @property
    def has_bounds(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def includes_zero(self) -> bool:
        """True when 0 lies in [low, high]; also True without bounds (nothing shows a difference)."""
        return not self.has_bounds or self.low <= 0.0 <= self.high

    def text(self, digits: int = 3) -> str:
        """``'0.712 [0.690, 0.734]'``; ``'0.712 [no interval]'`` for a single value."""
        if math.isnan(self.mean):
            return "n/a"
        if not self.has_bounds:
            return f"{self.mean:.{digits}f} [no interval]"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _finite(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name}: no values to compute an interval from")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: {int((~np.isfinite(arr)).sum())} value(s) are NaN or infinite; drop them first")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")


def t_interval(values: Any, confidence: float = 0.95, method: str = T_SEEDS) -> Interval:
    """Mean of ``values`` and its Student-t interval: mean +- t_{n-1} * sd / sqrt(n), sd with n - 1.
    One value gives NaN bounds (method ``single value``)."""
    from scipy.stats import t as student_t  # scipy: ~0.3 s of import, only where intervals are made

    _check_confidence(confidence)
    arr = _finite(values, "t_interval")
    mean = float(arr.mean())
    if arr.size == 1:
        return Interval(mean, math.nan, math.nan, 1, SINGLE_VALUE, confidence)
    half = float(student_t.ppf((1 + confidence) / 2, arr.size - 1)) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return Interval(mean, mean - half, mean + half, int(arr.size), method, confidence)


def paired_t_diff(a: Any, b: Any, confidence: float = 0.95) -> Interval:
    """Interval of mean(a - b), ``a[i]`` and ``b[i]`` from the same seed (paired: the seed's shared
    luck, e.g. its data order, cancels)."""
    x, y = _finite(a, "paired_t_diff a"), _finite(b, "paired_t_diff b")
    if x.size != y.size:
        raise ValueError(f"paired_t_diff: a has {x.size} value(s), b {y.size}; pair them by seed first")
    return t_interval(x - y, confidence, PAIRED_T_SEEDS)


def welch_t_diff(a: Any, b: Any, confidence: float = 0.95) -> Interval:
    """Interval of mean(a) - mean(b), ``a`` and ``b`` from different seeds (unpaired, 2 or more
    values each): the difference +- t_df * sqrt(sd_a^2 / n_a + sd_b^2 / n_b), sds with n - 1,
    ``df`` from Welch-Satterthwaite (unequal variances). Two sets of identical values give a
    zero-width interval; one set without spread gives df = n - 1 of the other. ``n``: n_a + n_b."""
    from scipy.stats import t as student_t

    _check_confidence(confidence)
    x, y = _finite(a, "welch_t_diff a"), _finite(b, "welch_t_diff b")
    if x.size < 2 or y.size < 2:
        raise ValueError(f"welch_t_diff: needs 2 or more values on each side (a has {x.size}, b {y.size}); "
                         "with one seed there is no spread to measure")
    mean = float(x.mean() - y.mean())
    var_x, var_y = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    se2 = var_x + var_y
    n = int(x.size + y.size)
    if se2 == 0.0:  # no spread on either side: nothing to widen the difference by
        return Interval(mean, mean, mean, n, WELCH_T_SEEDS, confidence)
    df = se2 ** 2 / (var_x ** 2 / (x.size - 1) + var_y ** 2 / (y.size - 1))
    half = float(student_t.ppf((1 + confidence) / 2, df)) * math.sqrt(se2)
    return Interval(mean, mean - half, mean + half, n, WELCH_T_SEEDS, confidence)


# --------------------------------------------------------------------------- bootstrap


def _bootstrap_aucs(labels: np.ndarray, columns: list[np.ndarray], n_boot: int, seed: int,
                    strata: np.ndarray | None = None) -> np.ndarray:
    """AUC of every score column on the same ``n_boot`` stratified resamples: shape (n_boot, columns).
    Each resample draws, with replacement, as many images from each cell as the cell holds; a cell
    is a class, or a (stratum, class) pair where ``strata`` gives each image's stratum."""
    rng = np.random.default_rng(seed)
    real_cells, fake_cells = _cells(labels, strata, 0), _cells(labels, strata, 1)
    # Tie groups in score order (images with equal scores share one): what the AUC depends on.
    groups = [np.unique(scores, return_inverse=True)[1].ravel() for scores in columns]
    out = np.empty((n_boot, len(columns)))
    chunk = max(1, _CHUNK_IMAGES // len(labels))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        draws_real = _draw(rng, real_cells, size)
        draws_fake = _draw(rng, fake_cells, size)
        for k, group in enumerate(groups):
            out[start:start + size, k] = resampled_aucs(group, draws_real, draws_fake)
    return out


def _cells(labels: np.ndarray, strata: np.ndarray | None, label: int) -> list[np.ndarray]:
    """Indices of the images of class ``label``, split by stratum (one cell without strata)."""
    members = labels == label
    if strata is None:
        return [np.flatnonzero(members)]
    return [np.flatnonzero(members & (strata == value)) for value in np.unique(strata[members])]


def _draw(rng: np.random.Generator, cells: list[np.ndarray], size: int) -> np.ndarray:
    """``size`` resamples, each a row of image indices: every cell resampled to its own count."""
    return np.concatenate([cell[rng.integers(0, cell.size, (size, cell.size))] for cell in cells], axis=1)


def resampled_aucs(group: np.ndarray, draws_real: np.ndarray, draws_fake: np.ndarray) -> np.ndarray:
    """AUC of each resample (row of ``draws_real``/``draws_fake``: indices of the images drawn),
    ``group[i]`` being image i's rank among the distinct scores (0 = lowest).

    AUC = sum over fake draws of (real draws scored lower + half those tied) / (n_fake * n_real):
    per resample, two bincounts over the score groups and a cumulative sum, no sorting."""
    size, g = draws_real.shape[0], int(group.max()) + 1
    offsets = np.arange(size)[:, None] * g  # resample r counts in bins r*g .. r*g + g - 1
    reals = np.bincount((group[draws_real] + offsets).ravel(), minlength=size * g).reshape(size, g)
    fakes = np.bincount((group[draws_fake] + offsets).ravel(), minlength=size * g).reshape(size, g)
    below = np.cumsum(reals, axis=1) - reals
    wins = (fakes * (below + 0.5 * reals)).sum(axis=1)
    return wins / (draws_real.shape[1] * draws_fake.shape[1])


def _bootstrap_inputs(labels: Any, named_scores: dict[str, Any], n_boot: int) -> tuple[np.ndarray, list[np.ndarray]]:
    if n_boot < 2:
        raise ValueError(f"n_boot must be at least 2 (2000 is usual), got {n_boot}")
    columns = []
    for name, scores in named_scores.items():
        y, s = _check_pair(labels, scores, name)
        columns.append(s)
    if y.min() == y.max():
        raise ValueError(f"the bootstrap of an AUC needs real and fake images; all {len(y)} are "
                         f"{'fake' if y[0] else 'real'}")
    return y, columns


def _percentile_interval(point: float, samples: np.ndarray, n: int, method: str, confidence: float) -> Interval:
    _check_confidence(confidence)
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(point, float(low), float(high), n, method, confidence)


def _strata_array(strata: Any, n: int) -> np.ndarray | None:
    if strata is None:
        return None
    arr = np.asarray(strata, dtype=object).ravel()
    if arr.size != n:
        raise ValueError(f"strata: {arr.size} value(s) for {n} images; give one stratum (e.g. domain) per image")
    return arr


def bootstrap_auc(labels: Any, scores: Any, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                  strata: Any = None) -> Interval:
    """AUC on the test images (``mean``) with a percentile-bootstrap interval over the images,
    resampled within each class, and within each stratum where ``strata`` names one per image (the
    domain, for a column that pools domains whose image counts are fixed by design). ``n``: the
    number of images."""
    y, (s,) = _bootstrap_inputs(labels, {"scores": scores}, n_boot)
    samples = _bootstrap_aucs(y, [s], n_boot, seed, _strata_array(strata, len(y)))[:, 0]
    return _percentile_interval(roc_auc(y, s), samples, len(y), BOOTSTRAP_IMAGES, confidence)


def paired_bootstrap_auc_diff(labels: Any, scores_a: Any, scores_b: Any, n_boot: int = 2000, seed: int = 0,
                              confidence: float = 0.95, strata: Any = None) -> Interval:
    """AUC(a) - AUC(b) on the same images (``scores_a[i]`` and ``scores_b[i]`` score image i), its
    interval from the differences on the same resamples (paired: an image hard for both cancels);
    ``strata`` as in bootstrap_auc."""
    y, (a, b) = _bootstrap_inputs(labels, {"scores_a": scores_a, "scores_b": scores_b}, n_boot)
    samples = _bootstrap_aucs(y, [a, b], n_boot, seed, _strata_array(strata, len(y)))
    return _percentile_interval(roc_auc(y, a) - roc_auc(y, b), samples[:, 0] - samples[:, 1], len(y),
                                PAIRED_BOOTSTRAP_IMAGES, confidence)


def _measure(n_images: int = 10_000, n_boot: int = 2000) -> None:
    """The timing the module docstring states (best of 3)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], n_images // 2)
    scores = rng.normal(labels * 1.0, 1.0)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        interval = bootstrap_auc(labels, scores, n_boot)
        times.append(time.perf_counter() - started)
    print(f"bootstrap_auc: {n_boot} resamples of {n_images} images in {min(times):.2f} s (best of 3); "
          f"AUC {interval.text()}")
    started = time.perf_counter()
    paired_bootstrap_auc_diff(labels, scores, scores + rng.normal(0, 0.5, n_images), n_boot)
    print(f"paired_bootstrap_auc_diff: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    _measure()
