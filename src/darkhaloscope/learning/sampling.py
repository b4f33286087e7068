"""Sampling policy of the training stream: which rows an epoch draws and in what order. The curriculum cuts, the
matching of controls to the positives' observing conditions, the hard negatives' weights, the per-epoch draws and
their order, and the cut of the sequence into batches per rank and lane (the plan, ``stream`` module docstring).
No reading and no torch: ``stream`` reads the rows this policy picks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.stamps import contract
from darkhaloscope.stamps import dataset

if TYPE_CHECKING:  # annotations only
    from darkhaloscope.learning.stream import SplitIndex


CUT_COLUMNS = ("theta_e_arcsec", "arc_snr", "psf_fwhm_used_r", "psfsize_r")
MATCH_COLUMNS = ("psfsize_r", "psfdepth_r")


def curriculum_mask(index: SplitIndex, min_theta_over_psf: float | None, min_arc_snr: float | None) -> np.ndarray:
    """True for rows kept by the cuts: every control, and positives with theta_E / PSF >=
    min_theta_over_psf and arc_snr >= min_arc_snr (PSF: contract.resolution_psf). NaN fails a cut."""
    keep = np.ones(len(index), bool)
    pos = index.label == 1
    if min_theta_over_psf:
        psf = contract.resolution_psf(index.columns["psf_fwhm_used_r"], index.columns["psfsize_r"])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = index.columns["theta_e_arcsec"] / psf
        keep &= ~pos | (ratio >= min_theta_over_psf)
    if min_arc_snr:
        keep &= ~pos | (index.columns["arc_snr"] >= min_arc_snr)
    return keep


def cuts_active(min_theta_over_psf, min_arc_snr) -> bool:
    return bool(min_theta_over_psf) or bool(min_arc_snr)


def _cell_ids(cond: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """2-D histogram cell of each row; a NaN coordinate gets its own bin along that axis."""
    ids = np.zeros(len(cond), np.int64)
    for d, e in enumerate(edges):
        x = cond[:, d]
        b = np.clip(np.searchsorted(e, x, side="right") - 1, 0, len(e) - 2)
        b = np.where(np.isfinite(x), b, len(e) - 1)
        ids = ids * len(e) + b
    return ids


def control_match_weights(pos_cond: np.ndarray, ctrl_cond: np.ndarray, base_weight: np.ndarray,
                          n_bins: int | None = None) -> np.ndarray:
    """Importance weights that make the (base-weighted) controls' distribution of the condition columns
    (psfsize_r, psfdepth_r) equal to the kept positives' on a 2-D histogram with quantile bins:
    w_i = base_i * p_pos(cell_i) / p_ctrl(cell_i), scaled to mean 1 over the controls.
    Controls in cells without positives get weight 0 (they would tell the classes apart)."""
    n_pos, n_ctrl = len(pos_cond), len(ctrl_cond)
    if n_pos == 0 or n_ctrl == 0:
        return base_weight.astype(np.float64)
    if n_bins is None:  # about 20 rows per cell of the smaller class, 2..10 bins per axis
        n_bins = int(np.clip(math.sqrt(min(n_pos, n_ctrl) / 20.0), 2, 10))
    edges = []
    for d in range(pos_cond.shape[1]):
        both = np.concatenate([pos_cond[:, d], ctrl_cond[:, d]])
        both = both[np.isfinite(both)]
        e = np.unique(np.quantile(both, np.linspace(0, 1, n_bins + 1))) if both.size else np.array([0.0, 1.0])
        if len(e) < 2:
            e = np.array([e[0], e[0] + 1.0])
        edges.append(e)
    cells_p = _cell_ids(pos_cond, edges)
    cells_c = _cell_ids(ctrl_cond, edges)
    n_cells = int(np.prod([len(e) for e in edges]))
    p_pos = np.bincount(cells_p, minlength=n_cells) / n_pos
    p_ctrl = np.bincount(cells_c, weights=base_weight, minlength=n_cells) / base_weight.sum()
    ratio = np.divide(p_pos, p_ctrl, out=np.zeros(n_cells), where=p_ctrl > 0)
    w = base_weight * ratio[cells_c]
    return w * (n_ctrl / w.sum()) if w.sum() > 0 else w


def metadata_auc(cond: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None, seed: int = 0) -> float:
    """How well the conditions alone predict the label: 2-fold cross-validated logistic regression on
    quadratic features, (sample-)weighted AUC on the held-out folds. ~0.5 = no leak."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    weight = np.ones(len(label)) if weight is None else np.asarray(weight, float)
    use = weight > 0
    x = np.nan_to_num(np.asarray(cond, float)[use], nan=0.0)
    y, w = np.asarray(label)[use], weight[use]
    if len(np.unique(y)) < 2 or len(y) < 8:
        return math.nan
    fold = np.random.default_rng(seed).integers(0, 2, len(y))
    scores = np.zeros(len(y))
    for f in (0, 1):
        tr, te = fold != f, fold == f
        if len(np.unique(y[tr])) < 2:
            return math.nan
        clf = make_pipeline(StandardScaler(), PolynomialFeatures(2), LogisticRegression(max_iter=500))
        clf.fit(x[tr], y[tr], logisticregression__sample_weight=w[tr])
        scores[te] = clf.decision_function(x[te])
    return float(roc_auc_score(y, scores, sample_weight=w))


def read_hard_negatives(path: str) -> np.ndarray:
    """task_ids of a mined hard-negative parquet (int64 or str, as ``dataset.as_id_values``); a missing
    or unreadable file is an error."""
    import os

    if not os.path.exists(path):
        raise DHSError(f"hard-negative file {path} does not exist")
    if os.path.isdir(path):
        raise DHSError(f"hard-negative file {path} is a directory")
    try:
        table = pq.read_table(path, columns=["task_id"])
    except Exception as exc:
        raise DHSError(f"hard-negative file {path} is unreadable or has no task_id column: {exc}") from None
    return np.unique(dataset.as_id_values(table.column("task_id"), f"hard-negative file {path}"))


def draw_counts(weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How often each row is drawn this epoch: floor(w) plus one with probability frac(w)."""
    base = np.floor(weight)
    return (base + (rng.random(len(weight)) < weight - base)).astype(np.int64)


def epoch_sequence(index: SplitIndex, weight: np.ndarray | None, seed: int, epoch: int, shuffle: bool,
                   window: int) -> np.ndarray:
    """The epoch's global sequence of index positions (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch, 7919])
    n = len(index)
    counts = np.ones(n, np.int64) if weight is None else draw_counts(weight, rng)
    rows = np.repeat(np.arange(n), counts)
    if not shuffle:
        return rows
    rg_global = index.file_id.astype(np.int64) * (1 << 32) + index.row_group
    uniq, rg_of_row = np.unique(rg_global, return_inverse=True)
    rg_rank = rng.permutation(len(uniq))[rg_of_row]
    # row groups in a random order; the rows of one row group stay together (I/O locality) until the
    # window shuffle mixes them with the other row groups of their window
    seq = rows[np.argsort(rg_rank[rows], kind="stable")]
    return _shuffle_windows(seq, counts, rng, window)


def _shuffle_windows(seq: np.ndarray, counts: np.ndarray, rng: np.random.Generator, window: int) -> np.ndarray:
    """Shuffle ``seq`` within consecutive windows; the m copies of a row get keys (j + u) / m, which
    spreads them evenly through the window instead of letting them cluster in one batch."""
    n = len(seq)
    if n == 0:
        return seq
    # copy index of each occurrence of a row within seq
    order = np.argsort(seq, kind="stable")
    sorted_rows = seq[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
    run_len = np.diff(np.r_[starts, n])
    copy_sorted = np.arange(n) - np.repeat(starts, run_len)
    copy = np.empty(n, np.int64)
    copy[order] = copy_sorted
    u_row = rng.random(len(counts))
    mult = counts[seq]
    single = mult == 1
    key = np.where(single, rng.random(n), (copy + u_row[seq]) / np.maximum(mult, 1))
    win = np.arange(n) // max(int(window), 1)
    return seq[np.lexsort((key, win))]


def split_batches(n_draws: int, world_size: int, lanes: int, batch_size: int) -> np.ndarray:
    """Boundaries of world_size*lanes*k near-equal contiguous batches (k the same for all)."""
    per = world_size * lanes
    k = max(1, math.ceil(n_draws / (per * batch_size)))
    return np.linspace(0, n_draws, per * k + 1).round().astype(np.int64)

