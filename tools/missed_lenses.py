#!/usr/bin/env python3
"""Which resolved, bright lenses a finder misses, and whether the +-10 sigma clip hid their arcs (issue 10).

    python tools/missed_lenses.py --run_dir results [--model gen3] [--data results/data/v4_sota_moffat]

The resolved-bright positives (theta_E/PSF >= 1.4, arc_snr >= 20) of the model's test scores, split at the
all-positives threshold of FPR 1e-2 into found and missed, are joined with their simulation truth (the test
split's parquet): the miss rate by the source's magnitude below the host (``src_mag_r - host_mag_r``) and by
the fraction of the r-band pixels within 0.4" of the Einstein radius that the seed's normalisation clips
(|x| >= 10 sky sigma: the arc there is lost to a network that sees the clipped stamp). Prints Markdown tables;
seconds on any machine (reads ~1k stamps).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from darkhaloscope import metrics
from darkhaloscope.evaluation import strata
from darkhaloscope.stamps import contract

# the resolved-bright cut of the finder tables (one definition: tools/finder_table.py)
_spec = importlib.util.spec_from_file_location("finder_table", Path(__file__).with_name("finder_table.py"))
finder_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finder_table)

TRUTH = ["task_id", "host_mag_r", "src_mag_r", "psfdepth_r", "magnification"]  # beyond the score file's own
ANNULUS_HALF_WIDTH = 0.4  # arcsec either side of theta_E
CONTRAST_BINS = (-np.inf, 2, 3, 4, np.inf)
CLIP_BINS = (-0.01, 0.01, 0.2, 0.5, 0.8, 1.0)


def annulus_clip_fraction(stamps: np.ndarray, theta_e: np.ndarray) -> np.ndarray:
    """Per stamp: the fraction of r-band pixels within ANNULUS_HALF_WIDTH of theta_E where the seed's
    normalisation (``contract.normalize_stamps``, clip +-10) saturates."""
    norm = contract.normalize_stamps(stamps)[:, 1]
    yy, xx = np.mgrid[:contract.STAMP_SIZE, :contract.STAMP_SIZE]
    centre = (contract.STAMP_SIZE - 1) / 2
    radius = np.hypot(xx - centre, yy - centre) * contract.PIXEL_SCALE_ARCSEC
    out = np.empty(len(norm))
    for i, (img, te) in enumerate(zip(norm, theta_e)):
        ring = np.abs(radius - te) < ANNULUS_HALF_WIDTH
        out[i] = float((np.abs(img[ring]) >= contract.NORM_CLIP).mean())
    return out


def missed_table(run_dir: Path, model: str, data: Path) -> tuple[pd.DataFrame, float]:
    scores = strata.load_scores(run_dir / "scores" / f"{model}_test_scores.parquet")
    threshold = metrics.tpr_at_fpr(metrics.roc_points(scores.y.to_numpy(), scores["rank"].to_numpy()), 1e-2)[1]
    df = scores[(scores.y == 1) & (scores.theta_over_psf >= finder_table.RESOLVED_MIN_RATIO)
                & (scores.arc_snr >= finder_table.BRIGHT_MIN_SNR)]
    dset = ds.dataset(str(data), format="parquet", partitioning="hive")
    truth = dset.to_table(columns=TRUTH, filter=ds.field("task_id").isin(df.task_id.tolist())).to_pandas()
    df = df.merge(truth, on="task_id").reset_index(drop=True)
    blobs = dset.to_table(columns=["task_id", "stamp_npz"], filter=ds.field("task_id").isin(df.task_id.tolist()))
    stamps, ok = contract.decode_stamps(blobs.column("stamp_npz"))
    order = pd.Series(np.arange(len(df)), index=df.task_id)
    rows = order[np.asarray(blobs.column("task_id").to_pylist())[ok]].to_numpy()
    df["clip_frac"] = np.nan
    df.loc[rows, "clip_frac"] = annulus_clip_fraction(stamps, df.theta_e_arcsec.to_numpy()[rows])
    df["missed"] = df["rank"] < threshold
    df["contrast"] = df.src_mag_r - df.host_mag_r
    return df, float(threshold)


def rate_table(df: pd.DataFrame, column: str, bins, label: str) -> str:
    groups = df.groupby(pd.cut(df[column], bins), observed=False)["missed"]
    lines = [f"| {label} | n | missed | miss rate |", "|---|---|---|---|"]
    for interval, g in groups:
        if len(g):
            lines.append(f"| {interval} | {len(g)} | {int(g.sum())} | {g.mean():.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run_dir", required=True, type=Path)
    p.add_argument("--model", default="gen3", help="scores/<model>_test_scores.parquet")
    p.add_argument("--data", type=Path, default=None, help="test stamps (default: <run_dir>/data/v4_sota_moffat)")
    args = p.parse_args(argv)
    data = args.data or args.run_dir / "data" / "v4_sota_moffat"
    df, thr = missed_table(args.run_dir, args.model, data)
    print(f"{args.model}: {len(df)} resolved-bright lenses, {int(df.missed.sum())} missed at the FPR 1e-2 threshold "
          f"(logit {thr:.3f}); median of missed / found:")
    for c in ("contrast", "host_mag_r", "psfdepth_r", "magnification", "clip_frac"):
        print(f"  {c}: {df.loc[df.missed, c].median():.3f} / {df.loc[~df.missed, c].median():.3f}")
    print()
    print(rate_table(df, "contrast", CONTRAST_BINS, "src_mag_r - host_mag_r"))
    print()
    print(rate_table(df, "clip_frac", CLIP_BINS, "clipped fraction of the theta_E annulus (r)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
