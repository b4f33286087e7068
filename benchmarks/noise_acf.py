#!/usr/bin/env python3
"""Measures the pixel-noise autocorrelation of real DR10 coadd cutouts: the source of
src/darkhaloscope/data/dr10_noise_acf.json (simulation.realism.noise_acf, docs/realism.md).

    python benchmarks/noise_acf.py --repo /work/.mirror/aditrivaishnavi+toy_glens_kinematics/repo \
        [--commit 51655e43c962367b48e033b2db98345bbc19afe3] [--out src/darkhaloscope/data/dr10_noise_acf.json]

Reads the six ``stronglens_calibration/sample_cutouts/*.npz`` of the user's original repository (a bare git
mirror, read with ``git show``: 101x101x3 float32 nanomaggies at 0.262"/px, key ``cutout``). Per cutout and band:
pixels within 12 px of the centre and source pixels (the image smoothed by a 1-px Gaussian above 0.5 MAD-sigma
over the median, dilated by 2 px) are left out, the mean of the rest is subtracted, and ACF(lag) = the mean
product of the pixel pairs at that lag that are both kept, over the lag-0 value (lags -3..3). Prints the mean
over the 18 cutout-bands and its standard error; --out writes the JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import numpy as np
from scipy import ndimage

PATH = "stronglens_calibration/sample_cutouts"
LAG = 3
CENTRE_EXCLUDE_PX = 12


def acf(image: np.ndarray, lag: int = LAG) -> tuple[np.ndarray, int]:
    ok = np.isfinite(image)
    im = np.where(ok, image, np.nanmedian(image)).astype(np.float64)
    med = np.median(im)
    sig = 1.4826 * np.median(np.abs(im - med))
    src = ndimage.binary_dilation(ndimage.gaussian_filter(im - med, 1.0) > 0.5 * sig, iterations=2)
    yy, xx = np.mgrid[:im.shape[0], :im.shape[1]]
    c = (im.shape[0] - 1) / 2
    keep = ok & ~src & (np.hypot(yy - c, xx - c) > CENTRE_EXCLUDE_PX)
    z = np.where(keep, im - np.mean(im[keep]), 0.0)
    m = keep.astype(np.float64)
    h, w = im.shape
    out = np.zeros((2 * lag + 1, 2 * lag + 1))
    for dy in range(-lag, lag + 1):
        for dx in range(-lag, lag + 1):
            a = (slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))
            b = (slice(max(0, -dy), h + min(0, -dy)), slice(max(0, -dx), w + min(0, -dx)))
            out[dy + lag, dx + lag] = (z[a] * z[b]).sum() / (m[a] * m[b]).sum()
    return out / out[lag, lag], int(keep.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="bare git mirror of aditrivaishnavi/toy_glens_kinematics")
    p.add_argument("--commit", default="HEAD")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    git = ["git", "-C", args.repo]
    commit = subprocess.run(git + ["rev-parse", args.commit], capture_output=True, text=True, check=True).stdout.strip()
    names = subprocess.run(git + ["ls-tree", "--name-only", commit, PATH + "/"], capture_output=True, text=True,
                           check=True).stdout.split()
    acfs = []
    for name in sorted(n for n in names if n.endswith(".npz")):
        blob = subprocess.run(git + ["show", f"{commit}:{name}"], capture_output=True, check=True).stdout
        cut = np.load(io.BytesIO(blob))["cutout"]
        for band in range(cut.shape[-1]):
            a, n = acf(cut[..., band])
            acfs.append(a)
            print(f"{name.split('/')[-1]} band {'grz'[band]}: {n} sky pixels, lag (0,1) {a[LAG, LAG + 1]:.3f}, "
                  f"(1,0) {a[LAG + 1, LAG]:.3f}, (0,2) {a[LAG, LAG + 2]:.3f}")
    acfs = np.array(acfs)
    mean = acfs.mean(0)
    mean = 0.5 * (mean + mean[::-1, ::-1])
    se = acfs.std(0, ddof=1) / np.sqrt(len(acfs))
    print(np.round(mean, 3))
    if args.out:
        doc = {"description": ("Pixel-noise autocorrelation of DR10 coadd cutouts, [row lag][column lag], lags -3..3, "
                               "lag 0 = 1, measured by benchmarks/noise_acf.py (its docstring has the method) on "
                               "off-source sky pixels; mean of the cutout-bands, symmetrised; acf_se is the standard "
                               "error of that mean."),
               "source": {"repository": "aditrivaishnavi/toy_glens_kinematics", "commit": commit,
                          "path": PATH + "/*.npz"},
               "n_cutout_bands": int(len(acfs)), "acf": np.round(mean, 4).tolist(), "acf_se": np.round(se, 4).tolist()}
        with open(args.out, "w") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
