"""benchmarks/real_host_recall.py: the hosts' noise and depth, and recall per (theta_E/PSF, arc_snr) cell."""

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest

from darkhaloscope.metrics import wilson_interval
from darkhaloscope.simulation.scene import sky_psf_sum_sq, sky_sigma
from workflow_helpers import REPO

spec = importlib.util.spec_from_file_location("real_host_recall", REPO / "benchmarks" / "real_host_recall.py")
rhr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rhr)


def test_stamp_noise_ignores_the_central_galaxy_and_depth_inverts_sky_sigma():
    rng = np.random.default_rng(3)
    sigma = np.array([0.002, 0.003, 0.008])
    img = rng.normal(0, 1, (3, 64, 64)) * sigma[:, None, None]
    yy, xx = np.mgrid[:64, :64] - 31.5
    img += 5.0 * np.exp(-np.hypot(xx, yy) / 1.5)  # a bright host: above the noise out to ~3.5"
    assert rhr.stamp_sigma(img) == pytest.approx(sigma, rel=0.06)
    fwhm = np.array([1.5, 1.3, 1.3])
    depth = rhr.depth_from_sigma(sigma, fwhm)
    assert sky_sigma(depth, sky_psf_sum_sq(fwhm)) == pytest.approx(sigma, rel=1e-9)
    assert np.all((depth > 22) & (depth < 27))


def test_recall_cells_count_positives_at_each_threshold():
    rng = np.random.default_rng(4)
    n = 400
    df = pd.DataFrame({"y": rng.integers(0, 2, n), "theta_over_psf": rng.uniform(0.5, 2.5, n),
                       "arc_snr": rng.uniform(0, 60, n), "rank": rng.normal(0, 1, n)})
    thr = [(1e-2, 0.3), (1e-3, math.nan)]
    cells = pd.DataFrame(rhr.recall_cells(df, thr))
    pos = df[df.y == 1]
    rb = pos[(pos.theta_over_psf >= 1.4) & (pos.arc_snr >= 20)]
    row = cells[(cells.cell == "resolved-bright") & (cells.fpr_target == 1e-2)].iloc[0]
    k = int((rb["rank"] >= 0.3).sum())
    assert (row.n, row.k) == (len(rb), k) and (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(k, len(rb)))
    nan_row = cells[(cells.cell == "all") & (cells.fpr_target == 1e-3)].iloc[0]
    assert nan_row.n == len(pos) and pd.isna(nan_row.k) and math.isnan(nan_row.recall)
    grid = cells[cells.cell.str.startswith("theta/psf") & (cells.fpr_target == 1e-2)]
    assert grid.n.sum() == len(pos)  # the cells tile the positives (theta/psf >= 0.5, snr >= 0)
