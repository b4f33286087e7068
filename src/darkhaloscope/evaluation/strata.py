"""What `dhs eval` writes and `dhs report` reads, in one place: the bins and rate targets (defaults and
parsing), score loading, the strata's names, the operating point (the FPR and global threshold that define
completeness, computed once by `dhs eval` and written into its completeness tables) and the names and
columns of the four tables.

`dhs eval` (``evaluation.evaluate``) computes the tables; `dhs report` (``evaluation.report``) draws them.
Neither imports the other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from darkhaloscope.errors import DHSError
from darkhaloscope import metrics
from darkhaloscope.evaluation.scorefile import read_checked
from darkhaloscope.stamps.contract import resolution_psf
from darkhaloscope.values import parse_floats

log = logging.getLogger("dhs.eval")

DEFAULT_THETA_BINS = "0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.5"
DEFAULT_RES_BINS = "0.5,0.7,0.9,1.1,1.4,2.0"
DEFAULT_TPR_TARGETS = "0.80,0.85,0.90,0.95"
DEFAULT_FPR_TARGETS = "1e-5,1e-4,1e-3,1e-2"
DEFAULT_SNR_BINS = "0,3,5,10,20,50,inf"
COMPLETENESS_FPR = 1e-4  # the seed's headline operating point

STRATUM_ALL = "all"
STRATUM_THETA = "theta_e"
STRATUM_RES = "theta_e_over_psf"
STRATUM_SNR = "arc_snr"

TABLE_COLUMNS = ["stratum", "bin_lo", "bin_hi", "n_pos", "n_neg", "metric", "target", "value", "ci_low",
                 "ci_high", "threshold", "mf_value"]
AUROC_COLUMNS = ["stratum", "bin_lo", "bin_hi", "n_pos", "n_neg", "auroc", "mf_auroc"]
COMPLETENESS_COLUMNS = ["theta_lo", "theta_hi", "res_lo", "res_hi", "n_pos", "n_recovered", "recall", "ci_low",
                        "ci_high", "fpr_target", "threshold"]
COMPLETENESS_SNR_COLUMNS = ["res_lo", "res_hi", "snr_lo", "snr_hi", "n_pos", "n_recovered", "recall", "ci_low",
                            "ci_high", "fpr_target", "threshold", "mf_recall"]
# The four tables of one `dhs eval` call: key -> (file name suffix after the --out_csv stem, columns).
TABLES = {"table": ("", TABLE_COLUMNS), "auroc": ("_auroc", AUROC_COLUMNS),
          "completeness": ("_completeness", COMPLETENESS_COLUMNS),
          "completeness_snr": ("_completeness_snr", COMPLETENESS_SNR_COLUMNS)}

# Columns an evaluation reads from a score parquet (those present).
SCORE_COLUMNS = ("task_id", "is_control", "logit", "score", "theta_e_arcsec", "psf_fwhm_used_r", "psfsize_r",
                 "arc_snr", "region_split")


# ----------------------------------------------------------------------------------------------------
# Bins and targets
# ----------------------------------------------------------------------------------------------------

def parse_bins(text, name: str = "bins", open_top: bool = False) -> np.ndarray:
    """Bin edges: at least two, finite and strictly increasing; with ``open_top`` the last edge may be
    ``inf`` (an open top bin, e.g. arc_snr >= 50)."""
    edges = np.asarray(parse_floats(text, name, allow_inf_last=open_top), dtype=np.float64)
    if edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise DHSError(f"{name} '{text}' must be at least two strictly increasing edges")
    return edges


def parse_targets(text, name: str = "targets") -> list[float]:
    """Rate targets: each strictly inside (0, 1)."""
    values = parse_floats(text, name)
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise DHSError(f"{name} '{text}' has values outside (0, 1): {bad}")
    return values


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the half-open bin [lo, hi) holding each value; -1 outside the edges or NaN."""
    idx = np.searchsorted(edges, values, side="right") - 1
    idx[~np.isfinite(values) | (idx < 0) | (idx >= edges.size - 1)] = -1
    return idx


# ----------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------

def load_scores(path, extra_columns=()) -> pd.DataFrame:
    """Read a score parquet (from ``dhs infer``) into a frame with ``y`` (1 = lens, 0 = control),
    ``rank`` (the float64 ranking key: ``logit``, or ``score`` when there is no logit) and
    ``theta_over_psf``. Raises DHSError on a file that cannot be evaluated."""
    path = Path(path)
    table = read_checked(path, (*SCORE_COLUMNS, *extra_columns))
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
    # arc_snr exists for simulated positives only: real data (no column, or nulls) leaves it NaN, and the
    # arc_snr strata and matched-filter references are then empty, never wrong
    df["arc_snr"] = df["arc_snr"].to_numpy(np.float64) if "arc_snr" in names else np.full(len(df), np.nan)
    return df


# ----------------------------------------------------------------------------------------------------
# The operating point
# ----------------------------------------------------------------------------------------------------

def completeness_target(n_neg: int, fpr_targets, min_neg_per_fpr: float = 1.0,
                        preferred: float = COMPLETENESS_FPR) -> float:
    """The FPR whose global threshold defines completeness: ``preferred`` (1e-4) when estimable, else
    the lowest estimable of ``fpr_targets``; NaN when none is."""
    if metrics.fpr_target_estimable(n_neg, preferred, min_neg_per_fpr):
        return preferred
    usable = sorted(t for t in fpr_targets if metrics.fpr_target_estimable(n_neg, t, min_neg_per_fpr))
    return usable[0] if usable else math.nan


@dataclass(frozen=True)
class OperatingPoint:
    """The FPR target of completeness and the global ranking threshold (tpr@fpr of all positives) that
    reaches it; NaN where there is none (too few controls, or no positives for the threshold)."""
    fpr: float
    threshold: float

    @classmethod
    def of(cls, df: pd.DataFrame, fpr_targets, min_neg_per_fpr: float = 1.0) -> "OperatingPoint":
        """Computed from a ``load_scores`` frame (by `dhs eval`, once)."""
        pos_rank = df.loc[df["y"] == 1, "rank"].to_numpy()
        neg_rank = df.loc[df["y"] == 0, "rank"].to_numpy()
        target = completeness_target(neg_rank.size, fpr_targets, min_neg_per_fpr)
        threshold = math.nan
        if math.isfinite(target) and pos_rank.size:
            pts = metrics.roc_points(np.r_[np.ones(pos_rank.size, np.int8), np.zeros(neg_rank.size, np.int8)],
                                     np.r_[pos_rank, neg_rank])
            threshold = metrics.tpr_at_fpr(pts, target)[1]
        return cls(target, threshold)

    @classmethod
    def read(cls, completeness: pd.DataFrame, where: str) -> "OperatingPoint":
        """Read back from a completeness table written by `dhs eval` (every row carries the same pair)."""
        pairs = completeness[["fpr_target", "threshold"]].drop_duplicates()
        if len(pairs) != 1:
            raise DHSError(f"{where} has {len(pairs)} operating points (fpr_target, threshold); dhs eval writes one")
        fpr, thr = (float(v) for v in pairs.iloc[0])
        return cls(fpr, thr)


# ----------------------------------------------------------------------------------------------------
# The tables on disk
# ----------------------------------------------------------------------------------------------------

def table_paths(out_csv) -> dict[str, Path]:
    """The four files of one `dhs eval --out_csv X.csv`: X.csv, X_auroc.csv, X_completeness.csv,
    X_completeness_snr.csv (keys as in ``TABLES``)."""
    out_csv = Path(out_csv)
    return {key: out_csv.with_name(f"{out_csv.stem}{suffix}.csv") if suffix else out_csv
            for key, (suffix, _) in TABLES.items()}


def read_tables(out_csv) -> dict[str, pd.DataFrame]:
    """The four tables `dhs eval --out_csv out_csv` wrote, floats read back exactly (round trip), each
    checked for its columns. A missing or foreign file is a DHSError naming it."""
    frames = {}
    for key, path in table_paths(out_csv).items():
        if not path.is_file():
            raise DHSError(f"{path} does not exist (dhs eval --out_csv {out_csv} writes it)")
        try:
            df = pd.read_csv(path)  # pandas >= 3 parses floats round-trip exactly (checked in tests)
        except (ValueError, OSError) as exc:
            raise DHSError(f"{path} is not a CSV table: {type(exc).__name__}") from None
        missing = [c for c in TABLES[key][1] if c not in df.columns]
        if missing:
            raise DHSError(f"{path} is not a table from dhs eval: no column(s) {','.join(missing)}")
        frames[key] = df
    return frames
