"""Phase 4a: the task manifest (``dhs manifest``).

One row per task with every random draw frozen, so that every data variant renders the same hosts,
neighbours, stars, confusers, sky positions and noise, and any shard can be re-rendered alone.

Conventions (also in docs/simulator.md):
- positions ``*_x``/``*_y`` are in arcsec relative to the stamp centre (pixel (31.5, 31.5)); +x is the
  column index, +y the row index of the stored array;
- angles ``*_phi`` are in radians, counter-clockwise from +x towards +y; axis ratios ``*_q`` = b/a;
- magnitudes are AB, fluxes nanomaggies; ``psfsize_*`` FWHM arcsec; ``psfdepth_*`` 5-sigma AB mag.

Neighbours and stars sit in fixed-size list columns (``nb_*`` with ``MAX_NEIGHBOURS`` slots, ``star_*``
with ``MAX_STARS`` slots); an unused slot has a NaN magnitude. Lens and source columns are null for
controls. ``noise_seed`` seeds the one per-task generator used for the pixel noise.

Optional source clumps (``--source_clumps_max`` K > 0): fixed-size list columns ``src_clump_*`` with K
slots (NaN in every field of an empty slot, null for controls); the manifest has no such column when
K = 0, and is then the same, byte for byte, as without the option.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.special import ndtr

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output
from darkhaloscope.simulation import realism
from darkhaloscope.simulation.hosts import HOST_PRIORS, draw_hosts
from darkhaloscope.simulation.realism import RealismPrior
from darkhaloscope.stamps.contract import BANDS, CONDITION_COLUMNS, load_conditions
from darkhaloscope.values import parse_floats

MAX_NEIGHBOURS = 4
MAX_STARS = 2
CONFUSER_KINDS = ("tidal_arc", "ring", "spiral_arm", "blue_companion")
SOURCE_PRIORS = ("realistic", "grid_sota")

# DR10-south-like footprint: dec -20..+30 and two RA ranges away from the Galactic plane.
FOOTPRINT_DEC = (-20.0, 30.0)
FOOTPRINT_RA = ((0.0, 50.0), (110.0, 270.0), (315.0, 360.0))

# Equal-area sky cells: a cylindrical equal-area grid (equal steps in RA and in sin(dec)). Written by
# hand because it is three lines and the footprint never reaches the poles, where the cells would get
# elongated; HEALPix (healpy) would add a dependency for the same purpose. A cell is ~1.6 deg^2.
CELL_N_RA = 280
CELL_N_SINDEC = 90


# Columns ``dhs inject`` needs; a manifest lacking any of them is refused.
HOST_COLUMNS = ("host_mag_r", "host_g_minus_r", "host_r_minus_z", "host_reff", "host_n", "host_q",
                "host_phi", "host_x", "host_y")
# Written by every manifest, not needed to render (an older manifest without it is still accepted):
# the host's Tractor type, REX / EXP / DEV / SER (see simulation.hosts).
HOST_TYPE_COLUMN = "host_type"
NEIGHBOUR_COLUMNS = ("nb_x", "nb_y", "nb_mag_r", "nb_g_minus_r", "nb_r_minus_z", "nb_reff", "nb_n",
                     "nb_q", "nb_phi")
STAR_COLUMNS = ("star_x", "star_y", "star_mag_r", "star_g_minus_r", "star_r_minus_z")
CONFUSER_COLUMNS = ("confuser_kind", "conf_r", "conf_phi", "conf_span", "conf_width", "conf_pitch",
                    "conf_mag_r", "conf_g_minus_r", "conf_r_minus_z")
LENS_COLUMNS = ("theta_e_arcsec", "lens_q", "lens_phi", "lens_x0", "lens_y0", "shear_g1", "shear_g2",
                "src_x", "src_y", "src_reff", "src_n", "src_q", "src_phi", "src_mag_r",
                "src_g_minus_r", "src_r_minus_z") + tuple(f"src_flux_{b}" for b in BANDS)
# Optional (present when the manifest was built with source clumps): (N, K) fixed-size lists.
CLUMP_COLUMNS = ("src_clump_x", "src_clump_y", "src_clump_sigma", "src_clump_frac")
REQUIRED_COLUMNS = (("task_id", "ra", "dec", "brickname", "region_id", "region_split", "is_control",
                     "noise_seed") + CONDITION_COLUMNS + HOST_COLUMNS + NEIGHBOUR_COLUMNS + STAR_COLUMNS
                    + CONFUSER_COLUMNS + LENS_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# Sky positions, regions and splits
# ----------------------------------------------------------------------------------------------------

def sky_cell(ra, dec) -> np.ndarray:
    """Equal-area sky cell id (int64) of positions in degrees."""
    ra = np.mod(np.asarray(ra, np.float64), 360.0)
    s = np.sin(np.radians(np.asarray(dec, np.float64)))
    i_ra = np.minimum((ra / 360.0 * CELL_N_RA).astype(np.int64), CELL_N_RA - 1)
    i_s = np.minimum(((s + 1.0) / 2.0 * CELL_N_SINDEC).astype(np.int64), CELL_N_SINDEC - 1)
    return i_s * CELL_N_RA + i_ra


def cell_bounds(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ra_lo, ra_hi, sindec_lo, sindec_hi) of sky cells."""
    cell = np.asarray(cell, np.int64)
    i_s, i_ra = np.divmod(cell, CELL_N_RA)
    ra_lo = i_ra * 360.0 / CELL_N_RA
    s_lo = i_s * 2.0 / CELL_N_SINDEC - 1.0
    return ra_lo, ra_lo + 360.0 / CELL_N_RA, s_lo, s_lo + 2.0 / CELL_N_SINDEC


def region_split_of(region_id, split_fracs=(0.7, 0.15, 0.15)) -> np.ndarray:
    """train/val/test from a hash of the region id alone (never the row), the same on any machine."""
    fracs = np.asarray(split_fracs, np.float64)
    edges = np.cumsum(fracs / fracs.sum())
    names = np.array(["train", "val", "test"], dtype=object)
    unique, inverse = np.unique(np.asarray(region_id, np.int64).ravel(), return_inverse=True)
    u = np.array([int.from_bytes(hashlib.blake2b(f"dhs-region-{int(rid)}".encode(), digest_size=8).digest(),
                                 "little") / 2.0**64 for rid in unique])
    split = names[np.minimum(np.searchsorted(edges, u, side="right"), 2)]
    return split[inverse].astype(object)


def brickname_of(ra, dec) -> np.ndarray:
    """DR10-like brick name: 0.25 deg rows in dec, ~0.25 deg bricks in RA, e.g. '1502p012'."""
    ra = np.mod(np.asarray(ra, np.float64), 360.0)
    dec = np.asarray(dec, np.float64)
    dec_c = np.round(dec / 0.25) * 0.25
    n_ra = np.maximum(1, np.round(360.0 * np.cos(np.radians(dec_c)) / 0.25)).astype(np.int64)
    ra_c = (np.floor(ra / 360.0 * n_ra) + 0.5) * 360.0 / n_ra
    return np.array([f"{int(round(r * 10)) % 3600:04d}{'m' if d < 0 else 'p'}{int(round(abs(d) * 10)):03d}"
                     for r, d in zip(ra_c, dec_c)], dtype=object)


def _footprint_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform-on-the-sphere points inside the footprint."""
    widths = np.array([hi - lo for lo, hi in FOOTPRINT_RA])
    which = rng.choice(len(FOOTPRINT_RA), size=n, p=widths / widths.sum())
    lo = np.array([FOOTPRINT_RA[k][0] for k in which])
    ra = lo + rng.random(n) * widths[which]
    s_lo, s_hi = np.sin(np.radians(FOOTPRINT_DEC))
    dec = np.degrees(np.arcsin(s_lo + rng.random(n) * (s_hi - s_lo)))
    return ra, dec


def draw_positions(rng: np.random.Generator, n: int, n_regions: int):
    """Tasks clustered into ``n_regions`` distinct sky cells of the footprint (like LRGs of real bricks),
    each task uniform inside its cell. Returns ra, dec, region id, and the region index of each task."""
    cells: dict[int, None] = {}  # insertion-ordered set: the order of first draw is reproducible
    for _ in range(100):  # the footprint holds ~7,500 cells; asking for more returns them all
        ra, dec = _footprint_points(rng, 4 * n_regions)
        for c in sky_cell(ra, dec).tolist():
            cells.setdefault(c, None)
            if len(cells) == n_regions:
                break
        if len(cells) == n_regions:
            break
    cells_arr = np.array(list(cells), np.int64)
    idx = rng.integers(0, len(cells_arr), n)
    ra_lo, ra_hi, s_lo, s_hi = cell_bounds(cells_arr[idx])
    f_lo, f_hi = np.sin(np.radians(FOOTPRINT_DEC))
    s_lo, s_hi = np.maximum(s_lo, f_lo), np.minimum(s_hi, f_hi)  # cells on the dec edges are cut
    ra = ra_lo + rng.random(n) * (ra_hi - ra_lo)
    dec = np.degrees(np.arcsin(s_lo + rng.random(n) * (s_hi - s_lo)))
    return ra, dec, cells_arr[idx], idx


# ----------------------------------------------------------------------------------------------------
# Observing conditions
# ----------------------------------------------------------------------------------------------------

def _quantile_curve(block: dict) -> tuple[np.ndarray, np.ndarray]:
    q = block["quantiles"]
    probs = np.array([float(k) for k in q], np.float64)
    vals = np.array([float(v) for v in q.values()], np.float64)
    order = np.argsort(probs)
    return probs[order], vals[order]


def draw_conditions(rng: np.random.Generator, region_index: np.ndarray, rho: float = 0.5) -> dict:
    """PSF FWHM and 5-sigma depth per band, independent of the label.

    r band: the DR10 quantile curves, interpolated linearly (inverse CDF). Tasks of one sky region share
    part of their conditions through a Gaussian copula (correlation ``rho``), which keeps the marginals
    exactly those of the JSON. g seeing is worse than r by the DR10 mean ratio (with scatter) and never
    better than r or z; z tracks r. Depths in g and z follow r with the DR10 per-band offsets."""
    cond = load_conditions()
    n = len(region_index)
    n_reg = int(region_index.max()) + 1 if n else 0
    out = {}
    for key, block in (("psfsize_r", cond["psfsize_r_fwhm_arcsec"]),
                       ("psfdepth_r", cond["psfdepth_r_5sigma_abmag"])):
        z_reg = rng.standard_normal(n_reg)
        z = np.sqrt(rho) * z_reg[region_index] + np.sqrt(1.0 - rho) * rng.standard_normal(n)
        probs, vals = _quantile_curve(block)
        out[key] = np.interp(ndtr(z), probs, vals)
    fwhm = cond["psf_fwhm_mean_by_band_arcsec"]
    ratio_g = fwhm["g"] / fwhm["r"] * np.exp(0.04 * rng.standard_normal(n))
    ratio_z = fwhm["z"] / fwhm["r"] * np.exp(0.05 * rng.standard_normal(n))
    out["psfsize_g"] = out["psfsize_r"] * np.maximum(ratio_g, 1.03)
    out["psfsize_z"] = np.minimum(out["psfsize_r"] * ratio_z, out["psfsize_g"] / 1.03)
    # per-brick medians quoted in the JSON's typical_5sigma_depth_by_band_abmag note: g 24.8, r 24.4,
    # z 23.3 -> offsets +0.4 / -1.1 mag from r
    out["psfdepth_g"] = out["psfdepth_r"] + 0.4 + 0.2 * rng.standard_normal(n)
    out["psfdepth_z"] = out["psfdepth_r"] - 1.1 + 0.25 * rng.standard_normal(n)
    return {k: out[k] for k in CONDITION_COLUMNS}


# ----------------------------------------------------------------------------------------------------
# Host, neighbours, stars, confusers
# ----------------------------------------------------------------------------------------------------

def _annulus_positions(rng, shape, r_min, r_max):
    r = np.sqrt(rng.uniform(r_min**2, r_max**2, shape))
    t = rng.random(shape) * 2 * np.pi
    return r * np.cos(t), r * np.sin(t)


def _draw_population(rng, n, max_count, rate, radius, mag_range):
    """Poisson(rate) objects per stamp (at most max_count slots) in an annulus radius=(r_min, r_max) arcsec,
    uniform r magnitudes in mag_range; unused slots get a NaN magnitude. Returns (x, y, mag_r)."""
    shape = (n, max_count)
    count = np.minimum(rng.poisson(rate, n), max_count)
    x, y = _annulus_positions(rng, shape, *radius)
    mag = rng.uniform(*mag_range, shape)
    mag[np.arange(max_count)[None, :] >= count[:, None]] = np.nan
    return x, y, mag


def draw_neighbours(rng: np.random.Generator, n: int) -> dict:
    """Field galaxies: Poisson(1.2) per stamp (at most MAX_NEIGHBOURS), 2.5-12 arcsec from the centre,
    r = 20-24.5, Sersic n 0.7-4."""
    shape = (n, MAX_NEIGHBOURS)
    x, y, mag = _draw_population(rng, n, MAX_NEIGHBOURS, 1.2, (2.5, 12.0), (20.0, 24.5))
    return {
        "nb_x": x, "nb_y": y, "nb_mag_r": mag,
        "nb_g_minus_r": np.clip(0.9 + 0.4 * rng.standard_normal(shape), -0.2, 2.2),
        "nb_r_minus_z": np.clip(0.7 + 0.3 * rng.standard_normal(shape), -0.3, 2.0),
        "nb_reff": rng.uniform(0.2, 1.2, shape),
        "nb_n": rng.uniform(0.7, 4.0, shape),
        "nb_q": rng.uniform(0.35, 1.0, shape),
        "nb_phi": rng.random(shape) * np.pi,
    }


def draw_stars(rng: np.random.Generator, n: int) -> dict:
    """Point sources: Poisson(0.4) per stamp, 3-8.2 arcsec from the centre (inside the stamp), r = 17-23."""
    shape = (n, MAX_STARS)
    x, y, mag = _draw_population(rng, n, MAX_STARS, 0.4, (3.0, 8.2), (17.0, 23.0))
    return {
        "star_x": x, "star_y": y, "star_mag_r": mag,
        "star_g_minus_r": rng.uniform(0.3, 1.5, shape),
        "star_r_minus_z": rng.uniform(0.0, 1.2, shape),
    }


_CONFUSER_COLOURS = {  # (g-r mean, r-z mean): tidal debris is host-red, the rest star-forming blue
    "tidal_arc": (1.45, 1.1), "ring": (0.7, 0.5), "spiral_arm": (0.6, 0.4), "blue_companion": (0.35, 0.25),
}


def draw_confusers(rng: np.random.Generator, n: int, frac) -> dict:
    """Lens-like features at radius 0.8-3 arcsec (the Einstein-radius range), drawn for every row with
    the same rate regardless of the label (``frac``: a number, or one rate per row). Geometry (see
    scene.confuser_light): ``conf_r`` radius, ``conf_phi`` central angle, ``conf_span`` angular half-extent
    (rad), ``conf_width`` Gaussian radial sigma (arcsec), ``conf_pitch`` spiral growth d ln r / d angle."""
    has = rng.random(n) < frac
    kind = np.where(has, np.array(CONFUSER_KINDS, dtype=object)[rng.integers(0, len(CONFUSER_KINDS), n)],
                    "none").astype(object)
    gr = np.array([_CONFUSER_COLOURS.get(k, (0.0, 0.0))[0] for k in kind]) + 0.2 * rng.standard_normal(n)
    rz = np.array([_CONFUSER_COLOURS.get(k, (0.0, 0.0))[1] for k in kind]) + 0.15 * rng.standard_normal(n)
    out = {
        "confuser_kind": kind,
        "conf_r": rng.uniform(0.8, 3.0, n),
        "conf_phi": rng.random(n) * 2 * np.pi,
        "conf_span": rng.uniform(0.4, 1.3, n),
        "conf_width": rng.uniform(0.12, 0.35, n),
        "conf_pitch": rng.uniform(0.15, 0.35, n),
        "conf_mag_r": rng.uniform(21.0, 23.5, n),
        "conf_g_minus_r": gr, "conf_r_minus_z": rz,
    }
    for k in CONFUSER_COLUMNS[1:]:
        out[k] = np.where(has, out[k], np.nan)
    return out


# ----------------------------------------------------------------------------------------------------
# Lens and source
# ----------------------------------------------------------------------------------------------------

def _source_fluxes(mag_r, g_minus_r, r_minus_z) -> dict:
    mags = {"g": mag_r + g_minus_r, "r": mag_r, "z": mag_r - r_minus_z}
    return {f"src_flux_{b}": 10.0 ** (-0.4 * (mags[b] - 22.5)) for b in BANDS}


def draw_lenses(rng: np.random.Generator, hosts: dict, priors: str) -> dict:
    """SIE + shear and Sersic source for every row (the caller blanks controls).

    The mass is tied to the host light: centre jittered by 0.03 arcsec, orientation by 5 deg. Source
    position ``src_x``/``src_y`` is in the source plane relative to the lens centre (arcsec), at
    beta = (0.1-0.4) theta_E from the optical axis. ``realistic``: the JSON's realistic priors (faint
    sources of fixed unlensed r = 23-26). ``grid_sota``: the v4_sota grid (theta_E, src_dmag relative to
    the host r magnitude, src_reff, src_e, shear amplitude), one grid point drawn per task."""
    cond = load_conditions()
    pri = cond["realistic_source_priors"]
    n = len(hosts["host_mag_r"])
    g1 = pri["shear_component_sd"] * rng.standard_normal(n)
    g2 = pri["shear_component_sd"] * rng.standard_normal(n)
    beta_frac = rng.uniform(*pri["beta_over_theta_e"], n)
    beta_ang = rng.random(n) * 2 * np.pi
    gmr = pri["src_g_minus_r"]["mean"] + pri["src_g_minus_r"]["sd"] * rng.standard_normal(n)
    rmz = pri["src_r_minus_z"]["mean"] + pri["src_r_minus_z"]["sd"] * rng.standard_normal(n)
    out = {
        "lens_q": rng.uniform(*pri["lens_q"], n),
        "lens_phi": np.mod(hosts["host_phi"] + np.radians(5.0) * rng.standard_normal(n), np.pi),
        "lens_x0": hosts["host_x"] + 0.03 * rng.standard_normal(n),
        "lens_y0": hosts["host_y"] + 0.03 * rng.standard_normal(n),
        "src_n": rng.uniform(*pri["src_sersic_n"], n),
        "src_q": rng.uniform(*pri["src_q"], n),
        "src_phi": rng.random(n) * np.pi,
        "src_g_minus_r": gmr, "src_r_minus_z": rmz,
    }
    if priors == "realistic":
        out["theta_e_arcsec"] = rng.uniform(*pri["theta_e_arcsec"], n)
        out["src_reff"] = rng.uniform(*pri["src_reff_arcsec"], n)
        out["src_mag_r"] = rng.uniform(*pri["src_r_mag"], n)
    elif priors == "grid_sota":
        grid = cond["injection_grid_sota"]
        pick = {k: np.asarray(grid[k], np.float64)[rng.integers(0, len(grid[k]), n)]
                for k in ("theta_e_arcsec", "src_dmag", "src_reff_arcsec", "src_e", "shear")}
        out["theta_e_arcsec"] = pick["theta_e_arcsec"]
        out["src_reff"] = pick["src_reff_arcsec"]
        out["src_mag_r"] = hosts["host_mag_r"] + pick["src_dmag"]
        out["src_q"] = (1.0 - pick["src_e"]) / (1.0 + pick["src_e"])
        out["src_n"] = np.ones(n)  # the grid's sources were exponential discs
        ang = rng.random(n) * np.pi
        g1, g2 = pick["shear"] * np.cos(2 * ang), pick["shear"] * np.sin(2 * ang)
    else:
        raise DHSError(f"unknown --source_priors '{priors}' (choose from {', '.join(SOURCE_PRIORS)})")
    out["shear_g1"], out["shear_g2"] = g1, g2
    beta = beta_frac * out["theta_e_arcsec"]
    out["src_x"], out["src_y"] = beta * np.cos(beta_ang), beta * np.sin(beta_ang)
    out.update(_source_fluxes(out["src_mag_r"], gmr, rmz))
    return {k: out[k] for k in LENS_COLUMNS}


@dataclass(frozen=True)
class ClumpPrior:
    """Source clumps: per positive U{0..max} circular Gaussians, each with a share U(flux_frac) of the
    unlensed source flux (the Sersic keeps the rest, so ``src_flux_*`` stays the total), sigma
    U(sigma_arcsec) in the source plane, centres uniform in area inside the source's own ellipse of
    (product-average) radius ``radius_reff`` x ``src_reff``. ``max`` = 0 is off."""

    max: int = 0
    flux_frac: tuple[float, float] = (0.05, 0.25)
    sigma_arcsec: tuple[float, float] = (0.04, 0.10)
    radius_reff: float = 1.5

    def check(self) -> ClumpPrior:
        """The prior itself, or a one-line ``ClumpPriorError`` naming the ``dhs manifest`` flag (and, as
        ``field``, the key of ``simulation.source_clumps`` in the workflow's config, which calls this too)."""
        lo, hi = self.flux_frac
        s_lo, s_hi = self.sigma_arcsec
        finite = lambda *v: bool(np.all(np.isfinite(v)))  # noqa: E731
        checks = (
            (self.max >= 0, "max", f"must be >= 0, got {self.max}"),
            (finite(lo, hi) and 0 < lo <= hi <= 1, "flux_frac", f"must be lo,hi with 0 < lo <= hi <= 1, got {lo},{hi}"),
            (self.max * hi <= 1 + 1e-9, "flux_frac", f"{self.max} clumps of up to {hi} of the flux can sum to more "
                                                     "than the whole source (need max x hi <= 1)"),
            (finite(s_lo, s_hi) and 0 < s_lo <= s_hi, "sigma_arcsec",
             f"must be lo,hi with 0 < lo <= hi, got {s_lo},{s_hi}"),
            (finite(self.radius_reff) and self.radius_reff > 0, "radius_reff", f"must be > 0, got {self.radius_reff}"),
        )
        for ok, name, message in checks:
            if not ok:
                sep = " " if message.startswith("must") else ": "
                raise ClumpPriorError(name, f"--source_clumps_{name}{sep}{message}")
        return self


class ClumpPriorError(DHSError):
    """A bad ``ClumpPrior``; ``field`` is the offending field (flux_frac, sigma_arcsec, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def draw_clumps(rng: np.random.Generator, lenses: dict, prior: ClumpPrior) -> dict:
    """(N, prior.max) clump columns for every row (the caller blanks controls): offsets ``src_clump_x/y``
    from the source centre in the source plane (arcsec, the stamp's axes), Gaussian ``src_clump_sigma``
    (arcsec) and ``src_clump_frac`` (share of the unlensed flux, the same in every band); empty slots NaN."""
    n, k = len(lenses["src_reff"]), int(prior.max)
    shape = (n, k)
    count = rng.integers(0, k + 1, n)
    radius = prior.radius_reff * lenses["src_reff"][:, None] * np.sqrt(rng.random(shape))
    angle = rng.random(shape) * 2 * np.pi
    sq = np.sqrt(lenses["src_q"])[:, None]
    major, minor = radius * np.cos(angle) / sq, radius * np.sin(angle) * sq  # R^2 = q major^2 + minor^2 / q
    c, s = np.cos(lenses["src_phi"])[:, None], np.sin(lenses["src_phi"])[:, None]
    out = {"src_clump_x": c * major - s * minor, "src_clump_y": s * major + c * minor,
           "src_clump_sigma": rng.uniform(*prior.sigma_arcsec, shape),
           "src_clump_frac": rng.uniform(*prior.flux_frac, shape)}
    empty = np.arange(k)[None, :] >= count[:, None]
    for v in out.values():
        v[empty] = np.nan
    return out


# ----------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------

def _stream(seed: int, name: str) -> np.random.Generator:
    """One independent generator per component, so adding a component never changes the others."""
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), key]))


def parse_pair(text, flag: str) -> tuple[float, float]:
    """``lo,hi`` (a string or a pair) -> two finite floats."""
    return tuple(parse_floats(text, flag, count=2))


SPLIT_FRACS_TOLERANCE = 1e-6


def parse_split_fracs(value, flag: str = "--split_fracs") -> tuple[float, float, float]:
    """``train,val,test`` (a string or a sequence): three non-negative fractions that sum to 1. The one
    check of split fractions: `dhs manifest`, `dhs cutouts` and the workflow's config check use it."""
    fracs = tuple(parse_floats(value, flag, count=3))
    if any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > SPLIT_FRACS_TOLERANCE:
        raise DHSError(f"{flag} '{value}' must be three non-negative fractions train,val,test that sum to 1")
    return fracs


def build_manifest(n_tasks: int, seed: int, control_frac: float = 0.5, split_fracs=(0.7, 0.15, 0.15),
                   source_priors: str = "realistic", confuser_frac: float = 0.1,
                   n_regions: int | None = None, clumps: ClumpPrior = ClumpPrior(),
                   host_priors: str = "dr10", train_confuser_frac: float | None = None,
                   real: RealismPrior = RealismPrior()) -> pa.Table:
    """The Phase 4a table as a pyarrow Table (see the module docstring for conventions).

    ``real`` switches on the real-sky effects of ``simulation.realism`` (docs/realism.md), each drawn from its
    own stream into its own columns: with all of them off the table is column for column the plain one.

    ``train_confuser_frac`` (None: ``confuser_frac``) is the confuser rate of the training split's rows only,
    still the same in both classes: the network can see more of the lens-like features that set its false
    positives, while validation and test keep the population's rate."""
    clumps.check()
    real.check()
    if n_tasks < 1:
        raise DHSError(f"--n_tasks must be >= 1, got {n_tasks}")
    if not 0.0 <= control_frac <= 1.0:
        raise DHSError(f"--control_frac must be in [0, 1], got {control_frac}")
    if not 0.0 <= confuser_frac <= 1.0:
        raise DHSError(f"--confuser_frac must be in [0, 1], got {confuser_frac}")
    if train_confuser_frac is not None and not 0.0 <= train_confuser_frac <= 1.0:
        raise DHSError(f"--train_confuser_frac must be in [0, 1], got {train_confuser_frac}")
    if source_priors not in SOURCE_PRIORS:
        raise DHSError(f"unknown --source_priors '{source_priors}' (choose from {', '.join(SOURCE_PRIORS)})")
    if host_priors not in HOST_PRIORS:
        raise DHSError(f"unknown --host_priors '{host_priors}' (choose from {', '.join(HOST_PRIORS)})")
    if n_regions is None:
        n_regions = max(24, int(np.ceil(n_tasks / 40)))
    if n_regions < 1:
        raise DHSError(f"--n_regions must be >= 1, got {n_regions}")
    split_fracs = parse_split_fracs(split_fracs)

    n = int(n_tasks)
    ra, dec, region_id, region_index = draw_positions(_stream(seed, "sky"), n, int(n_regions))
    label_rng = _stream(seed, "label")
    is_control = np.zeros(n, np.int32)
    is_control[label_rng.permutation(n)[: int(round(control_frac * n))]] = 1
    cols: dict[str, object] = {
        "task_id": np.arange(n, dtype=np.int64),
        "ra": ra, "dec": dec,
        "brickname": brickname_of(ra, dec),
        "region_id": region_id.astype(np.int64),
        "region_split": region_split_of(region_id, split_fracs),
        "is_control": is_control,
        "noise_seed": _stream(seed, "noise").integers(0, 2**63 - 1, n, dtype=np.int64),
    }
    cols.update(draw_conditions(_stream(seed, "conditions"), region_index))
    hosts = draw_hosts(_stream(seed, "host"), n, host_priors)
    is_train = cols["region_split"] == "train"
    if real.train_centre_jitter_px:  # training rows only: the host (and the lens that follows it) off-centre
        dx, dy = realism.centre_jitter(_stream(seed, "centre_jitter"), n, real.train_centre_jitter_px)
        hosts["host_x"] = hosts["host_x"] + np.where(is_train, dx, 0.0)
        hosts["host_y"] = hosts["host_y"] + np.where(is_train, dy, 0.0)
    cols.update(hosts)
    cols.update(draw_neighbours(_stream(seed, "neighbours"), n))
    cols.update(draw_stars(_stream(seed, "stars"), n))
    frac = confuser_frac if train_confuser_frac is None else \
        np.where(cols["region_split"] == "train", train_confuser_frac, confuser_frac)
    cols.update(draw_confusers(_stream(seed, "confusers"), n, frac))
    if real.companion_rate or real.train_companion_rate:
        rate = real.companion_rate if real.train_companion_rate is None else \
            np.where(is_train, real.train_companion_rate, real.companion_rate)
        cols.update(realism.draw_companions(_stream(seed, "companions"), hosts, rate))
    if real.psf_shape:
        cols.update(realism.draw_psf_shapes(_stream(seed, "psf_shape"), n))
    if real.correlated_noise:
        cols[realism.NOISE_CORR_COLUMN] = np.ones(n, np.int8)
    if real.bad_pixel_rate:
        cols.update(realism.draw_bad_pixels(_stream(seed, "bad_pixels"), n, real.bad_pixel_rate))
    lenses = draw_lenses(_stream(seed, "lens"), hosts, source_priors)
    positive = is_control == 0
    for k, v in lenses.items():
        cols[k] = pa.array(v, pa.float64(), mask=~positive)
    if clumps.max > 0:  # own stream: the other draws are the same with and without clumps
        for k, v in draw_clumps(_stream(seed, "clumps"), lenses, clumps).items():
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float64()), clumps.max,
                                                        mask=pa.array(~positive))
    arrays = {}
    for k, v in cols.items():
        if isinstance(v, pa.Array):
            arrays[k] = v
        elif isinstance(v, np.ndarray) and v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float64()), v.shape[1])
        elif isinstance(v, np.ndarray) and v.dtype == object:
            arrays[k] = pa.array(list(v), pa.string())
        else:
            arrays[k] = pa.array(v)
    text = (f"seed={seed};host_priors={host_priors};source_priors={source_priors};n_regions={n_regions};"
            f"control_frac={control_frac};confuser_frac={confuser_frac};"
            f"split_fracs={','.join(map(str, split_fracs))}")
    if train_confuser_frac is not None:
        text += f";train_confuser_frac={train_confuser_frac}"
    if clumps.max > 0:
        text += (f";source_clumps=max:{clumps.max},flux_frac:{clumps.flux_frac[0]}-{clumps.flux_frac[1]},"
                 f"sigma_arcsec:{clumps.sigma_arcsec[0]}-{clumps.sigma_arcsec[1]},radius_reff:{clumps.radius_reff}")
    if real.any:
        text += ";" + real.describe()
    meta = {b"dhs_manifest": text.encode()}
    return pa.table(arrays).replace_schema_metadata(meta)


def add_test_controls(table: pa.Table, n_extra: int, seed: int, control_frac: float = 0.5,
                      split_fracs=(0.7, 0.15, 0.15), source_priors: str = "realistic", confuser_frac: float = 0.1,
                      clumps: ClumpPrior = ClumpPrior(), host_priors: str = "dr10",
                      real: RealismPrior = RealismPrior()) -> pa.Table:
    """Append ``n_extra`` control tasks in test-split sky regions, so that a test split can resolve low FPRs
    (1e-4 needs >= 10^4 controls) without growing the training set.

    The extra rows are drawn by ``build_manifest`` itself (all controls, a seed derived from ``seed``), then
    only the rows of test regions are kept: hosts, neighbours, stars, confusers and observing conditions
    follow exactly the distribution of the ordinary controls. task_ids continue after the table's."""
    if n_extra < 0:
        raise DHSError(f"--extra_test_controls must be >= 0, got {n_extra}")
    if n_extra == 0:
        return table
    test_frac = parse_split_fracs(split_fracs)[2]
    if test_frac <= 0:
        raise DHSError("--extra_test_controls needs a test split: the test fraction of --split_fracs is 0")
    extra_seed = int(np.random.SeedSequence([int(seed), 0x7E57C7]).generate_state(1)[0])
    n_draw = int(np.ceil(1.3 * n_extra / test_frac)) + 100
    while True:  # regions are clustered, so the test share of a draw varies: draw more until enough
        extra = build_manifest(n_draw, extra_seed, 1.0, split_fracs, source_priors, confuser_frac, clumps=clumps,
                               host_priors=host_priors, real=real)
        is_test = np.asarray(extra.column("region_split").to_pylist(), dtype=object) == "test"
        if is_test.sum() >= n_extra:
            break
        n_draw *= 2
    extra = extra.take(pa.array(np.flatnonzero(is_test)[:n_extra]))
    start = int(pc.max(table.column("task_id")).as_py()) + 1 if table.num_rows else 0
    extra = extra.set_column(extra.schema.get_field_index("task_id"), "task_id",
                             pa.array(np.arange(start, start + n_extra, dtype=np.int64)))
    extra = extra.cast(table.schema)
    text = table.schema.metadata[b"dhs_manifest"].decode() + f";extra_test_controls={n_extra}"
    return pa.concat_tables([table, extra]).replace_schema_metadata({b"dhs_manifest": text.encode()})


def first_extra_test_id(path) -> int | None:
    """The first task_id of the manifest's extra test-only controls (``add_test_controls``: they are its last
    ``extra_test_controls=N`` task_ids), or None when it has none or cannot be read (``read_manifest`` then
    says what is wrong with it)."""
    try:
        meta = (pq.read_schema(path).metadata or {}).get(b"dhs_manifest", b"").decode()
    except Exception:  # noqa: BLE001  (any unreadable file: read_manifest reports it)
        return None
    n_extra = sum(int(m) for m in re.findall(r"extra_test_controls=(\d+)", meta))
    if n_extra == 0:
        return None
    ids = pq.read_table(path, columns=["task_id"]).column("task_id")
    return int(pc.max(ids).as_py()) - n_extra + 1


MANIFEST_ROW_GROUP = 65536


def write_manifest(table: pa.Table, path) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=MANIFEST_ROW_GROUP)


def validate_manifest(table: pa.Table, where: str = "manifest") -> pa.Table:
    """Refuse a manifest that lacks a column or has non-finite observing conditions."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DHSError(f"{where} lacks column(s): {', '.join(missing)}")
    for c in CONDITION_COLUMNS + ("ra", "dec"):
        v = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(v)
        if bad.any():
            tid = table.column("task_id").to_numpy()[np.argmax(bad)]
            raise DHSError(f"{where}: column {c} is NaN/inf/null in {int(bad.sum())} row(s) (first task_id {tid})")
    if (table.column("psfsize_r").to_numpy() <= 0).any():
        raise DHSError(f"{where}: psfsize_r must be > 0 arcsec")
    return table


def read_manifest(path, row_filter=None) -> pa.Table:
    """Read and validate a manifest; ``row_filter(task_id) -> bool mask`` reads only those rows (a
    shard reads its own rows of a large manifest instead of all of it)."""
    path = Path(path)
    if not path.exists():
        raise DHSError(f"manifest {path} does not exist")
    try:
        if row_filter is None:
            table = pq.read_table(path)
        else:
            ids = pq.read_table(path, columns=["task_id"]).column("task_id").to_numpy()
            if len(np.unique(ids)) != len(ids):
                raise DHSError(f"manifest {path} has repeated task_id values")
            pieces = []  # one row group at a time: memory stays that of one row group + the kept rows
            with pq.ParquetFile(path) as pf:
                for i in range(pf.metadata.num_row_groups):
                    group = pf.read_row_group(i, use_threads=False)
                    mask = row_filter(group.column("task_id").to_numpy())
                    if mask.any():
                        pieces.append(group.filter(pa.array(mask)))
                    del group
                schema = pf.schema_arrow
            table = pa.concat_tables(pieces) if pieces else schema.empty_table()
    except DHSError:
        raise
    except Exception as exc:  # any unreadable file is bad input
        raise DHSError(f"manifest {path} is not a readable parquet file with a task_id column "
                       f"({type(exc).__name__})") from None
    return validate_manifest(table, f"manifest {path}")


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output manifest parquet")
    parser.add_argument("--n_tasks", type=int, default=None, help="number of simulated tasks (not with --hosts)")
    parser.add_argument("--hosts", default=None,
                        help="real host stamps from dhs cutouts: one task per usable host (sky.hosts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control_frac", type=float, default=0.5, help="fraction of unpaired controls")
    parser.add_argument("--split_fracs", default="0.7,0.15,0.15", help="train,val,test fractions of sky regions")
    parser.add_argument("--source_priors", default="realistic", choices=SOURCE_PRIORS)
    parser.add_argument("--host_priors", default="dr10", choices=HOST_PRIORS,
                        help="host LRGs like the DR10 parent sample (dr10) or the seed's n ~ 4 hosts (sota)")
    parser.add_argument("--confuser_frac", type=float, default=0.1,
                        help="fraction of stamps (both classes) with a lens-like confuser")
    parser.add_argument("--train_confuser_frac", type=float, default=None,
                        help="confuser rate of the training split only (both classes; default --confuser_frac)")
    parser.add_argument("--extra_test_controls", type=int, default=0,
                        help="extra control tasks in test-split regions only (low-FPR estimates; training unchanged)")
    parser.add_argument("--n_regions", type=int, default=None,
                        help="number of distinct sky cells the tasks are drawn from (default n_tasks/40, at least 24)")
    d = ClumpPrior()
    parser.add_argument("--source_clumps_max", type=int, default=d.max,
                        help="Gaussian clumps per lensed source, uniform in 0..max (0 = smooth Sersic sources)")
    parser.add_argument("--source_clumps_flux_frac", default=",".join(map(str, d.flux_frac)),
                        help="lo,hi: each clump's share of the unlensed source flux (max x hi <= 1)")
    parser.add_argument("--source_clumps_sigma_arcsec", default=",".join(map(str, d.sigma_arcsec)),
                        help="lo,hi: Gaussian sigma of a clump in the source plane, arcsec")
    parser.add_argument("--source_clumps_radius_reff", type=float, default=d.radius_reff,
                        help="clump centres within this many src_reff of the source centre")
    parser.add_argument("--companion_rate", type=float, default=0.0,
                        help="mean close companions per stamp, 0.5-5 arcsec from the host (both classes; docs/realism.md)")
    parser.add_argument("--train_companion_rate", type=float, default=None,
                        help="the training split's own companion rate (both classes; default --companion_rate)")
    parser.add_argument("--correlated_noise", action="store_true",
                        help="pixel noise correlated as in DR10 coadds (measured on real cutouts)")
    parser.add_argument("--psf_shape", action="store_true",
                        help="PSF ellipticity, band-to-band offsets and a one-sided wing on top of the round Moffat")
    parser.add_argument("--bad_pixel_rate", type=float, default=0.0,
                        help="fraction of stamps with one masked run or hot pixel")
    parser.add_argument("--train_centre_jitter_px", type=float, default=0.0,
                        help="extra host offset, uniform in a disc of this radius (pixels), training split only")


def realism_prior(args) -> RealismPrior:
    return RealismPrior(args.companion_rate, args.train_companion_rate, args.correlated_noise, args.psf_shape,
                        args.bad_pixel_rate, args.train_centre_jitter_px).check()


def clump_prior(args) -> ClumpPrior:
    return ClumpPrior(args.source_clumps_max, parse_pair(args.source_clumps_flux_frac, "--source_clumps_flux_frac"),
                      parse_pair(args.source_clumps_sigma_arcsec, "--source_clumps_sigma_arcsec"),
                      args.source_clumps_radius_reff).check()


def run(args) -> int:
    from darkhaloscope.io import check_writable

    check_writable(args.out, "--out")  # before the work, not after it
    if args.hosts is not None:
        from darkhaloscope.sky.hosts import run_manifest

        return run_manifest(args)
    if args.n_tasks is None:
        raise DHSError("--n_tasks is required (or --hosts DIR for real host stamps)")
    table = build_manifest(args.n_tasks, args.seed, args.control_frac, parse_split_fracs(args.split_fracs),
                           args.source_priors, args.confuser_frac, args.n_regions, clump_prior(args),
                           args.host_priors, args.train_confuser_frac, realism_prior(args))
    table = add_test_controls(table, args.extra_test_controls, args.seed, args.control_frac,
                              parse_split_fracs(args.split_fracs), args.source_priors, args.confuser_frac,
                              clump_prior(args), args.host_priors, realism_prior(args))
    write_manifest(table, args.out)
    splits = table.column("region_split").to_pylist()
    print(f"manifest: {table.num_rows} tasks ({int(table.column('is_control').to_numpy().sum())} controls), "
          f"train/val/test = {splits.count('train')}/{splits.count('val')}/{splits.count('test')} -> {args.out}")
    return 0
