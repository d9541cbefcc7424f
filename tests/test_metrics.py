"""trueface.metrics against values computed by hand on tiny arrays."""

import math
import warnings

import numpy as np
import pytest

from trueface.metrics import (
    METRIC_KEYS,
    THRESHOLD_POLICIES,
    binary_metrics,
    choose_threshold,
    confusion_matrix,
    expected_calibration_error,
    roc_auc,
    roc_curve,
    validate_threshold_policy,
)

# --------------------------------------------------------------------------- AUC / ROC


def test_auc_with_tie_by_hand():
    # fakes 0.6, 0.9 vs reals 0.2, 0.6: pairs 0.6>0.2 (1), 0.6=0.6 (1/2), 0.9>0.2 (1), 0.9>0.6 (1) -> 3.5/4
    assert roc_auc([0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9]) == pytest.approx(0.875)


def test_auc_perfect_and_inverted():
    assert roc_auc([0, 1], [0.1, 0.9]) == 1.0
    assert roc_auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_auc_one_class_is_nan_without_warning(labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(roc_auc(labels, [0.3] * len(labels)))


def test_roc_curve_points():
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    # Last point is always (1, 1); the curve is monotone in both rates.
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thresholds) < 0)
    # At threshold 0.8 only the top fake is flagged: (fpr, tpr) = (0, 0.5).
    i = int(np.flatnonzero(thresholds == 0.8)[0])
    assert (fpr[i], tpr[i]) == (0.0, 0.5)


def test_roc_curve_one_class_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fpr, tpr, _ = roc_curve([1, 1], [0.2, 0.3])
    assert np.all(np.isnan(fpr))
    assert tpr[-1] == 1.0


# --------------------------------------------------------------------------- confusion / binary metrics


def test_confusion_matrix_layout():
    labels = [0, 0, 0, 1, 1, 1, 1]
    preds = [0, 1, 0, 1, 0, 1, 1]
    # tn = 2 (idx 0, 2), fp = 1 (idx 1), fn = 1 (idx 4), tp = 3 (idx 3, 5, 6)
    cm = confusion_matrix(labels, preds)
    assert cm.shape == (2, 2)
    assert cm.dtype.kind == "i"
    assert cm.tolist() == [[2, 1], [1, 3]]


def test_binary_metrics_by_hand():
    labels = [0, 1, 0, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.75, 0.9]
    m = binary_metrics(labels, scores, 0.5)
    assert tuple(m) == METRIC_KEYS
    # Predicted fake: 0.6 (real), 0.75, 0.9 (fake) -> tp 2, fp 1, fn 1 (0.2), tn 1 (0.1)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 1, 2)
    assert (m["n"], m["n_real"], m["n_fake"]) == (5, 2, 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # AUC: fakes 0.2, 0.75, 0.9 vs reals 0.1, 0.6 -> wins 1+0+1+1+1+1 = 5 of 6
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["threshold"] == 0.5
    # ECE does not depend on the threshold (hand checks are in the ECE tests below).
    assert m["ece"] == expected_calibration_error(labels, scores)
    assert m["brier"] == pytest.approx((0.1**2 + 0.8**2 + 0.6**2 + 0.25**2 + 0.1**2) / 5)
    assert all(type(m[k]) is int for k in ("n", "n_real", "n_fake", "tn", "fp", "fn", "tp"))


def test_threshold_is_inclusive():
    m = binary_metrics([0, 1], [0.5, 0.5], 0.5)
    assert (m["fp"], m["tp"]) == (1, 1)


def test_zero_division_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Nothing predicted fake: precision 0/0, f1 0/0.
        m = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], 0.9)
        assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
        # No fakes at all: recall 0/0, AUC nan.
        m = binary_metrics([0, 0], [0.1, 0.2], 0.5)
        assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
        assert math.isnan(m["auc"])
        assert m["accuracy"] == 1.0


# --------------------------------------------------------------------------- ECE


def test_ece_two_bins_by_hand():
    # n_bins=2: bins [0, 0.5] and (0.5, 1].  p=0.5 -> predicted fake, confidence 0.5, right -> bin 1;
    # p=0.9 -> fake, conf 0.9, right; p=0.2 -> real, conf 0.8, wrong (label 1) -> bin 2.
    # ECE = 1/3*|1 - 0.5| + 2/3*|0.5 - 0.85| = 1/6 + 0.7/3 = 0.4
    # (had 0.5 gone into the upper bin, it would be |2 - 2.2| / 3 = 0.0667)
    assert expected_calibration_error([1, 1, 1], [0.5, 0.9, 0.2], n_bins=2) == pytest.approx(0.4)


def test_ece_four_bins_by_hand():
    # confidences 0.9 R, 0.8 W | 0.7 R, 0.6 W, 0.6 R
    # (0.75,1]: 2/5*|0.5-0.85| = 0.14 ; (0.5,0.75]: 3/5*|2/3-19/30| = 0.02
    ece = expected_calibration_error([1, 0, 0, 1, 1], [0.9, 0.8, 0.3, 0.4, 0.6], n_bins=4)
    assert ece == pytest.approx(0.16)


def test_ece_perfectly_confident_and_right_is_zero():
    assert expected_calibration_error([0, 1, 1], [0.0, 1.0, 1.0]) == 0.0
    assert expected_calibration_error([0, 1], [1.0, 0.0]) == 1.0


@pytest.mark.parametrize("n_bins", [0, -1, 2.5, True])
def test_ece_bad_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0, 1], [0.2, 0.7], n_bins=n_bins)


def test_ece_rejects_non_probabilities():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [0.2, 1.7])


# --------------------------------------------------------------------------- thresholds

# Reals at 0.1, 0.6; fakes at 0.2, 0.75, 0.9.  Per candidate threshold t (fake if score >= t):
#   t     tp fp  J=tpr-fpr  F1     accuracy
#   0.1   3  2   0          6/8    3/5
#   0.2   3  1   1/2        6/7    4/5
#   0.5   2  1   1/6        4/6    3/5     (same split as 0.6)
#   0.75  2  0   2/3        4/5    4/5
#   0.9   1  0   1/3        2/4    3/5
POLICY_LABELS = [0, 1, 0, 1, 1]
POLICY_SCORES = [0.1, 0.2, 0.6, 0.75, 0.9]


@pytest.mark.parametrize(
    "policy, expected",
    [
        # J = 2/3 for every t in (0.6, 0.75]: its end nearest 0.5, just above the real 0.6
        ("youden", np.nextafter(0.6, np.inf)),
        ("max_f1", 0.2),
        # accuracy 4/5 in (0.1, 0.2] and in (0.6, 0.75]: just above 0.6 is closest to 0.5
        ("max_accuracy", np.nextafter(0.6, np.inf)),
        ("fixed:0.3", 0.3),
        ("fixed:1", 1.0),
    ],
)
def test_choose_threshold_policies(policy, expected):
    assert choose_threshold(POLICY_LABELS, POLICY_SCORES, policy) == expected


def test_youden_tie_prefers_closest_to_half():
    # Separable: every t in (0.2, 0.8] gives J = 1, and 0.5 is among them.
    assert choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], "youden") == 0.5
    # Separable with the gap above 0.5: every t in (0.6, 0.8] gives J = 1; the one closest to
    # 0.5 is the smallest that calls the highest real (0.6) real, not the lowest fake (0.8).
    t = choose_threshold([0, 0, 1, 1], [0.55, 0.6, 0.8, 0.9], "youden")
    assert t == np.nextafter(0.6, np.inf)
    assert binary_metrics([0, 0, 1, 1], [0.55, 0.6, 0.8, 0.9], t)["fp"] == 0


def test_a_best_range_above_half_gives_its_end_nearest_half():
    """The mirror images of a best range below and above 0.5 both give the end nearest 0.5: a
    threshold at the lowest validation fake would miss held-out fakes scored just below it."""
    above = choose_threshold([0, 0, 1, 1], [0.55, 0.60, 0.95, 0.97], "youden")  # best t in (0.60, 0.95]
    below = choose_threshold([0, 0, 1, 1], [0.03, 0.05, 0.40, 0.45], "youden")  # best t in (0.05, 0.40]
    assert below == 0.40 and 0.60 < above < 0.60 + 1e-12
    held_out_labels, held_out_scores = [0, 0, 1, 1, 1, 1], [0.50, 0.58, 0.70, 0.80, 0.90, 0.96]
    assert binary_metrics(held_out_labels, held_out_scores, above)["recall"] == 1.0
    for policy in ("max_f1", "max_accuracy"):
        assert choose_threshold([0, 0, 1, 1], [0.55, 0.60, 0.95, 0.97], policy) == above


def test_equidistant_tie_takes_lower_threshold():
    # Reals 0.1, 0.7; fakes 0.3, 0.8: J = 1/2 for t in (0.1, 0.3] and in (0.7, 0.8] (J = 0 at 0.5);
    # the ends nearest 0.5, 0.3 and just above 0.7, are 0.2 from it up to rounding: the lower wins.
    assert choose_threshold([0, 1, 0, 1], [0.1, 0.3, 0.7, 0.8], "youden") == 0.3
    # 0.25 and just above 0.75: 0.25 from 0.5 up to one step of a float
    assert choose_threshold([0, 1, 0, 1], [0.1, 0.25, 0.75, 0.8], "youden") == 0.25
    # Reals 0.1, 0.6; fakes 0.25, 0.75: the upper range (0.6, 0.75] reaches 0.1 from 0.5, the
    # lower one (0.1, 0.25] only 0.25: just above 0.6 wins
    assert choose_threshold([0, 1, 0, 1], [0.1, 0.25, 0.6, 0.75], "youden") == np.nextafter(0.6, np.inf)


def test_max_accuracy_can_predict_everything_real():
    # Fakes scored below reals: flagging nothing (t above the maximum) is the most accurate.
    t = choose_threshold([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], "max_accuracy")
    assert t > 0.4
    assert binary_metrics([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], t)["accuracy"] == 0.75


@pytest.mark.parametrize("policy", ["youden", "max_f1", "max_accuracy"])
def test_one_class_falls_back_to_half(policy):
    assert choose_threshold([1, 1, 1], [0.9, 0.8, 0.95], policy) == 0.5


def test_chosen_threshold_reproduces_best_f1():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.clip(0.3 * labels + rng.uniform(0, 0.7, 60), 0, 1)
    t = choose_threshold(labels, scores, "max_f1")
    best = binary_metrics(labels, scores, t)["f1"]
    assert all(binary_metrics(labels, scores, u)["f1"] <= best + 1e-12 for u in np.unique(scores))


def test_policy_constants_and_validation():
    assert THRESHOLD_POLICIES == ("youden", "max_f1", "max_accuracy", "fixed:<p>")
    for ok in ("youden", "max_f1", "max_accuracy", "fixed:0", "fixed:0.5", "fixed:1.0"):
        validate_threshold_policy(ok)


@pytest.mark.parametrize(
    "policy, match",
    [
        ("bogus", r"'bogus'.*youden.*max_f1.*max_accuracy.*fixed"),
        ("Youden", r"'Youden'.*valid policies"),
        ("fixed:", r"'fixed:'"),
        ("fixed:abc", r"'abc' is not a number"),
        ("fixed:1.5", r"\[0, 1\]"),
        ("fixed:-0.1", r"\[0, 1\]"),
        ("fixed:nan", r"\[0, 1\]"),
        (None, r"expected a string"),
    ],
)
def test_bad_policy_raises(policy, match):
    with pytest.raises(ValueError, match=match):
        validate_threshold_policy(policy)
    with pytest.raises(ValueError, match=match):
        choose_threshold([0, 1], [0.2, 0.8], policy)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "call",
    [
        lambda: roc_auc([0, 1, 1], [0.1, 0.2]),
        lambda: binary_metrics([0, 1], [0.1, 0.2, 0.3], 0.5),
        lambda: confusion_matrix([0, 1], [1]),
        lambda: expected_calibration_error([0], [0.1, 0.2]),
        lambda: choose_threshold([0, 1], [0.5], "youden"),
    ],
)
def test_length_mismatch(call):
    with pytest.raises(ValueError, match="differ in length"):
        call()


@pytest.mark.parametrize("labels", [[0, 2], [-1, 1], [0, 0.5], [0, float("nan")], ["a", "b"]])
def test_labels_must_be_binary(labels):
    with pytest.raises(ValueError, match="labels must be"):
        binary_metrics(labels, [0.1, 0.9], 0.5)


def test_preds_must_be_binary():
    with pytest.raises(ValueError, match="preds must be 0"):
        confusion_matrix([0, 1], [0, 3])


def test_labels_accept_bool_and_float():
    assert confusion_matrix(np.array([False, True]), [0.0, 1.0]).tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("scores", [[0.1, float("nan")], [0.1, float("inf")]])
def test_scores_must_be_finite(scores):
    with pytest.raises(ValueError, match="scores must be finite"):
        roc_auc([0, 1], scores)


def test_scores_must_be_numbers_and_1d():
    with pytest.raises(ValueError, match="scores must be numbers"):
        roc_auc([0, 1], ["x", "y"])
    with pytest.raises(ValueError, match="1-D"):
        roc_auc([0, 1], [[0.1], [0.2]])


def test_empty_input():
    with pytest.raises(ValueError, match="empty"):
        binary_metrics([], [], 0.5)


def test_binary_metrics_scores_outside_unit_interval():
    with pytest.raises(ValueError, match="scores must be probabilities"):
        binary_metrics([0, 1], [-0.2, 0.9], 0.5)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "high", None])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold must be"):
        binary_metrics([0, 1], [0.2, 0.8], threshold)


def test_roc_matches_scikit_learn_on_random_tied_scores():
    from sklearn.metrics import roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(n), 1)  # many ties
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        fpr, tpr, thresholds = roc_curve(labels, scores)
        sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
        assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr) and np.allclose(thresholds[1:], sk_thr[1:])
