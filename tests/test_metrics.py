"""The low-FPR metric definitions against scikit-learn, and Wilson intervals against textbook values."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve

from darkhaloscope import metrics


def sklearn_tpr_at_fpr(y, s, t):
    """Independent derivation from sklearn's operating points: the largest TPR with FPR <= t, and the
    (highest) threshold reaching it."""
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    ok = np.flatnonzero(fpr <= t)
    best = ok[np.argmax(tpr[ok])]
    return tpr[best], thr[best]


def sklearn_fpr_at_tpr(y, s, t):
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    ok = np.flatnonzero(tpr >= t)
    best = ok[np.argmin(fpr[ok])]
    return fpr[best], thr[best]


def _cases():
    rng = np.random.default_rng(7)
    cases = []
    for seed in range(6):  # continuous scores
        n = int(rng.integers(50, 3000))
        y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
        s = rng.normal(size=n) + 1.5 * y
        cases.append((f"random{seed}", y, s))
    for seed in range(6):  # heavy ties: a handful of distinct values, including saturated maxima
        n = int(rng.integers(50, 3000))
        y = (rng.random(n) < 0.3).astype(int)
        s = np.round(rng.normal(size=n) + y, 0).clip(-1, 2)
        cases.append((f"ties{seed}", y, s))
    y = np.r_[np.ones(10), np.zeros(10000)].astype(int)  # exact-equality edge: fpr = 1e-3 at fp = 10
    s = np.r_[np.linspace(5, 6, 10), np.linspace(-3, 5.5, 10000)]
    cases.append(("edge", y, s))
    return cases


@pytest.mark.parametrize("name,y,s", _cases(), ids=[c[0] for c in _cases()])
def test_rates_agree_exactly_with_sklearn(name, y, s):
    pts = metrics.roc_points(y, s)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(pts.fpr, fpr)
    np.testing.assert_array_equal(pts.tpr, tpr)
    np.testing.assert_array_equal(pts.thresholds[1:], thr[1:])
    for t in (1e-4, 1e-3, 1e-2, 0.05, 0.3):
        assert metrics.tpr_at_fpr(pts, t) == sklearn_tpr_at_fpr(y, s, t)
    for t in (0.5, 0.8, 0.85, 0.9, 0.95, 1.0):
        assert metrics.fpr_at_tpr(pts, t) == sklearn_fpr_at_tpr(y, s, t)
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-15)


def test_ties_are_all_or_nothing():
    # 3 positives and 1 control share the top score: a threshold at that score takes all four, so at
    # FPR 0 no positive can be recovered.
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0])
    pts = metrics.roc_points(y, s)
    assert metrics.tpr_at_fpr(pts, 0.1) == (0.0, math.inf)
    assert metrics.tpr_at_fpr(pts, 0.25)[0] == 1.0


def test_no_positives_or_no_controls_give_nan():
    pts = metrics.roc_points(np.zeros(20, int), np.arange(20.0))
    assert all(math.isnan(v) for v in metrics.tpr_at_fpr(pts, 0.1) + metrics.fpr_at_tpr(pts, 0.9))
    pts = metrics.roc_points(np.ones(20, int), np.arange(20.0))
    assert math.isnan(metrics.tpr_at_fpr(pts, 0.1)[0])
    assert math.isnan(metrics.auroc(np.ones(5), np.arange(5.0)))
    s = metrics.roc_summary(np.zeros(5), np.arange(5.0))
    assert s["n_pos"] == 0 and math.isnan(s["tpr@fpr0.0001"])


# Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score, no continuity
# correction), quoted to 4 decimals.
NEWCOMBE_1998 = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)),
                 ((0, 20), (0.0, 0.1611)), ((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize("kn,expected", NEWCOMBE_1998)
def test_wilson_matches_newcombe_1998(kn, expected):
    lo, hi = metrics.wilson_interval(*kn)
    assert (round(lo, 4), round(hi, 4)) == expected


@pytest.mark.parametrize("k,n", [(0, 1), (3, 10), (50, 10000), (9999, 10000), (10, 10)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(method="wilson")
    lo, hi = metrics.wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12)


def test_wilson_empty_is_nan():
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_fpr_target_estimable_rule():
    assert metrics.fpr_target_estimable(10_000, 1e-4)
    assert not metrics.fpr_target_estimable(9_999, 1e-4)
    assert not metrics.fpr_target_estimable(10_000, 1e-4, min_neg_per_fpr=10)
    assert not metrics.fpr_target_estimable(0, 0.5)


def test_recall_at_threshold_counts_ties():
    assert metrics.recall_at_threshold([1.0, 2.0, 2.0, 3.0], 2.0) == (3, 4)
    assert metrics.recall_at_threshold([1.0, 2.0], math.inf) == (0, 2)
