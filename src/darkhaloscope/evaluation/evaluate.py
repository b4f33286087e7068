"""`dhs eval`: the stratified tpr@fpr / fpr@tpr table, AUROC per stratum and the completeness table.

Definitions (see docs/evaluation.md and ``darkhaloscope.metrics``): ranking by float32 ``logit``; a
threshold takes all tied scores or none; positives are binned by theta_E, by theta_E/PSF and by arc_snr
(the injected arc's integrated r-band S/N), controls are never binned (every stratum shares all controls,
so a tpr@fpr cut is one global cut on the controls).

Beside each model figure stands the matched-filter reference ``mf_value`` / ``mf_auroc``: the same figure
for an ideal detector that sees each lens as N(arc_snr, 1) and each control as N(0, 1) (``mf_*``
functions). It is empty where a positive of the stratum has no arc_snr (real data), never guessed.

Outputs (fixed names, declared by the workflow):
* ``--out_csv`` (e.g. ``gen3_stratified_fpr.csv``): one row per (stratum, metric, target).
* ``<stem>_auroc.csv``: AUROC per stratum.
* ``<stem>_completeness.csv``: recall per (theta_E bin, theta_E/PSF bin) cell at one global threshold.
* ``<stem>_completeness_snr.csv``: recall per (theta_E/PSF bin, arc_snr bin) cell at the same threshold.

The operating point of completeness (its FPR target and global threshold) is computed once here and written
into both completeness tables; `dhs report` reads it from there. Bins, targets, score loading, the table
names and columns live in ``evaluation.strata``, shared with the report.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from darkhaloscope.errors import DHSError
from darkhaloscope import metrics
from darkhaloscope.evaluation.strata import (
    AUROC_COLUMNS, COMPLETENESS_COLUMNS, COMPLETENESS_SNR_COLUMNS, DEFAULT_FPR_TARGETS, DEFAULT_RES_BINS,
    DEFAULT_SNR_BINS, DEFAULT_THETA_BINS, DEFAULT_TPR_TARGETS, STRATUM_ALL, STRATUM_RES, STRATUM_SNR, STRATUM_THETA,
    TABLE_COLUMNS, OperatingPoint, bin_index, load_scores, parse_bins, parse_targets, table_paths)
from darkhaloscope.io import atomic_output, check_writable, refuse_overwrite, same_file

log = logging.getLogger("dhs.eval")


# ----------------------------------------------------------------------------------------------------
# The matched-filter reference (analytic)
# ----------------------------------------------------------------------------------------------------
# An ideal detector that knew each arc and its background exactly would score a lens as N(arc_snr, 1) and a
# control as N(0, 1). arc_snr is the r-band S/N of the arc over its pixels above 1 sigma, so a real matched
# filter over all pixels and the three bands can do somewhat better at low arc_snr, and a finder that does
# not know where the arc is does worse: a reference for "how findable is this stratum", not a hard bound.
# Written out (scipy gives Phi) because no library evaluates these mixtures.

def _snr_or_none(snr) -> np.ndarray | None:
    s = np.asarray(snr, dtype=np.float64).ravel()
    return s if s.size and np.isfinite(s).all() else None


def mf_tpr_at_fpr(snr, fpr: float) -> float:
    """Mean over positives of 1 - Phi(Phi^-1(1 - fpr) - arc_snr); NaN if any arc_snr is missing."""
    from scipy.stats import norm

    s = _snr_or_none(snr)
    return math.nan if s is None else float(norm.sf(norm.isf(fpr) - s).mean())


def mf_fpr_at_tpr(snr, tpr: float) -> float:
    """The FPR 1 - Phi(c) at the cut c where the mean TPR over positives reaches ``tpr``."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    s = _snr_or_none(snr)
    if s is None:
        return math.nan
    lo, hi = -40.0 + s.min(), 40.0 + s.max()  # mean TPR is ~1 at lo and ~0 at hi, monotonic between
    c = brentq(lambda c: norm.sf(c - s).mean() - tpr, lo, hi, xtol=1e-10)
    return float(norm.sf(c))


def mf_auroc(snr) -> float:
    """P(lens > control) = mean Phi(arc_snr / sqrt(2))."""
    from scipy.stats import norm

    s = _snr_or_none(snr)
    return math.nan if s is None else float(norm.cdf(s / math.sqrt(2.0)).mean())


# ----------------------------------------------------------------------------------------------------
# Strata and tables
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stratum:
    name: str
    lo: float
    hi: float
    pos_rank: np.ndarray  # ranking keys of the stratum's positives
    pos_snr: np.ndarray   # their arc_snr (NaN where unknown)


def make_strata(df: pd.DataFrame, theta_bins: np.ndarray, res_bins: np.ndarray,
                snr_bins: np.ndarray | None = None) -> list[Stratum]:
    """The ``all`` stratum, then theta_E, theta_E/PSF and arc_snr bins (``snr_bins`` None: the default)."""
    snr_bins = parse_bins(DEFAULT_SNR_BINS, open_top=True) if snr_bins is None else snr_bins
    pos = df[df["y"] == 1]
    rank = pos["rank"].to_numpy()
    snr = pos["arc_snr"].to_numpy(np.float64) if "arc_snr" in pos else np.full(len(pos), np.nan)
    out = [Stratum(STRATUM_ALL, math.nan, math.nan, rank, snr)]
    for name, values, edges in ((STRATUM_THETA, pos["theta_e_arcsec"].to_numpy(np.float64), theta_bins),
                                (STRATUM_RES, pos["theta_over_psf"].to_numpy(np.float64), res_bins),
                                (STRATUM_SNR, snr, snr_bins)):
        idx = bin_index(values, edges)
        for b in range(edges.size - 1):
            out.append(Stratum(name, float(edges[b]), float(edges[b + 1]), rank[idx == b], snr[idx == b]))
    return out


def _points(stratum: Stratum, neg_rank: np.ndarray) -> metrics.RocPoints:
    y = np.r_[np.ones(stratum.pos_rank.size, np.int8), np.zeros(neg_rank.size, np.int8)]
    return metrics.roc_points(y, np.r_[stratum.pos_rank, neg_rank])


def stratified_table(df: pd.DataFrame, theta_bins, res_bins, tpr_targets, fpr_targets,
                     min_neg_per_fpr: float = 1.0, snr_bins=None) -> pd.DataFrame:
    """One row per (stratum, metric, target). Empty (NaN) value/CI/threshold where it cannot be
    estimated: no positives in the stratum, no controls, or (tpr@fpr) fewer than
    ``min_neg_per_fpr / target`` controls. ``mf_value``: the matched-filter reference (needs only the
    positives' arc_snr, so it is there even where the controls are too few for the model's value)."""
    neg_rank = df.loc[df["y"] == 0, "rank"].to_numpy()
    n_neg = int(neg_rank.size)
    rows = []
    for st in make_strata(df, theta_bins, res_bins, snr_bins):
        n_pos = int(st.pos_rank.size)
        pts = _points(st, neg_rank) if n_pos and n_neg else None
        base = {"stratum": st.name, "bin_lo": st.lo, "bin_hi": st.hi, "n_pos": n_pos, "n_neg": n_neg}
        for t in fpr_targets:
            row = dict(base, metric="tpr@fpr", target=t, value=math.nan, ci_low=math.nan, ci_high=math.nan,
                       threshold=math.nan, mf_value=mf_tpr_at_fpr(st.pos_snr, t))
            if pts is not None and metrics.fpr_target_estimable(n_neg, t, min_neg_per_fpr):
                tpr, thr = metrics.tpr_at_fpr(pts, t)
                k = int(round(tpr * n_pos))
                row.update(value=tpr, threshold=thr)
                row["ci_low"], row["ci_high"] = metrics.wilson_interval(k, n_pos)
            rows.append(row)
        for t in tpr_targets:
            row = dict(base, metric="fpr@tpr", target=t, value=math.nan, ci_low=math.nan, ci_high=math.nan,
                       threshold=math.nan, mf_value=mf_fpr_at_tpr(st.pos_snr, t))
            if pts is not None:
                fpr, thr = metrics.fpr_at_tpr(pts, t)
                k = int(round(fpr * n_neg))
                row.update(value=fpr, threshold=thr)
                row["ci_low"], row["ci_high"] = metrics.wilson_interval(k, n_neg)
            rows.append(row)
    return _typed(pd.DataFrame(rows, columns=TABLE_COLUMNS))


def auroc_table(df: pd.DataFrame, theta_bins, res_bins, snr_bins=None) -> pd.DataFrame:
    neg_rank = df.loc[df["y"] == 0, "rank"].to_numpy()
    rows = []
    for st in make_strata(df, theta_bins, res_bins, snr_bins):
        y = np.r_[np.ones(st.pos_rank.size, np.int8), np.zeros(neg_rank.size, np.int8)]
        rows.append({"stratum": st.name, "bin_lo": st.lo, "bin_hi": st.hi, "n_pos": int(st.pos_rank.size),
                     "n_neg": int(neg_rank.size), "auroc": metrics.auroc(y, np.r_[st.pos_rank, neg_rank]),
                     "mf_auroc": mf_auroc(st.pos_snr)})
    return _typed(pd.DataFrame(rows, columns=AUROC_COLUMNS))


def _completeness(df: pd.DataFrame, axes, op: OperatingPoint, columns, with_mf: bool = False) -> pd.DataFrame:
    """Recall per cell of two binned positive columns, ``axes`` = ((column, edges, prefix), x2), at the
    operating point ``op`` (the global tpr@fpr threshold of all positives)."""
    pos = df[df["y"] == 1]
    target, threshold = op.fpr, op.threshold
    (col_a, edges_a, pre_a), (col_b, edges_b, pre_b) = axes
    ia = bin_index(pos[col_a].to_numpy(np.float64), edges_a)
    ib = bin_index(pos[col_b].to_numpy(np.float64), edges_b)
    rank = pos["rank"].to_numpy()
    snr = pos["arc_snr"].to_numpy(np.float64) if "arc_snr" in pos else np.full(len(pos), np.nan)
    rows = []
    for a in range(edges_a.size - 1):
        for b in range(edges_b.size - 1):
            sel = (ia == a) & (ib == b)
            cell = rank[sel]
            row = {f"{pre_a}_lo": edges_a[a], f"{pre_a}_hi": edges_a[a + 1], f"{pre_b}_lo": edges_b[b],
                   f"{pre_b}_hi": edges_b[b + 1], "n_pos": int(cell.size), "n_recovered": math.nan,
                   "recall": math.nan, "ci_low": math.nan, "ci_high": math.nan, "fpr_target": target,
                   "threshold": threshold}
            if cell.size and math.isfinite(threshold):
                k, n = metrics.recall_at_threshold(cell, threshold)
                row.update(n_recovered=k, recall=k / n)
                row["ci_low"], row["ci_high"] = metrics.wilson_interval(k, n)
            if with_mf:
                row["mf_recall"] = mf_tpr_at_fpr(snr[sel], target) if cell.size and math.isfinite(target) \
                    else math.nan
            rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    out["n_recovered"] = out["n_recovered"].astype("Int64")
    return out


def completeness_table(df: pd.DataFrame, theta_bins, res_bins, op: OperatingPoint) -> pd.DataFrame:
    """Recall per (theta_E bin, theta_E/PSF bin) cell at the operating point's global threshold."""
    return _completeness(df, (("theta_e_arcsec", theta_bins, "theta"), ("theta_over_psf", res_bins, "res")),
                         op, COMPLETENESS_COLUMNS)


def completeness_snr_table(df: pd.DataFrame, res_bins, snr_bins, op: OperatingPoint) -> pd.DataFrame:
    """Recall per (theta_E/PSF bin, arc_snr bin) cell at the same global threshold, with the matched-filter
    reference recall of the cell at that FPR: the plane that decides whether an arc can be found."""
    return _completeness(df, (("theta_over_psf", res_bins, "res"), ("arc_snr", snr_bins, "snr")),
                         op, COMPLETENESS_SNR_COLUMNS, with_mf=True)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("n_pos", "n_neg"):
        df[col] = df[col].astype(np.int64)
    for col in df.columns:
        if col not in ("stratum", "metric", "n_pos", "n_neg"):
            df[col] = df[col].astype(np.float64)
    return df


def write_csv(df: pd.DataFrame, path) -> None:
    """Tidy CSV: full float precision, empty cells for NaN, no quoting needed (checked)."""
    for col in df.select_dtypes(include=["object", "string"]).columns:
        if df[col].astype(str).str.contains(r'[,"\n]').any():
            raise DHSError(f"column {col} has a value that would need quoting in {path}")
    with atomic_output(path) as tmp:
        df.to_csv(tmp, index=False, na_rep="")  # floats are written round-trip exact (repr)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="score parquet from dhs infer (test split)")
    parser.add_argument("--out_csv", required=True, help="tidy stratified table; siblings <stem>_auroc.csv, "
                        "<stem>_completeness.csv and <stem>_completeness_snr.csv are written next to it")
    parser.add_argument("--theta_bins", default=DEFAULT_THETA_BINS, help="theta_E bin edges, arcsec")
    parser.add_argument("--res_bins", default=DEFAULT_RES_BINS, help="theta_E/PSF bin edges")
    parser.add_argument("--snr_bins", default=DEFAULT_SNR_BINS,
                        help="arc_snr bin edges; the last may be inf (an open top bin)")
    parser.add_argument("--tpr_targets", default=DEFAULT_TPR_TARGETS)
    parser.add_argument("--fpr_targets", default=DEFAULT_FPR_TARGETS)
    parser.add_argument("--min_neg_per_fpr", type=float, default=1.0,
                        help="tpr@fpr t is left empty unless n_neg >= this / t (default 1: one false positive)")


def _check_outputs(scores, outputs: dict) -> None:
    """Before anything is written: no output is the input or another output, and every output is writable."""
    names = list(outputs.items())
    for i, (flag, path) in enumerate(names):
        refuse_overwrite(path, {"--scores": scores}, flag)
        for flag2, path2 in names[:i]:
            if same_file(path, path2):
                raise DHSError(f"{flag} {path} is the same file as {flag2}")
        check_writable(path, flag)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    theta_bins = parse_bins(args.theta_bins, "--theta_bins")
    res_bins = parse_bins(args.res_bins, "--res_bins")
    snr_bins = parse_bins(args.snr_bins, "--snr_bins", open_top=True)
    tpr_targets = parse_targets(args.tpr_targets, "--tpr_targets")
    fpr_targets = parse_targets(args.fpr_targets, "--fpr_targets")
    if not args.min_neg_per_fpr > 0:
        raise DHSError(f"--min_neg_per_fpr must be > 0, got {args.min_neg_per_fpr}")
    if theta_bins[0] < 0 or res_bins[0] < 0:
        raise DHSError("--theta_bins and --res_bins must be >= 0 (an Einstein radius and a ratio of radii)")
    paths = table_paths(args.out_csv)
    _check_outputs(args.scores, {"--out_csv": paths["table"], "the AUROC table": paths["auroc"],
                                 "the completeness table": paths["completeness"],
                                 "the arc_snr completeness table": paths["completeness_snr"]})
    df = load_scores(args.scores)
    n_pos, n_neg = int(df["y"].sum()), int((df["y"] == 0).sum())
    log.info("%s: %d positives, %d controls", args.scores, n_pos, n_neg)
    if n_pos == 0 or n_neg == 0:
        log.warning("no %s: every rate in the table is empty", "positives" if n_pos == 0 else "controls")
    if not np.isfinite(df.loc[df["y"] == 1, "arc_snr"].to_numpy()).any():
        log.warning("no positive has an arc_snr (real data?): the arc_snr strata and matched-filter "
                    "references are empty")
    skipped = [t for t in fpr_targets if not metrics.fpr_target_estimable(n_neg, t, args.min_neg_per_fpr)]
    if skipped:
        log.warning("fpr targets %s left empty: %d controls is fewer than %g/target", skipped, n_neg,
                    args.min_neg_per_fpr)
    op = OperatingPoint.of(df, fpr_targets, args.min_neg_per_fpr)  # the one completeness threshold
    tables = {"table": stratified_table(df, theta_bins, res_bins, tpr_targets, fpr_targets, args.min_neg_per_fpr,
                                        snr_bins),
              "auroc": auroc_table(df, theta_bins, res_bins, snr_bins),
              "completeness": completeness_table(df, theta_bins, res_bins, op),
              "completeness_snr": completeness_snr_table(df, res_bins, snr_bins, op)}
    for key, table in tables.items():
        write_csv(table, paths[key])
    log.info("wrote %s (completeness at fpr %g, threshold %g)", ", ".join(str(p) for p in paths.values()),
             op.fpr, op.threshold)
    return 0
