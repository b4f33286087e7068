"""Host LRGs of the simulated stamps (Phase 4a, ``dhs manifest --host_priors``).

Two host populations:

- ``dr10`` (the demo's): drawn like the real DR10 LRG parent sample (``data/dr10_parent_sample.json``,
  "DR10 LRG parent-sample statistics": quantiles of z, g - r, r - z, two correlations and the Tractor
  type mix of 1,266 real objects). Photometry from a Gaussian copula: the latent correlations are
  solved so that the *Pearson* correlations of the drawn colours and magnitudes equal the JSON's, and
  each marginal is the monotone (PCHIP) interpolation of the JSON's quantile curve, so the drawn
  quantiles are the JSON's at its levels. Profiles from the Tractor type mix (REX, EXP, DEV, SER) with
  per-type priors on index, size and axis ratio (``TYPE_PRIORS``; sources in docs/simulator.md).
- ``sota`` (``config/full.yaml``'s): the seed's hosts, de Vaucouleurs-like Sersic (n ~ 4), exactly the
  draws of the code before host priors existed (same random stream, same order), so the full-scale
  configuration keeps rendering the same stamps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.optimize import brentq
from scipy.special import ndtr, roots_hermitenorm
from scipy.stats import truncnorm

from darkhaloscope.stamps.contract import PIXEL_SCALE_ARCSEC, load_conditions
from darkhaloscope.errors import DHSError

HOST_PRIORS = ("dr10", "sota")
TRACTOR_TYPES = ("REX", "EXP", "DEV", "SER")

# Ends of each marginal (the values at cumulative probability 0 and 1; the JSON stops at 5 and 95 %):
# z: 20.4 is the parent cut; 17.0 continues the 5-10 % slope of the quantile curve in normal score down
#    to the 0.1 % level (16.99).
# g - r: 2.7 continues the 90-95 % slope to the 99.9 % level (2.74); the continuation of the blue end
#    (-0.9) is bluer than any galaxy, so 0.0 (star-forming interlopers of the relaxed selection).
# r - z: 0.4 is the parent cut; 4.0 instead of the continuation (4.7): a z = 20.4 host with r - z = 4 has
#    r = 24.4, the median DR10 r depth, so redder colours are not measured in the real sample either.
PHOTOMETRY = ("z_mag", "g_minus_r", "r_minus_z")
MARGINAL_ENDS = {"z_mag": (17.0, 20.4), "g_minus_r": (0.0, 2.7), "r_minus_z": (0.4, 4.0)}
# Correlations the JSON gives (Pearson of the parent sample); the third pair (z, g - r) is not given and
# is left uncorrelated in the copula.
CORRELATION_KEYS = {("g_minus_r", "r_minus_z"): "corr_r_minus_z__g_minus_r",
                    ("z_mag", "r_minus_z"): "corr_z_mag__r_minus_z"}


@dataclass(frozen=True)
class TypePrior:
    """Shape prior of one Tractor type. Sersic index: fixed ``n`` or a normal (mean, sd) truncated to
    ``n_bounds``; effective radius (arcsec) log-normal with median ``reff_median`` at the parent
    sample's median z magnitude, scaled by 10^(``REFF_SLOPE_PER_MAG`` (z - z_median)) and truncated
    (in ln) to ``reff_bounds``; axis ratio normal (mean, sd) truncated to ``q_bounds`` (q = 1: round)."""

    n: float | None
    reff_median: float
    reff_sigma_ln: float
    reff_bounds: tuple[float, float]
    q_mean: float = 1.0
    q_sd: float = 0.0
    q_bounds: tuple[float, float] = (1.0, 1.0)
    n_mean: float = 0.0
    n_sd: float = 0.0
    n_bounds: tuple[float, float] = (0.5, 6.0)


TYPE_PRIORS = {
    # round exponential, free size: Tractor's choice for small, barely resolved galaxies
    "REX": TypePrior(n=1.0, reff_median=0.45, reff_sigma_ln=0.35, reff_bounds=(0.15, 1.5)),
    # exponential: discs and S0s among the red galaxies, flatter than ellipticals
    "EXP": TypePrior(n=1.0, reff_median=0.65, reff_sigma_ln=0.40, reff_bounds=(0.15, 3.0),
                     q_mean=0.60, q_sd=0.20, q_bounds=(0.2, 1.0)),
    "DEV": TypePrior(n=4.0, reff_median=1.0, reff_sigma_ln=0.45, reff_bounds=(0.2, 4.0),
                     q_mean=0.75, q_sd=0.15, q_bounds=(0.3, 1.0)),
    # free index, bounded to Tractor's 0.5-6 (legacypipe's LegacySersicIndex)
    "SER": TypePrior(n=None, n_mean=3.5, n_sd=1.3, n_bounds=(0.5, 6.0), reff_median=0.9, reff_sigma_ln=0.45,
                     reff_bounds=(0.2, 4.0), q_mean=0.75, q_sd=0.15, q_bounds=(0.3, 1.0)),
}
# Fainter hosts are smaller (less luminous and farther): log10 r_eff falls by 0.12 per z magnitude (a
# factor 0.76 per mag; see docs/simulator.md for the source).
REFF_SLOPE_PER_MAG = -0.12


@lru_cache(maxsize=1)
def load_parent_sample() -> dict:
    """The DR10 LRG parent-sample statistics shipped as package data."""
    with resources.files("darkhaloscope.data").joinpath("dr10_parent_sample.json").open() as fh:
        return json.load(fh)


@lru_cache(maxsize=None)
def marginal(name: str) -> PchipInterpolator:
    """Inverse CDF of one photometric quantity: the monotone cubic (PCHIP) through the JSON's quantiles
    and the chosen ends ``MARGINAL_ENDS`` at probability 0 and 1 (scipy's PCHIP keeps it monotone)."""
    parent = load_parent_sample()
    lo, hi = MARGINAL_ENDS[name]
    probs = np.concatenate([[0.0], parent["quantile_levels"], [1.0]])
    vals = np.concatenate([[lo], parent[name], [hi]])
    return PchipInterpolator(probs, vals)


def _pearson_of_latent(rho: float, fa, fb, nodes: np.ndarray, weights: np.ndarray) -> float:
    """Pearson correlation of (fa(Phi(X)), fb(Phi(Y))) for a standard bivariate normal (X, Y) with
    correlation rho, by Gauss-Hermite quadrature (deterministic, exact for smooth marginals)."""
    x = nodes[:, None]
    y = rho * nodes[:, None] + np.sqrt(1.0 - rho * rho) * nodes[None, :]
    w = weights[:, None] * weights[None, :]
    a, b = fa(ndtr(x)) * np.ones_like(y), fb(ndtr(y))
    ma, mb = (w * a).sum(), (w * b).sum()
    cov = (w * (a - ma) * (b - mb)).sum()
    return float(cov / np.sqrt((w * (a - ma) ** 2).sum() * (w * (b - mb) ** 2).sum()))


@lru_cache(maxsize=1)
def latent_correlation() -> np.ndarray:
    """3x3 correlation of the copula's latent normals (order ``PHOTOMETRY``), each given pair solved
    (Brent) so that the drawn quantities have the JSON's Pearson correlation."""
    parent = load_parent_sample()
    nodes, weights = roots_hermitenorm(80)
    weights = weights / weights.sum()
    corr = np.eye(len(PHOTOMETRY))
    for (a, b), key in CORRELATION_KEYS.items():
        target = float(parent[key])
        fa, fb = marginal(a), marginal(b)
        rho = brentq(lambda r: _pearson_of_latent(r, fa, fb, nodes, weights) - target, -0.95, 0.95, xtol=1e-10)
        i, j = PHOTOMETRY.index(a), PHOTOMETRY.index(b)
        corr[i, j] = corr[j, i] = rho
    return corr


def _truncnorm(rng: np.random.Generator, mean, sd, lo, hi, n: int) -> np.ndarray:
    """n draws of a normal (mean, sd) truncated to [lo, hi] by inverse CDF (one uniform per draw)."""
    u = rng.random(n)
    mean, sd = np.broadcast_to(np.asarray(mean, np.float64), (n,)), float(sd)
    if sd == 0.0:
        return np.clip(mean, lo, hi)
    a, b = (lo - mean) / sd, (hi - mean) / sd
    return truncnorm.ppf(u, a, b, loc=mean, scale=sd)


def draw_dr10_photometry(rng: np.random.Generator, n: int) -> dict:
    """z magnitude, g - r and r - z of n hosts from the Gaussian copula (see the module docstring)."""
    chol = np.linalg.cholesky(latent_correlation())
    latent = rng.standard_normal((n, len(PHOTOMETRY))) @ chol.T
    u = ndtr(latent)
    return {name: marginal(name)(u[:, k]) for k, name in enumerate(PHOTOMETRY)}


def draw_dr10_hosts(rng: np.random.Generator, n: int) -> dict:
    """Hosts like the DR10 LRG parent sample: photometry from the copula, Tractor type from the JSON's
    mix, Sersic index / size / axis ratio from that type's ``TYPE_PRIORS``."""
    parent = load_parent_sample()
    phot = draw_dr10_photometry(rng, n)
    frac = np.array([parent["tractor_type_fraction"][t] for t in TRACTOR_TYPES], np.float64)
    kind = rng.choice(len(TRACTOR_TYPES), size=n, p=frac / frac.sum())
    z_median = float(np.interp(0.5, parent["quantile_levels"], parent["z_mag"]))
    sersic_n, reff, q = np.empty(n), np.empty(n), np.empty(n)
    for k, name in enumerate(TRACTOR_TYPES):  # one block of draws per type, in a fixed order
        idx = np.flatnonzero(kind == k)
        m, p = len(idx), TYPE_PRIORS[name]
        sersic_n[idx] = (np.full(m, p.n) if p.n is not None
                         else _truncnorm(rng, p.n_mean, p.n_sd, *p.n_bounds, m))
        ln_med = np.log(p.reff_median) + REFF_SLOPE_PER_MAG * np.log(10.0) * (phot["z_mag"][idx] - z_median)
        reff[idx] = np.exp(_truncnorm(rng, ln_med, p.reff_sigma_ln, *np.log(p.reff_bounds), m))
        q[idx] = _truncnorm(rng, p.q_mean, p.q_sd, *p.q_bounds, m)
    return {
        "host_mag_r": phot["z_mag"] + phot["r_minus_z"],
        "host_g_minus_r": phot["g_minus_r"],
        "host_r_minus_z": phot["r_minus_z"],
        "host_reff": reff,
        "host_n": sersic_n,
        "host_q": q,
        "host_phi": rng.random(n) * np.pi,
        "host_x": rng.uniform(-0.3, 0.3, n) * PIXEL_SCALE_ARCSEC,
        "host_y": rng.uniform(-0.3, 0.3, n) * PIXEL_SCALE_ARCSEC,
        "host_type": np.array(TRACTOR_TYPES, dtype=object)[kind],
    }


def draw_sota_hosts(rng: np.random.Generator, n: int) -> dict:
    """The seed's LRG hosts: de Vaucouleurs-like Sersic (n ~ 4), satisfying the parent cuts z < 20.4,
    r - z > 0.4. z magnitudes follow rising number counts (p ~ 10^(0.3 m)) over 17.5-20.4; colours are
    those of z ~ 0.3-0.8 LRGs; effective radius log-normal around 0.9 arcsec (~5 kpc at z ~ 0.5).
    The draws (stream and order) are those of the code before ``--host_priors`` existed."""
    cuts = load_conditions()["lrg_parent_cuts"]
    z_max = float(cuts["z_mag_max"])
    a = 0.3 * np.log(10.0)
    lo, hi = 17.5, z_max - 0.01
    u = rng.random(n)
    z_mag = np.log(np.exp(a * lo) + u * (np.exp(a * hi) - np.exp(a * lo))) / a
    r_minus_z = np.clip(1.35 + 0.25 * rng.standard_normal(n), float(cuts["r_minus_z_min"]) + 0.05, 2.3)
    g_minus_r = np.clip(1.6 + 0.25 * rng.standard_normal(n), 0.8, 2.4)
    return {
        "host_mag_r": z_mag + r_minus_z,
        "host_g_minus_r": g_minus_r,
        "host_r_minus_z": r_minus_z,
        "host_reff": np.clip(np.exp(np.log(0.9) + 0.4 * rng.standard_normal(n)), 0.3, 3.0),
        "host_n": np.clip(4.0 + 0.5 * rng.standard_normal(n), 2.5, 6.0),
        "host_q": np.clip(0.75 + 0.15 * rng.standard_normal(n), 0.4, 1.0),
        "host_phi": rng.random(n) * np.pi,
        "host_x": rng.uniform(-0.3, 0.3, n) * PIXEL_SCALE_ARCSEC,
        "host_y": rng.uniform(-0.3, 0.3, n) * PIXEL_SCALE_ARCSEC,
        "host_type": np.full(n, "SER", dtype=object),  # a free Sersic index (around 4)
    }


def draw_hosts(rng: np.random.Generator, n: int, priors: str = "dr10") -> dict:
    """Host columns (``manifest.HOST_COLUMNS`` + ``host_type``) of n tasks under ``priors``."""
    if priors == "dr10":
        return draw_dr10_hosts(rng, n)
    if priors == "sota":
        return draw_sota_hosts(rng, n)
    raise DHSError(f"unknown --host_priors '{priors}' (choose from {', '.join(HOST_PRIORS)})")
