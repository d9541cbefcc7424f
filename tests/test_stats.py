"""trueface.stats: t intervals over seeds, the stratified bootstrap over test images, paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from scipy.stats import t as student_t

from trueface.metrics import roc_auc
from trueface.stats import (BOOTSTRAP_IMAGES, PAIRED_BOOTSTRAP_IMAGES, PAIRED_T_SEEDS, SINGLE_VALUE, T_SEEDS,
                            WELCH_T_SEEDS, Interval, _cells, _draw, bootstrap_auc, paired_bootstrap_auc_diff,
                            paired_t_diff, resampled_aucs, t_interval, welch_t_diff)


def model_scores(rng, n_per_class: int, separation: float):
    """A known model: real scores ~ N(0, 1), fake ~ N(separation, 1); true AUC Phi(separation / sqrt 2)."""
    labels = np.repeat([0, 1], n_per_class)
    base = rng.normal(0.0, 1.0, labels.size)
    return labels, base + separation * labels


def test_t_interval_matches_a_hand_computation():
    values = [0.70, 0.72, 0.75, 0.69]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    half = student_t.ppf(0.975, 3) * sd / 2
    got = t_interval(values)
    assert (got.mean, got.low, got.high) == pytest.approx((mean, mean - half, mean + half))
    assert got.n == 4 and got.method == T_SEEDS and got.text() == f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"
    assert t_interval(values, confidence=0.8).high < got.high  # a lower confidence is narrower


def test_one_value_has_no_interval_and_bad_input_is_refused():
    single = t_interval([0.7])
    assert single.mean == 0.7 and math.isnan(single.low) and math.isnan(single.high)
    assert single.method == SINGLE_VALUE and single.includes_zero and single.text() == "0.700 [no interval]"
    with pytest.raises(ValueError, match="NaN"):
        t_interval([0.7, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        t_interval([])
    with pytest.raises(ValueError, match="confidence"):
        t_interval([0.7, 0.8], confidence=95)


def test_resampled_aucs_equal_the_auc_of_each_resample_ties_included():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    group = np.unique(scores, return_inverse=True)[1]
    real, fake = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    draws_real = real[rng.integers(0, real.size, (7, real.size))]
    draws_fake = fake[rng.integers(0, fake.size, (7, fake.size))]
    expected = [roc_auc(np.r_[np.zeros(real.size), np.ones(fake.size)], np.r_[scores[r], scores[f]])
                for r, f in zip(draws_real, draws_fake)]
    assert resampled_aucs(group, draws_real, draws_fake) == pytest.approx(expected, abs=1e-12)


def test_the_bootstrap_interval_covers_the_true_auc_about_95_percent_of_the_time():
    """400 simulated test sets of 100 real + 100 fake from a model of known AUC (0.760); the
    coverage measured over 1,000 such sets (400 resamples each) is 0.95; the band allows for 400
    sets' sampling error (sd 0.011)."""
    separation = 1.0
    true_auc = norm.cdf(separation / math.sqrt(2))
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for k in range(400):
        labels, scores = model_scores(rng, 100, separation)
        interval = bootstrap_auc(labels, scores, n_boot=300, seed=k)
        assert interval.mean == pytest.approx(roc_auc(labels, scores)) and interval.n == 200
        assert interval.method == BOOTSTRAP_IMAGES
        covered += interval.low <= true_auc <= interval.high
        widths.append(interval.high - interval.low)
    assert 0.91 <= covered / 400 <= 0.98
    # The textbook width for this AUC and size (Hanley-McNeil standard error ~0.033): about 0.13.
    assert 0.09 < float(np.mean(widths)) < 0.17


def test_the_bootstrap_needs_both_classes_and_is_reproducible():
    with pytest.raises(ValueError, match="real and fake"):
        bootstrap_auc([1, 1, 1], [0.2, 0.5, 0.9])
    rng = np.random.default_rng(1)
    labels, scores = model_scores(rng, 50, 1.0)
    assert bootstrap_auc(labels, scores, 300, seed=5) == bootstrap_auc(labels, scores, 300, seed=5)
    assert bootstrap_auc(labels, scores, 300, seed=5) != bootstrap_auc(labels, scores, 300, seed=6)


def two_domain_scores(rng, n_per_cell: int):
    """Two domains at other score levels (domain b's scores 2 higher), each with n_per_cell real and
    fake images, separation 1 within each. Returns labels, scores, domains and the true pooled AUC."""
    labels = np.tile(np.repeat([0, 1], n_per_cell), 2)
    domains = np.repeat(["a", "b"], 2 * n_per_cell)
    scores = rng.normal(0.0, 1.0, labels.size) + labels + 2.0 * (domains == "b")
    # a fake beats a real with P = Phi((mu_fake - mu_real) / sqrt 2), averaged over the four
    # (fake domain, real domain) pairs, which the fixed counts weigh equally
    shifts = [1.0, 1.0, 1.0 - 2.0, 1.0 + 2.0]
    return labels, scores, domains, float(np.mean([norm.cdf(d / math.sqrt(2)) for d in shifts]))


def test_a_bootstrap_with_strata_keeps_every_domain_and_class_count_in_every_resample():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 1, 1])
    strata = np.array(["a", "a", "b", "a", "b", "b", "b", "b", "a", "b"], dtype=object)
    rng = np.random.default_rng(0)
    for label in (0, 1):
        draws = _draw(rng, _cells(labels, strata, label), 50)
        assert draws.shape == (50, int((labels == label).sum()))
        assert (labels[draws] == label).all()
        for value in ("a", "b"):  # each row holds the cell's own count of that domain
            assert ((strata[draws] == value).sum(axis=1) == ((labels == label) & (strata == value)).sum()).all()
    # one stratum for all: the same draws, so the same interval, as no strata
    y, s, _, _ = two_domain_scores(np.random.default_rng(2), 20)
    assert bootstrap_auc(y, s, 300, strata=["x"] * len(y)) == bootstrap_auc(y, s, 300)
    with pytest.raises(ValueError, match="one stratum"):
        bootstrap_auc(y, s, 300, strata=["x"] * 3)


def test_pooled_domains_resampled_within_each_domain_cover_at_95_percent_and_are_narrower():
    """Two domains at other score levels, pooled (the combined column): the test set fixes each
    domain's counts, so resampling across domains adds spread that is not there. Within-domain
    resampling covers the true pooled AUC about 95% of the time (300 sets of 4 x 40 images: 0.947
    measured), and is narrower than class-only resampling, which over-covers (0.987 measured)."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for k in range(300):
        labels, scores, domains, true_auc = two_domain_scores(rng, 40)
        by_domain = bootstrap_auc(labels, scores, 300, seed=k, strata=domains)
        by_class = bootstrap_auc(labels, scores, 300, seed=k)
        covered += by_domain.low <= true_auc <= by_domain.high
        widths.append((by_domain.high - by_domain.low) / (by_class.high - by_class.low))
    assert 0.91 <= covered / 300 <= 0.98
    assert float(np.mean(widths)) < 0.85  # measured 0.71


def test_paired_t_diff_matches_a_hand_computation():
    a, b = [0.71, 0.74, 0.70], [0.69, 0.70, 0.69]
    diffs = np.subtract(a, b)
    half = student_t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    got = paired_t_diff(a, b)
    assert (got.mean, got.low, got.high) == pytest.approx((diffs.mean(), diffs.mean() - half, diffs.mean() + half))
    assert got.method == PAIRED_T_SEEDS and got.n == 3
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_t_diff([0.7, 0.8], [0.7])


def test_welch_t_diff_matches_a_hand_computation_and_scipy():
    """Unpaired seeds (0,1,2 against 10,11,12,13): the difference of the means, its standard error
    from each side's own variance, Welch-Satterthwaite degrees of freedom."""
    from scipy.stats import ttest_ind

    a, b = [0.71, 0.74, 0.70], [0.69, 0.70, 0.69, 0.64]
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    half = student_t.ppf(0.975, df) * math.sqrt(va + vb)
    mean = np.mean(a) - np.mean(b)
    got = welch_t_diff(a, b)
    assert (got.mean, got.low, got.high) == pytest.approx((mean, mean - half, mean + half))
    assert got.method == WELCH_T_SEEDS and got.n == 7 and WELCH_T_SEEDS == "Welch t over seeds"
    ci = ttest_ind(a, b, equal_var=False).confidence_interval(0.9)
    assert (welch_t_diff(a, b, 0.9).low, welch_t_diff(a, b, 0.9).high) == pytest.approx((ci.low, ci.high))
    # a lower confidence gives a narrower interval
    assert welch_t_diff(a, b, 0.8).high < got.high


def test_welch_t_diff_without_spread_and_bad_input():
    # no spread on either side: a zero-width interval at the difference (no division by zero)
    flat = welch_t_diff([0.8, 0.8], [0.7, 0.7, 0.7])
    assert (flat.mean, flat.low, flat.high) == pytest.approx((0.1, 0.1, 0.1)) and not flat.includes_zero
    # no spread on one side: the other's t interval with n - 1 degrees of freedom
    one = welch_t_diff([0.8, 0.8, 0.8], [0.70, 0.72, 0.74])
    hand = t_interval([0.8 - v for v in (0.70, 0.72, 0.74)])
    assert (one.mean, one.low, one.high) == pytest.approx((hand.mean, hand.low, hand.high))
    with pytest.raises(ValueError, match="2 or more values on each side"):
        welch_t_diff([0.7, 0.8], [0.7])
    with pytest.raises(ValueError, match="NaN"):
        welch_t_diff([0.7, float("nan")], [0.7, 0.8])
    with pytest.raises(ValueError, match="confidence"):
        welch_t_diff([0.7, 0.8], [0.7, 0.8], confidence=95)


def test_a_difference_that_is_noise_includes_zero():
    # Seeds that scatter around the same AUC: the interval straddles 0.
    noise = paired_t_diff([0.712, 0.705, 0.721], [0.709, 0.716, 0.707])
    assert noise.includes_zero and noise.low < 0 < noise.high
    # Two models that differ only by independent jitter of the same scores, on the same images.
    rng = np.random.default_rng(2)
    labels, scores = model_scores(rng, 200, 1.0)
    other = scores + rng.normal(0, 0.05, scores.size)
    diff = paired_bootstrap_auc_diff(labels, other, scores, n_boot=1000)
    assert diff.method == PAIRED_BOOTSTRAP_IMAGES and diff.includes_zero
    assert diff.mean == pytest.approx(roc_auc(labels, other) - roc_auc(labels, scores))


def test_a_clear_difference_excludes_zero_and_pairing_narrows_it():
    rng = np.random.default_rng(4)
    labels, strong = model_scores(rng, 200, 1.5)
    weak = strong + rng.normal(0, 1.5, strong.size)  # the same images, blurred by noise: lower AUC
    diff = paired_bootstrap_auc_diff(labels, weak, strong, n_boot=1000)
    assert not diff.includes_zero and diff.high < 0
    assert diff.mean == pytest.approx(roc_auc(labels, weak) - roc_auc(labels, strong))
    # Pairing: an image hard for one model is hard for the other, so the paired interval is
    # narrower than an unpaired one (the two separate intervals' widths added in quadrature).
    a, b = bootstrap_auc(labels, weak, 1000), bootstrap_auc(labels, strong, 1000)
    unpaired = math.hypot(a.high - a.low, b.high - b.low)
    assert diff.high - diff.low < 0.85 * unpaired
    clear = paired_t_diff([0.62, 0.64, 0.61], [0.71, 0.72, 0.70])
    assert not clear.includes_zero and clear.high < 0


def test_interval_text_for_a_missing_value():
    assert Interval(math.nan, math.nan, math.nan, 0, T_SEEDS).text() == "n/a"
