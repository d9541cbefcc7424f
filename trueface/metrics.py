"""Binary metrics for real-vs-generated face detection.

Conventions: label 0 = real photograph, 1 = generated ("fake"); a score is P(fake)
in [0, 1]; an image is predicted fake when ``score >= threshold``.

Usage::

    from trueface.metrics import binary_metrics, choose_threshold
    t = choose_threshold(val_labels, val_scores, "youden")   # pick on validation data
    m = binary_metrics(test_labels, test_scores, t)          # report on test data
    print(m["auc"], m["f1"], m["ece"], m["brier"])
    bins = reliability_bins(test_labels, test_scores)        # the reliability diagram behind ECE

Every function accepts lists or 1-D numpy arrays and raises ``ValueError`` with a
message naming the problem (length mismatch, labels outside {0, 1}, non-finite
scores, empty input).  Nothing here warns: undefined ratios have documented values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# The policies are config values: the config layer owns their names and parsing.
from trueface.config.choices import THRESHOLD_POLICIES, validate_threshold_policy
from trueface.config.choices import parse_fixed_threshold as _parse_fixed

__all__ = [
    "THRESHOLD_POLICIES",
    "ReliabilityBins",
    "binary_metrics",
    "brier_score",
    "choose_threshold",
    "confusion_matrix",
    "expected_calibration_error",
    "labelled_probabilities",
    "reliability_bins",
    "roc_auc",
    "roc_curve",
    "validate_threshold_policy",
]


#: Keys of the dict returned by :func:`binary_metrics`, in order.
METRIC_KEYS = (
    "n", "n_real", "n_fake", "auc", "accuracy", "precision", "recall", "f1", "ece", "brier",
    "threshold", "tn", "fp", "fn", "tp",
)

# Objectives of different partitions that are mathematically equal can differ in
# the last bits (e.g. 2/3 - 1/3 vs 1/3); treat them as ties.
_TIE_ATOL = 1e-12


# --------------------------------------------------------------------------- inputs


def _as_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array, checking every value is 0 or 1."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric 0/1, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        examples = ", ".join(repr(v) for v in np.unique(arr[bad])[:5].tolist())
        raise ValueError(
            f"{name} must be 0 (real) or 1 (fake); found {int(bad.sum())} other value(s): {examples}"
        )
    return arr.astype(np.int64)


def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a 1-D float64 array of finite values."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} must be finite; found {int(bad.sum())} NaN/inf value(s)")
    return arr


def _check_pair(labels: Any, values: Any, values_name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate ``labels`` and a matching array of scores (non-empty, equal lengths)."""
    y = _as_labels(labels)
    s = _as_scores(values, values_name)
    if len(y) != len(s):
        raise ValueError(f"labels and {values_name} differ in length: {len(y)} != {len(s)}")
    if len(y) == 0:
        raise ValueError(f"labels and {values_name} are empty")
    return y, s


def _check_unit_interval(values: np.ndarray, name: str) -> None:
    """Raise unless every value lies in [0, 1] (probabilities)."""
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(
            f"{name} must be probabilities in [0, 1]; got range [{values.min():g}, {values.max():g}]"
        )


def labelled_probabilities(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` (0/1) and matching ``probs`` (in [0, 1]) as int64 / float64 arrays, checked."""
    y, p = _check_pair(labels, probs, "probs")
    _check_unit_interval(p, "probs")
    return y, p


def _one_class(y: np.ndarray) -> bool:
    return bool(np.all(y == y[0]))


def _ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 (and x/0) defined as 0.0, so nothing warns."""
    return float(num) / float(den) if den else 0.0


# --------------------------------------------------------------------------- metrics


def roc_auc(labels: Any, scores: Any) -> float:
    """ROC-AUC of ``scores`` for the fake class; ties between a real and a fake count 1/2.

    Returns ``float('nan')`` when ``labels`` hold one class only (AUC is undefined);
    no exception and no warning. Computed as the Mann-Whitney statistic on average ranks
    (numpy only: scikit-learn costs ~3 s of import in every Ray worker).
    """
    y, s = _check_pair(labels, scores)
    if _one_class(y):
        return float("nan")
    ranks = _average_ranks(s)
    n_fake = int(y.sum())
    n_real = len(y) - n_fake
    return float((ranks[y == 1].sum() - n_fake * (n_fake + 1) / 2) / (n_fake * n_real))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, one point per distinct score.

    ``thresholds`` are decreasing and start at ``inf`` (nothing predicted fake).  With
    one class only, the rate that has no denominator is NaN (no warning is emitted).
    """
    y, s = _check_pair(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    y_sorted, s_sorted = y[order], s[order]
    last_of_each = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), len(s) - 1]
    tp = np.r_[0, np.cumsum(y_sorted)[last_of_each]]
    fp = np.r_[0, (last_of_each + 1) - tp[1:]]
    n_fake, n_real = tp[-1], fp[-1]
    tpr = tp / n_fake if n_fake else np.full(len(tp), np.nan)
    fpr = fp / n_real if n_real else np.full(len(fp), np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), np.r_[np.inf, s_sorted[last_of_each]]


def confusion_matrix(labels: Any, preds: Any) -> np.ndarray:
    """2x2 int64 confusion matrix ``[[tn, fp], [fn, tp]]``.

    Rows are the true class (0 real, 1 fake), columns the predicted class.
    """
    y = _as_labels(labels)
    p = _as_labels(preds, "preds")
    if len(y) != len(p):
        raise ValueError(f"labels and preds differ in length: {len(y)} != {len(p)}")
    # Index 2*true + pred enumerates tn, fp, fn, tp.
    return np.bincount(2 * y + p, minlength=4).reshape(2, 2).astype(np.int64)


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label reliability bins: bin m covers confidences ``(edges[m], edges[m + 1]]``.

    ``confidence`` and ``accuracy`` are the bin means (NaN for an empty bin); ``count`` the images."""

    edges: np.ndarray
    count: np.ndarray  # int64
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """The ECE these bins give (equal to :func:`expected_calibration_error` on the same data)."""
        full = self.count > 0
        return float((self.count[full] * np.abs(self.accuracy[full] - self.confidence[full])).sum() / self.count.sum())


def _top_label_sums(labels: Any, probs: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges, count, sum of confidences, sum of correct) per bin; see :func:`expected_calibration_error`."""
    y, p = labelled_probabilities(labels, probs)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    pred = (p >= 0.5).astype(np.int64)
    confidence = np.where(pred == 1, p, 1.0 - p)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True gives edges[i-1] < c <= edges[i]; subtract 1 for a 0-based bin index.
    bins = np.clip(np.digitize(confidence, edges, right=True) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return edges, count, conf_sum, acc_sum


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 15) -> float:
    """Expected calibration error (ECE) of P(fake), top-label definition (Guo et al., 2017).

    Each image's predicted class is fake when ``p >= 0.5`` and its confidence is the
    probability of that class, ``max(p, 1 - p)``.  Confidences are put in ``n_bins``
    equal-width bins over [0, 1], bin m being ``((m-1)/M, m/M]`` (so bins wholly below 0.5 stay
    empty, and a confidence of exactly 0.5 lands in the bin that holds it: the one ending at 0.5
    where M is even, (7/15, 8/15] at the default 15); then

        ECE = sum over bins b of  |b| / n * |accuracy(b) - mean confidence(b)|.

    It does not depend on the decision threshold used elsewhere.
    """
    _, count, conf_sum, acc_sum = _top_label_sums(labels, probs, n_bins)
    # |sum acc - sum conf| / n per bin equals |b|/n * |acc(b) - conf(b)| and needs no division by |b|.
    return float(np.abs(acc_sum - conf_sum).sum() / count.sum())


def reliability_bins(labels: Any, probs: Any, n_bins: int = 15) -> ReliabilityBins:
    """The bins of :func:`expected_calibration_error`, for a reliability diagram: per bin the
    image count, mean confidence and accuracy (NaN where a bin is empty)."""
    edges, count, conf_sum, acc_sum = _top_label_sums(labels, probs, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins: 0/0 is the documented NaN
        return ReliabilityBins(edges, count, conf_sum / count, acc_sum / count)


def brier_score(labels: Any, probs: Any) -> float:
    """Brier score of P(fake): the mean of ``(p - label)**2`` (0 is perfect; 0.25 is a constant 0.5).

    Unlike ECE it has no bins, and it rewards sharpness as well as calibration."""
    y, p = labelled_probabilities(labels, probs)
    return float(np.mean((p - y) ** 2))


def binary_metrics(labels: Any, scores: Any, threshold: float) -> dict:
    """All scalar metrics of one evaluation, keys as in :data:`METRIC_KEYS`.

    An image is predicted fake when ``score >= threshold``.  ``precision``, ``recall``
    and ``f1`` are for the fake class, with 0/0 defined as 0.0 (e.g. precision when
    nothing is predicted fake).  ``auc`` is NaN with one class only; ``ece`` uses the
    0.5 top-label definition of :func:`expected_calibration_error` and ``brier`` is
    :func:`brier_score`, so scores must lie in [0, 1].  Values are plain Python ints/floats.
    """
    y, s = _check_pair(labels, scores)
    _check_unit_interval(s, "scores")
    t = _as_threshold(threshold)
    (tn, fp), (fn, tp) = confusion_matrix(y, (s >= t).astype(np.int64)).tolist()
    n = len(y)
    return {
        "n": n,
        "n_real": int(n - y.sum()),
        "n_fake": int(y.sum()),
        "auc": roc_auc(y, s),
        "accuracy": _ratio(tp + tn, n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        # 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall and is 0 when tp = 0.
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "ece": expected_calibration_error(y, s),
        "brier": brier_score(y, s),
        "threshold": t,
        "tn": int(tn),
        "fp": int(fp),
        "fn": int(fn),
        "tp": int(tp),
    }


def _as_threshold(threshold: Any) -> float:
    """Return ``threshold`` as a finite float."""
    if isinstance(threshold, bool):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number, got {threshold!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    return t


# --------------------------------------------------------------------------- thresholds


def _candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Thresholds that realise every distinct prediction split of ``scores``, at both
    ends of the range of thresholds giving it, plus 0.5.

    Each observed score s is the largest threshold that still flags it fake, and
    ``nextafter(s, +inf)`` the smallest that calls it real: between two neighbouring
    scores every threshold gives the same split, so both ends of each such range are
    candidates and, among equally good ones, the end nearest 0.5 can win whichever side
    of 0.5 the range lies on (the value just above the maximum predicts everything
    real). 0.5 is added so that, when it is among the best thresholds, it is returned
    exactly.
    """
    unique = np.unique(scores)
    just_above = np.nextafter(unique, np.inf)
    return np.unique(np.concatenate([unique, just_above, [0.5]]))


def _objective(policy: str, tp: np.ndarray, fp: np.ndarray, n_fake: int, n_real: int) -> np.ndarray:
    """Value of ``policy`` for every candidate, given its true/false positive counts."""
    fn = n_fake - tp
    tn = n_real - fp
    if policy == "youden":
        return tp / n_fake - fp / n_real
    if policy == "max_f1":
        den = 2 * tp + fp + fn
        return np.divide(2 * tp, den, out=np.zeros(len(tp)), where=den > 0)
    return (tp + tn) / (n_fake + n_real)  # max_accuracy


def choose_threshold(labels: Any, scores: Any, policy: str) -> float:
    """Decision threshold for ``policy`` on (validation) ``labels`` / ``scores``.

    Policies (see :data:`THRESHOLD_POLICIES`):

    * ``youden``: maximise TPR - FPR;
    * ``max_f1``: maximise F1 of the fake class;
    * ``max_accuracy``: maximise accuracy;
    * ``fixed:<p>``: return ``p`` (must be in [0, 1]); the data are only validated.

    Among thresholds with the same best value the one closest to 0.5 wins (the lower
    one if two are equally close).  Candidates are the observed scores, the value just
    above each (``nextafter(s, +inf)``: so a best range above 0.5 gives its lower end,
    just above the highest validation real, not its upper one) and 0.5.  When ``labels`` hold one class only, the non-fixed
    policies are undefined and 0.5 is returned.
    """
    validate_threshold_policy(policy)
    y, s = _check_pair(labels, scores)
    if policy.startswith("fixed:"):
        return _parse_fixed(policy)
    if _one_class(y):
        return 0.5
    candidates = _candidate_thresholds(s)
    fake = np.sort(s[y == 1])
    real = np.sort(s[y == 0])
    # Counts of scores >= t for every candidate t at once: O(n log n) instead of O(n^2).
    tp = len(fake) - np.searchsorted(fake, candidates, side="left")
    fp = len(real) - np.searchsorted(real, candidates, side="left")
    value = _objective(policy, tp, fp, len(fake), len(real))
    best = candidates[value >= value.max() - _TIE_ATOL]
    distance = np.abs(best - 0.5)
    # equally close within rounding: 0.5 - 0.3 is 0.2 but 0.7 - 0.5 is 0.19999999999999996
    return float(best[distance <= distance.min() + _TIE_ATOL].min())
