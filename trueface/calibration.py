"""Temperature scaling of P(fake): one temperature fitted on validation data, applied to every probability shown.

Usage::

    from trueface.calibration import Temperatures, apply_temperature, fit_temperature
    t = fit_temperature(val_labels, val_scores)        # minimises the validation NLL over log T
    calibrated = apply_temperature(test_scores, t)      # sigmoid(logit(score) / T)
    temps = Temperatures({"ema": 2.4}, {"ema": {"dalle": 3.1}})
    t, source = temps.temperature("ema", "dalle")       # (3.1, "dalle validation"); a domain without one: pooled
    calibrated = temps.calibrate("ema", scores, domains)  # each image at its domain's temperature

Temperature scaling (Guo et al., 2017) divides the logit of each score by one number T fitted on
validation images: T > 1 softens an over-confident detector's scores towards 0.5, T < 1 sharpens
an under-confident one. It is monotone, so it changes no ranking (AUC) and no decision: an image
is fake at threshold t on the raw scores exactly when its calibrated score is at least
``apply_temperature(t, T)``. The thresholds are therefore still chosen on the raw scores, and the
temperature only changes the probabilities reported (ECE, Brier, ``jobs.predict``'s
``p_calibrated``). trueface.thresholds fits the temperatures beside the thresholds, on the same
validation images and with the same scope, and keeps them in ``thresholds.json``.

Scores are P(fake) in [0, 1]; their logit ``log(p / (1 - p))`` is taken after clipping them to
``[TINY, 1 - EPS]`` (TINY = 2**-1022, float64's smallest normal number; EPS = 2**-53, the gap
below 1.0), so every normal score below 1 keeps a logit of its own (a very confident real's
1e-30 is -69, not the -36.7 a clip at EPS gave every score below 1e-16), and a score of exactly
0 or 1 gets a large finite one instead of an infinite one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit

from trueface.metrics import brier_score, labelled_probabilities

__all__ = ["EPS", "TINY", "T_RANGE", "UNCALIBRATED", "Temperatures", "apply_temperature", "brier_score", "domain_or_pooled",
           "fit_temperature", "logit"]

#: Scores are clipped to [TINY, 1 - EPS] before their logit is taken.
EPS = 2.0 ** -53
TINY = float(np.finfo(np.float64).tiny)
#: The temperatures fit_temperature searches (a bound is returned when the optimum lies beyond it).
T_RANGE = (1e-3, 1e3)
#: The source of temperature 1 where none was fitted.
UNCALIBRATED = "uncalibrated (temperature 1)"
# Golden-section search on log T stops when the bracket is this narrow (T known to ~1e-9 relative).
_LOG_T_TOL = 1e-9
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def logit(scores: Any) -> np.ndarray:
    """``log(p / (1 - p))`` of each score, clipped to [TINY, 1 - EPS] first (finite everywhere)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), TINY, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # scipy's expit: no overflow for any z, and full relative precision far below 0.5 (a tanh
    # form, 0.5 * (1 + tanh(z / 2)), rounds everything under about 1e-17 to 0)
    return expit(z)


def _check_temperature(temperature: Any) -> np.ndarray:
    t = np.asarray(temperature, dtype=np.float64)
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"a temperature must be a finite number > 0, got {temperature!r}")
    return t


def apply_temperature(scores: Any, temperature: Any) -> np.ndarray:
    """``sigmoid(logit(score) / T)`` per score; ``temperature`` is one T or one per score.

    Where T is exactly 1 the score is returned as it is (not via the clipped logit), so an
    uncalibrated probability equals the raw one to the last bit."""
    p = np.asarray(scores, dtype=np.float64)
    t = _check_temperature(temperature)
    return np.where(t == 1.0, p, _sigmoid(logit(p) / t))


def _nll(signed_logits: np.ndarray, log_t: float) -> float:
    """Mean negative log-likelihood of the labels at temperature exp(log_t); ``signed_logits`` is
    the logit times +1 for a fake, -1 for a real, so each image's NLL is softplus(-signed / T)."""
    return float(np.logaddexp(0.0, -signed_logits * math.exp(-log_t)).mean())


def fit_temperature(labels: Any, scores: Any) -> float:
    """The T in :data:`T_RANGE` that minimises the mean NLL of ``labels`` under
    ``apply_temperature(scores, T)``, searched over log T (golden section).

    The NLL is convex in 1/T, so it has one minimum along log T and the search cannot stop at a
    wrong one. Bounds are reached when the scores separate the validation images perfectly at
    0.5 (every fake above, every real below: T falls to the lower bound; a perfect order alone is
    not enough) or carry nothing / point backwards (T rises to the upper: every probability ~0.5).
    Scores that carry nothing (all exactly 0.5) give 1.0. One class only is allowed, but a
    temperature fitted on it is meaningless; trueface.thresholds fits a domain's own only when
    its validation images hold both classes."""
    y, p = labelled_probabilities(labels, scores)
    signed = logit(p) * np.where(y == 1, 1.0, -1.0)
    if not signed.any():
        return 1.0
    lo, hi = (math.log(b) for b in T_RANGE)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = _nll(signed, a), _nll(signed, b)
    while hi - lo > _LOG_T_TOL:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = _nll(signed, a)
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = _nll(signed, b)
    log_t = (lo + hi) / 2.0
    for bound in T_RANGE:  # at a bound the bracket ends within the tolerance of it: report the bound itself
        if abs(log_t - math.log(bound)) < 10 * _LOG_T_TOL:
            return bound
    return math.exp(log_t)


def domain_or_pooled(pooled: dict[str, float], per_domain: dict[str, dict[str, float]], weights: str,
                     domain: str | None, what: str, error: type[Exception] = ValueError) -> tuple[float, str]:
    """(value, where it comes from) of ``weights`` among values chosen on validation data (thresholds,
    temperatures): ``domain``'s own when it has one, else the pooled one. ``error`` names a missing weights."""
    if weights not in pooled:
        raise error(f"no {what} for weights {weights!r}; have {sorted(pooled)}")
    own = per_domain.get(weights, {}).get(domain) if domain else None
    if own is not None:
        return own, f"{domain} validation"
    return pooled[weights], "pooled validation"


@dataclass(frozen=True)
class Temperatures:
    """Fitted temperatures: per weights one on all validation images (``pooled``) and, under the
    per_domain scope, one per validation domain with both classes. ``fitted=False`` is the stand-in
    of temperature 1 for weights that have none (:meth:`identity`): nothing is calibrated."""

    pooled: dict[str, float]  # weights -> T fitted on all validation images
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)  # weights -> domain -> T
    fitted: bool = True

    @classmethod
    def identity(cls, weights: list[str]) -> "Temperatures":
        """Temperature 1 for every weights: probabilities shown as they are, and said to be uncalibrated."""
        return cls({w: 1.0 for w in weights}, {}, fitted=False)

    def temperature(self, weights: str, domain: str | None = None) -> tuple[float, str]:
        """(T, where it comes from) for ``weights``: ``domain``'s own when it has one, else the pooled one."""
        if not self.fitted:
            return 1.0, UNCALIBRATED
        return domain_or_pooled(self.pooled, self.per_domain, weights, domain, "temperature")

    def per_image(self, weights: str, domains: list[str]) -> np.ndarray:
        """Each image's temperature: its domain's own, else the pooled one."""
        own = {d: self.temperature(weights, d)[0] for d in set(domains)}
        return np.array([own[d] for d in domains], dtype=np.float64)

    def calibrate(self, weights: str, scores: Any, domains: list[str]) -> np.ndarray:
        """``scores`` of images from ``domains`` (one name each), each at its domain's temperature."""
        return apply_temperature(scores, self.per_image(weights, domains))

    def describe(self) -> str:
        """One line for reports, e.g. 'raw T=1.84, ema T=2.10; per domain: ema dalle 3.05'."""
        if not self.fitted:
            return UNCALIBRATED
        text = ", ".join(f"{w} T={t:.4g}" for w, t in self.pooled.items())
        own = [f"{w} {d} {t:.4g}" for w, per in self.per_domain.items() for d, t in per.items()]
        return text + (f"; per domain: {', '.join(own)}" if own else "")
