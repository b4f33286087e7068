"""tools/missed_lenses.py: the clipped fraction of the Einstein-radius annulus, against a direct count."""

import importlib.util

import numpy as np

from workflow_helpers import REPO

spec = importlib.util.spec_from_file_location("missed_lenses", REPO / "tools" / "missed_lenses.py")
ml = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ml)


def test_annulus_clip_fraction_counts_the_pixels_the_clip_saturates():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(xx - 31.5, yy - 31.5) * 0.262  # arcsec
    sky = rng.normal(0, 1, (3, 3, 64, 64)).astype(np.float32)
    bright, faint = 5000 * np.exp(-radius / 0.5), 3 * np.exp(-radius / 0.5)
    stamps = sky + np.stack([np.zeros_like(radius), bright, faint])[:, None].astype(np.float32)
    theta = np.array([1.0, 1.0, 1.0])
    got = ml.annulus_clip_fraction(stamps, theta)
    ring = np.abs(radius - 1.0) < ml.ANNULUS_HALF_WIDTH
    # sky noise alone: |x| >= 10 sigma essentially never; a host at 1" of ~70 sigma and more: every pixel
    assert got[0] == 0.0 and got[2] == 0.0
    assert got[1] == 1.0 and (5000 * np.exp(-(1.0 + ml.ANNULUS_HALF_WIDTH) / 0.5) > 10)
    assert ring.sum() > 50
