"""Low-FPR classification metrics with the field's definitions (see docs/evaluation.md).

* tpr@fpr t: the largest TPR over thresholds whose FPR on the controls is <= t.
* fpr@tpr t: the smallest FPR over thresholds whose TPR is >= t.
* A threshold v classifies ``score >= v`` as positive, so it takes all tied scores or none.
* Rank by float32 logits, never by (saturating) probabilities.

The operating points are exactly those of ``sklearn.metrics.roc_curve(drop_intermediate=False)``
(tests check this); they are computed here with one sort so that a single pass can evaluate many
targets and strata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass(frozen=True)
class RocPoints:
    """ROC operating points, thresholds descending; the first point is (0, 0) at +inf."""

    tp: np.ndarray
    fp: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tp / self.n_pos if self.n_pos else np.full(self.tp.shape, np.nan)

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.n_neg if self.n_neg else np.full(self.fp.shape, np.nan)


def roc_points(y_true, scores) -> RocPoints:
    """y_true: 1 = lens (positive), 0 = control. scores: higher = more lens-like (use logits)."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1] if s.size else np.array([], int)
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(1 - y_sorted)[last_of_run]
    return RocPoints(
        tp=np.r_[0, tp].astype(np.int64),
        fp=np.r_[0, fp].astype(np.int64),
        thresholds=np.r_[np.inf, s_sorted[last_of_run]],
        n_pos=int(y.sum()),
        n_neg=int(y.size - y.sum()),
    )


def tpr_at_fpr(points: RocPoints, target: float) -> tuple[float, float]:
    """(tpr, threshold) at the best threshold whose FPR <= target; NaN when there are no positives or
    no controls."""
    if points.n_pos == 0 or points.n_neg == 0:
        return math.nan, math.nan
    allowed = np.flatnonzero(points.fp <= target * points.n_neg * (1 + 1e-12))
    best = allowed[np.argmax(points.tp[allowed])]  # first (highest threshold) among the maxima
    return float(points.tp[best] / points.n_pos), float(points.thresholds[best])


def fpr_at_tpr(points: RocPoints, target: float) -> tuple[float, float]:
    """(fpr, threshold) at the best threshold whose TPR >= target; NaN without positives or controls."""
    if points.n_pos == 0 or points.n_neg == 0:
        return math.nan, math.nan
    reached = np.flatnonzero(points.tp >= target * points.n_pos * (1 - 1e-12))
    best = reached[np.argmin(points.fp[reached])]
    return float(points.fp[best] / points.n_neg), float(points.thresholds[best])


def auroc(y_true, scores) -> float:
    y = np.asarray(y_true)
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def n_tied_top(scores) -> int:
    """How many samples share the highest score: >1 in large numbers means saturated scores."""
    s = np.asarray(scores)
    return int((s == s.max()).sum()) if s.size else 0


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial rate k/n (95% by default); NaN for n = 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 and k = n the bound is exactly 0 / 1 (the float formula can miss it by one ulp)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def roc_summary(y_true, logits, fpr_targets=(1e-2, 1e-3, 1e-4), tpr_targets=(0.85,)) -> dict:
    """The per-epoch validation summary: AUROC, tpr@fpr and fpr@tpr at the targets, counts, ties."""
    points = roc_points(y_true, logits)
    out: dict = {"auroc": auroc(y_true, logits), "n_pos": points.n_pos, "n_neg": points.n_neg,
                 "n_tied_top": n_tied_top(logits)}
    for t in fpr_targets:
        out[f"tpr@fpr{t:g}"] = tpr_at_fpr(points, t)[0]
    for t in tpr_targets:
        out[f"fpr@tpr{t:g}"] = fpr_at_tpr(points, t)[0]
    return out


def fpr_target_estimable(n_neg: int, target: float, min_neg_per_fpr: float = 1.0) -> bool:
    """Can a false-positive rate of ``target`` be resolved with ``n_neg`` controls?

    The rule used by ``dhs eval`` (docs/evaluation.md): at least ``min_neg_per_fpr / target`` controls,
    i.e. the target must allow at least ``min_neg_per_fpr`` false positives. With fewer controls the
    only reachable FPR below the target is 0, and tpr@fpr would silently become TPR0."""
    return n_neg > 0 and n_neg * target >= min_neg_per_fpr * (1 - 1e-12)


def recall_at_threshold(pos_scores, threshold: float) -> tuple[int, int]:
    """(number of positives with score >= threshold, number of positives): the same rule as a ROC
    threshold (ties at the threshold count as recovered)."""
    s = np.asarray(pos_scores, dtype=np.float64)
    return int((s >= threshold).sum()), int(s.size)
