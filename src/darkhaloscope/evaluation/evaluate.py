"""`dhs eval`: the stratified tpr@fpr / fpr@tpr table, AUROC per stratum and the completeness table.

Definitions (see docs/evaluation.md and ``darkhaloscope.evaluation.metrics``): ranking by float32 ``logit``; a
threshold takes all tied scores or none; positives are binned by theta_E and by theta_E/PSF, controls are
never binned (every stratum shares all controls, so a tpr@fpr cut is one global cut on the controls).

Outputs (fixed names, declared by the workflow):
* ``--out_csv`` (e.g. ``gen3_stratified_fpr.csv``): one row per (stratum, metric, target).
* ``<stem>_auroc.csv``: AUROC per stratum.
* ``<stem>_completeness.csv``: recall per (theta_E bin, theta_E/PSF bin) cell at one global threshold.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation import metrics
from darkhaloscope.io import atomic_output
from darkhaloscope.stamps.contract import resolution_psf

log = logging.getLogger("dhs.eval")

DEFAULT_THETA_BINS = "0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.5"
DEFAULT_RES_BINS = "0.5,0.7,0.9,1.1,1.4,2.0"
DEFAULT_TPR_TARGETS = "0.80,0.85,0.90,0.95"
DEFAULT_FPR_TARGETS = "1e-5,1e-4,1e-3,1e-2"
COMPLETENESS_FPR = 1e-4  # the seed's headline operating point

STRATUM_ALL = "all"
STRATUM_THETA = "theta_e"
STRATUM_RES = "theta_e_over_psf"

TABLE_COLUMNS = ["stratum", "bin_lo", "bin_hi", "n_pos", "n_neg", "metric", "target", "value", "ci_low",
                 "ci_high", "threshold"]
AUROC_COLUMNS = ["stratum", "bin_lo", "bin_hi", "n_pos", "n_neg", "auroc"]
COMPLETENESS_COLUMNS = ["theta_lo", "theta_hi", "res_lo", "res_hi", "n_pos", "n_recovered", "recall", "ci_low",
                        "ci_high", "fpr_target", "threshold"]

# Columns an evaluation reads from a score parquet (those present).
_SCORE_COLUMNS = ("task_id", "is_control", "logit", "score", "theta_e_arcsec", "psf_fwhm_used_r", "psfsize_r",
                  "region_split")


# ----------------------------------------------------------------------------------------------------
# Parsing and loading
# ----------------------------------------------------------------------------------------------------

def _parse_floats(text, name: str) -> list[float]:
    if isinstance(text, (list, tuple, np.ndarray)):
        values = [float(v) for v in text]
    else:
        try:
            values = [float(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise DHSError(f"{name} '{text}' is not a comma-separated list of numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise DHSError(f"{name} '{text}' must list finite numbers")
    return values


def parse_bins(text, name: str = "bins") -> np.ndarray:
    """Bin edges: at least two, finite and strictly increasing."""
    edges = np.asarray(_parse_floats(text, name), dtype=np.float64)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise DHSError(f"{name} '{text}' must be at least two strictly increasing edges")
    return edges


def parse_targets(text, name: str = "targets") -> list[float]:
    """Rate targets: each strictly inside (0, 1)."""
    values = _parse_floats(text, name)
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise DHSError(f"{name} '{text}' has values outside (0, 1): {bad}")
    return values


def load_scores(path, extra_columns=()) -> pd.DataFrame:
    """Read a score parquet (from ``dhs infer``) into a frame with ``y`` (1 = lens, 0 = control),
    ``rank`` (the float64 ranking key: ``logit``, or ``score`` when there is no logit) and
    ``theta_over_psf``. Raises DHSError on a file that cannot be evaluated."""
    from darkhaloscope.evaluation.scorefile import read_checked  # the one score-file validator

    path = Path(path)
    table = read_checked(path, (*_SCORE_COLUMNS, *extra_columns))
    names = set(table.schema.names)
    df = table.to_pandas()
    is_control = df["is_control"]
    df["y"] = (is_control.to_numpy() == 0).astype(np.int8)
    key = "logit" if "logit" in names else "score"
    if key == "score":
        log.warning("%s has no logit column: ranking by score, which ties when probabilities saturate", path)
    df["rank"] = df[key].to_numpy(dtype=np.float64)
    theta = df["theta_e_arcsec"].to_numpy(np.float64) if "theta_e_arcsec" in names else np.full(len(df), np.nan)
    psf = resolution_psf(df["psf_fwhm_used_r"].to_numpy(np.float64) if "psf_fwhm_used_r" in names else np.nan,
                         df["psfsize_r"].to_numpy(np.float64) if "psfsize_r" in names else np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["theta_over_psf"] = np.where(psf > 0, theta / psf, np.nan)
    df["theta_e_arcsec"] = theta
    return df


# ----------------------------------------------------------------------------------------------------
# Strata and tables
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stratum:
    name: str
    lo: float
    hi: float
    pos_rank: np.ndarray  # ranking keys of the stratum's positives


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the half-open bin [lo, hi) holding each value; -1 outside the edges or NaN."""
    idx = np.searchsorted(edges, values, side="right") - 1
    idx[~np.isfinite(values) | (idx < 0) | (idx >= edges.size - 1)] = -1
    return idx


def make_strata(df: pd.DataFrame, theta_bins: np.ndarray, res_bins: np.ndarray) -> list[Stratum]:
    pos = df[df["y"] == 1]
    rank = pos["rank"].to_numpy()
    out = [Stratum(STRATUM_ALL, math.nan, math.nan, rank)]
    for name, column, edges in ((STRATUM_THETA, "theta_e_arcsec", theta_bins),
                                (STRATUM_RES, "theta_over_psf", res_bins)):
        idx = bin_index(pos[column].to_numpy(np.float64), edges)
        for b in range(edges.size - 1):
            out.append(Stratum(name, float(edges[b]), float(edges[b + 1]), rank[idx == b]))
    return out


def _points(stratum: Stratum, neg_rank: np.ndarray) -> metrics.RocPoints:
    y = np.r_[np.ones(stratum.pos_rank.size, np.int8), np.zeros(neg_rank.size, np.int8)]
    return metrics.roc_points(y, np.r_[stratum.pos_rank, neg_rank])


def stratified_table(df: pd.DataFrame, theta_bins, res_bins, tpr_targets, fpr_targets,
                     min_neg_per_fpr: float = 1.0) -> pd.DataFrame:
    """One row per (stratum, metric, target). Empty (NaN) value/CI/threshold where it cannot be
    estimated: no positives in the stratum, no controls, or (tpr@fpr) fewer than
    ``min_neg_per_fpr / target`` controls."""
    neg_rank = df.loc[df["y"] == 0, "rank"].to_numpy()
    n_neg = int(neg_rank.size)
    rows = []
    for st in make_strata(df, theta_bins, res_bins):
        n_pos = int(st.pos_rank.size)
        pts = _points(st, neg_rank) if n_pos and n_neg else None
        base = {"stratum": st.name, "bin_lo": st.lo, "bin_hi": st.hi, "n_pos": n_pos, "n_neg": n_neg}
        for t in fpr_targets:
            row = dict(base, metric="tpr@fpr", target=t, value=math.nan, ci_low=math.nan, ci_high=math.nan,
                       threshold=math.nan)
            if pts is not None and metrics.fpr_target_estimable(n_neg, t, min_neg_per_fpr):
                tpr, thr = metrics.tpr_at_fpr(pts, t)
                k = int(round(tpr * n_pos))
                row.update(value=tpr, threshold=thr)
                row["ci_low"], row["ci_high"] = metrics.wilson_interval(k, n_pos)
            rows.append(row)
        for t in tpr_targets:
            row = dict(base, metric="fpr@tpr", target=t, value=math.nan, ci_low=math.nan, ci_high=math.nan,
                       threshold=math.nan)
            if pts is not None:
                fpr, thr = metrics.fpr_at_tpr(pts, t)
                k = int(round(fpr * n_neg))
                row.update(value=fpr, threshold=thr)
                row["ci_low"], row["ci_high"] = metrics.wilson_interval(k, n_neg)
            rows.append(row)
    return _typed(pd.DataFrame(rows, columns=TABLE_COLUMNS))


def auroc_table(df: pd.DataFrame, theta_bins, res_bins) -> pd.DataFrame:
    neg_rank = df.loc[df["y"] == 0, "rank"].to_numpy()
    rows = []
    for st in make_strata(df, theta_bins, res_bins):
        y = np.r_[np.ones(st.pos_rank.size, np.int8), np.zeros(neg_rank.size, np.int8)]
        rows.append({"stratum": st.name, "bin_lo": st.lo, "bin_hi": st.hi, "n_pos": int(st.pos_rank.size),
                     "n_neg": int(neg_rank.size), "auroc": metrics.auroc(y, np.r_[st.pos_rank, neg_rank])})
    return _typed(pd.DataFrame(rows, columns=AUROC_COLUMNS))


def completeness_target(n_neg: int, fpr_targets, min_neg_per_fpr: float = 1.0,
                        preferred: float = COMPLETENESS_FPR) -> float:
    """The FPR whose global threshold defines completeness: ``preferred`` (1e-4) when estimable, else
    the lowest estimable of ``fpr_targets``; NaN when none is."""
    if metrics.fpr_target_estimable(n_neg, preferred, min_neg_per_fpr):
        return preferred
    usable = sorted(t for t in fpr_targets if metrics.fpr_target_estimable(n_neg, t, min_neg_per_fpr))
    return usable[0] if usable else math.nan


def completeness_table(df: pd.DataFrame, theta_bins, res_bins, fpr_targets,
                       min_neg_per_fpr: float = 1.0) -> pd.DataFrame:
    """Recall per (theta_E bin, theta_E/PSF bin) cell at the global tpr@fpr threshold of all positives."""
    pos = df[df["y"] == 1]
    neg_rank = df.loc[df["y"] == 0, "rank"].to_numpy()
    target = completeness_target(neg_rank.size, fpr_targets, min_neg_per_fpr)
    threshold = math.nan
    if math.isfinite(target) and len(pos):
        pts = metrics.roc_points(np.r_[np.ones(len(pos), np.int8), np.zeros(neg_rank.size, np.int8)],
                                 np.r_[pos["rank"].to_numpy(), neg_rank])
        threshold = metrics.tpr_at_fpr(pts, target)[1]
    ti = bin_index(pos["theta_e_arcsec"].to_numpy(np.float64), theta_bins)
    ri = bin_index(pos["theta_over_psf"].to_numpy(np.float64), res_bins)
    rank = pos["rank"].to_numpy()
    rows = []
    for a in range(theta_bins.size - 1):
        for b in range(res_bins.size - 1):
            cell = rank[(ti == a) & (ri == b)]
            row = {"theta_lo": theta_bins[a], "theta_hi": theta_bins[a + 1], "res_lo": res_bins[b],
                   "res_hi": res_bins[b + 1], "n_pos": int(cell.size), "n_recovered": math.nan,
                   "recall": math.nan, "ci_low": math.nan, "ci_high": math.nan, "fpr_target": target,
                   "threshold": threshold}
            if cell.size and math.isfinite(threshold):
                k, n = metrics.recall_at_threshold(cell, threshold)
                row.update(n_recovered=k, recall=k / n)
                row["ci_low"], row["ci_high"] = metrics.wilson_interval(k, n)
            rows.append(row)
    out = pd.DataFrame(rows, columns=COMPLETENESS_COLUMNS)
    out["n_recovered"] = out["n_recovered"].astype("Int64")
    return out


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("n_pos", "n_neg"):
        df[col] = df[col].astype(np.int64)
    for col in df.columns:
        if col not in ("stratum", "metric", "n_pos", "n_neg"):
            df[col] = df[col].astype(np.float64)
    return df


def sibling_paths(out_csv) -> tuple[Path, Path]:
    """(``<stem>_auroc.csv``, ``<stem>_completeness.csv``) next to ``out_csv``."""
    out_csv = Path(out_csv)
    return (out_csv.with_name(f"{out_csv.stem}_auroc.csv"), out_csv.with_name(f"{out_csv.stem}_completeness.csv"))


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
    parser.add_argument("--out_csv", required=True, help="tidy stratified table; siblings <stem>_auroc.csv and "
                        "<stem>_completeness.csv are written next to it")
    parser.add_argument("--theta_bins", default=DEFAULT_THETA_BINS, help="theta_E bin edges, arcsec")
    parser.add_argument("--res_bins", default=DEFAULT_RES_BINS, help="theta_E/PSF bin edges")
    parser.add_argument("--tpr_targets", default=DEFAULT_TPR_TARGETS)
    parser.add_argument("--fpr_targets", default=DEFAULT_FPR_TARGETS)
    parser.add_argument("--min_neg_per_fpr", type=float, default=1.0,
                        help="tpr@fpr t is left empty unless n_neg >= this / t (default 1: one false positive)")
    parser.add_argument("--report", default=None, help="also render the HTML report to this path")
    parser.add_argument("--report_label", default="gen3", help="label of --scores in the report")
    from darkhaloscope.evaluation.report import add_report_inputs
    add_report_inputs(parser, with_scores=False)


def _check_inputs_and_outputs(args, outputs: dict) -> None:
    """Before anything is written: no output is an input or another output, every output is writable,
    and every input file named on the command line exists."""
    from darkhaloscope.io import check_writable, refuse_overwrite, same_file

    inputs = {"--scores": args.scores, "--hard_negs": getattr(args, "hard_negs", None)}
    for item in getattr(args, "compare_scores", None) or []:
        inputs[f"--compare {item}"] = item.partition("=")[2] or item
    for item in getattr(args, "history", None) or []:
        inputs[f"--history {item}"] = item.partition("=")[2] or item
    if getattr(args, "data", None):
        inputs["--data"] = args.data
    names = [(k, v) for k, v in outputs.items() if v is not None]
    for i, (flag, path) in enumerate(names):
        refuse_overwrite(path, inputs, flag)
        for flag2, path2 in names[:i]:
            if same_file(path, path2):
                raise DHSError(f"{flag} {path} is the same file as {flag2}")
        check_writable(path, flag)
    for flag, path in inputs.items():
        if path and flag != "--data" and "://" not in str(path) and not Path(path).is_file():
            raise DHSError(f"{flag.split(' ')[0]} {path} does not exist" if not Path(path).exists()
                           else f"{flag.split(' ')[0]} {path} is not a file")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    theta_bins = parse_bins(args.theta_bins, "--theta_bins")
    res_bins = parse_bins(args.res_bins, "--res_bins")
    tpr_targets = parse_targets(args.tpr_targets, "--tpr_targets")
    fpr_targets = parse_targets(args.fpr_targets, "--fpr_targets")
    if not args.min_neg_per_fpr > 0:
        raise DHSError(f"--min_neg_per_fpr must be > 0, got {args.min_neg_per_fpr}")
    if theta_bins[0] < 0 or res_bins[0] < 0:
        raise DHSError("--theta_bins and --res_bins must be >= 0 (an Einstein radius and a ratio of radii)")
    auroc_path, comp_path = sibling_paths(args.out_csv)
    outputs = {"--out_csv": args.out_csv, "the AUROC table": auroc_path, "the completeness table": comp_path,
               "--report": args.report}
    _check_inputs_and_outputs(args, outputs)
    df = load_scores(args.scores)
    n_pos, n_neg = int(df["y"].sum()), int((df["y"] == 0).sum())
    log.info("%s: %d positives, %d controls", args.scores, n_pos, n_neg)
    if n_pos == 0 or n_neg == 0:
        log.warning("no %s: every rate in the table is empty", "positives" if n_pos == 0 else "controls")
    table = stratified_table(df, theta_bins, res_bins, tpr_targets, fpr_targets, args.min_neg_per_fpr)
    skipped = [t for t in fpr_targets if not metrics.fpr_target_estimable(n_neg, t, args.min_neg_per_fpr)]
    if skipped:
        log.warning("fpr targets %s left empty: %d controls is fewer than %g/target", skipped, n_neg,
                    args.min_neg_per_fpr)
    comp = completeness_table(df, theta_bins, res_bins, fpr_targets, args.min_neg_per_fpr)
    report_inputs = None
    if args.report:  # every input of the report is read and checked before the first CSV is written
        from darkhaloscope.evaluation import report
        report_inputs = report.ReportInputs.from_args(args, primary=(args.report_label, args.scores),
                                                      fpr_csv=args.out_csv)
        report.check_inputs(report_inputs)
    write_csv(table, args.out_csv)
    write_csv(auroc_table(df, theta_bins, res_bins), auroc_path)
    write_csv(comp, comp_path)
    log.info("wrote %s, %s, %s (completeness at fpr %g)", args.out_csv, auroc_path, comp_path,
             comp["fpr_target"].iloc[0] if len(comp) else math.nan)
    if args.report:
        report.render(report_inputs, args.report)
    return 0
