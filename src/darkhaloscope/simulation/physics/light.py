"""Surface-brightness profiles and the pixel grid they are evaluated on.

Conventions (see docs/physics.md): positions in arcsec relative to the stamp centre, which is pixel
(size - 1) / 2 on both axes; x grows with the image column, y with the image row; angles in radians,
counter-clockwise from +x. Ellipses use the "product-average" (intermediate-axis) radius
R^2 = q x'^2 + y'^2 / q, where x' is along the major axis: the half-light radius ``r_eff`` is
sqrt(a * b) of the half-light ellipse, the same convention as lenstronomy's ``SERSIC_ELLIPSE``.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy.special import gammainc, gammaincinv, gammaln

from darkhaloscope.errors import DHSError
from darkhaloscope.stamps.contract import PIXEL_SCALE_ARCSEC, STAMP_SIZE

# Radii below this (arcsec) are floored so the Sersic cusp stays finite at the centre (as lenstronomy).
R_FLOOR = 1e-5


def sersic_b(n):
    """b_n such that the Sersic radius r_eff encloses half of the total flux: P(2n, b_n) = 1/2."""
    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def sersic_norm(flux, r_eff, n):
    """Surface brightness at r_eff (flux / arcsec^2) for a Sersic profile of total flux ``flux``.

    Total flux = I_e r_eff^2 2 pi n e^{b_n} b_n^{-2n} Gamma(2n); with the product-average radius the
    ellipse R = const has area pi R^2 whatever q is, so the formula does not depend on q.
    """
    n = np.asarray(n, dtype=np.float64)
    b = sersic_b(n)
    log_total = np.log(2.0 * np.pi * n) + b - 2.0 * n * np.log(b) + gammaln(2.0 * n)
    return np.asarray(flux, dtype=np.float64) / (np.asarray(r_eff, dtype=np.float64) ** 2 * np.exp(log_total))


def sersic_enclosed_fraction(radius, r_eff, n):
    """Fraction of a Sersic profile's total flux inside elliptical radius ``radius`` (same convention)."""
    n = np.asarray(n, dtype=np.float64)
    b = sersic_b(n)
    return gammainc(2.0 * n, b * (np.asarray(radius, dtype=np.float64) / r_eff) ** (1.0 / n))


def elliptical_radius(x, y, q, phi, x0, y0):
    """Product-average elliptical radius sqrt(q x'^2 + y'^2 / q) about (x0, y0), major axis at ``phi``."""
    dx = x - x0
    dy = y - y0
    c, s = np.cos(phi), np.sin(phi)
    xp = c * dx + s * dy
    yp = -s * dx + c * dy
    sq = np.sqrt(q)
    return np.sqrt((xp * sq) ** 2 + (yp / sq) ** 2)


def sersic(x, y, flux, r_eff, n, q, phi, x0, y0):
    """Elliptical Sersic surface brightness (flux per arcsec^2) whose analytic total is ``flux``.

    All arguments broadcast: e.g. x, y of shape (H, W) or (B, H, W) and parameters of shape (B, 1, 1).
    """
    r_eff = np.asarray(r_eff, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if np.any(~(r_eff > 0)) or np.any(~(n > 0)) or np.any(~((q > 0) & (q <= 1))):
        raise DHSError("sersic needs r_eff > 0, n > 0 and 0 < q <= 1")
    radius = np.maximum(elliptical_radius(x, y, q, phi, x0, y0), R_FLOOR)
    b = sersic_b(n)
    i_e = sersic_norm(flux, r_eff, n)
    return i_e * np.exp(-b * ((radius / np.maximum(r_eff, R_FLOOR)) ** (1.0 / n) - 1.0))


@numba.njit(cache=True)
def _grid_r2(ux, uy, vx, vy, floor):
    """(M, H, W) floored R^2 = max((ux[m, j] + uy[m, i])^2 + (vx[m, j] + vy[m, i])^2, floor) from the
    per-column (M, W) and per-row (M, H) terms of the rotated, q-scaled coordinates. Compiled: numpy
    needs two broadcast sums, two squares, an add and a maximum, six full-size passes."""
    out = np.empty((ux.shape[0], uy.shape[1], ux.shape[1]), ux.dtype)
    for m in range(ux.shape[0]):
        for i in range(uy.shape[1]):
            for j in range(ux.shape[1]):
                u = ux[m, j] + uy[m, i]
                v = vx[m, j] + vy[m, i]
                r2 = u * u + v * v
                out[m, i, j] = floor if r2 < floor else r2  # NaN stays NaN, as with np.maximum
    return out


@numba.njit(cache=True)
def _grid_r2_hole(ux, uy, vx, vy, floor, hole2):
    """``_grid_r2`` with R^2 = +inf (a zero profile) where R^2 < hole2[m]: the samples inside profile m's
    hole, whose flux ``sersic_inner_pixels`` supplies."""
    out = _grid_r2(ux, uy, vx, vy, floor)
    for m in range(out.shape[0]):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                if out[m, i, j] < hole2[m]:
                    out[m, i, j] = np.inf
    return out


def sersic_on_grid(xs, ys, flux, r_eff, n, q, phi, x0, y0, dtype=np.float32, hole=None) -> np.ndarray:
    """``sersic`` for M profiles on the regular grid x = xs[None, :], y = ys[:, None] (1-D arcsec
    coordinates): parameters (M,) -> (M, len(ys), len(xs)) in ``dtype`` (float32 by default).

    Same formula as ``sersic``, evaluated with few full-size passes: the rotated, q-scaled coordinates
    are sums of a per-column and a per-row term (built on the 1-D axes), and
    I_e exp(-b ((R / r_eff)^(1/n) - 1)) becomes exp(b - b exp((ln R^2 / 2 - ln r_eff) / n)) I_e, all
    in place. The background of a scene uses it (about 4x cheaper than ``sersic`` on full grids).

    ``hole`` (M,) arcsec, optional: samples with elliptical radius below it are zero (the cusp, whose
    flux ``sersic_inner_pixels`` adds exactly)."""
    col = lambda v: np.asarray(v, dtype=np.float64).reshape(-1, 1, 1)  # noqa: E731
    r_eff, n, q = col(r_eff), col(n), col(q)
    if np.any(~(r_eff > 0)) or np.any(~(n > 0)) or np.any(~((q > 0) & (q <= 1))):
        raise DHSError("sersic needs r_eff > 0, n > 0 and 0 < q <= 1")
    phi, x0, y0 = col(phi), col(x0), col(y0)
    xs = np.asarray(xs, dtype=np.float64)[None, None, :]
    ys = np.asarray(ys, dtype=np.float64)[None, :, None]
    c, s, sq = np.cos(phi), np.sin(phi), np.sqrt(q)
    # sqrt(q) x' = sqrt(q) (c (x - x0) + s (y - y0)); y' / sqrt(q) = (-s (x - x0) + c (y - y0)) / sqrt(q)
    terms = ((sq * (c * (xs - x0))).astype(dtype), (sq * s * (ys - y0)).astype(dtype),  # (M, 1, W), (M, H, 1)
             (-s * (xs - x0) / sq).astype(dtype), (c * (ys - y0) / sq).astype(dtype))
    m = np.broadcast_shapes(*(a.shape[:1] for a in terms))  # parameters of length 1 broadcast, as before
    ux, uy, vx, vy = (np.ascontiguousarray(np.broadcast_to(a, m + a.shape[1:]).reshape(m[0], -1)) for a in terms)
    if hole is None:
        u = _grid_r2(ux, uy, vx, vy, dtype(R_FLOOR**2))
    else:
        hole2 = np.broadcast_to(np.asarray(hole, np.float64) ** 2, m).astype(dtype)
        u = _grid_r2_hole(ux, uy, vx, vy, dtype(R_FLOOR**2), hole2)
    np.log(u, out=u)
    b = sersic_b(n)
    r_e = np.maximum(r_eff, R_FLOOR)
    u *= (0.5 / n).astype(dtype)
    u -= (np.log(r_e) / n).astype(dtype)
    np.exp(u, out=u)
    u *= (-b).astype(dtype)
    u += b.astype(dtype)
    np.exp(u, out=u)
    u *= sersic_norm(col(flux), r_eff, n).astype(dtype)
    return u


def sersic_inner_pixels(r_eff, n, q, phi, x0, y0, radius, size: int = STAMP_SIZE, scale: float = PIXEL_SCALE_ARCSEC,
                        n_log: int = 10, n_lin: int = 16, n_ang: int = 96) -> np.ndarray:
    """(M, size, size) float64: the share of each unit-flux Sersic profile's flux inside elliptical radius
    ``radius`` (arcsec, (M,) or scalar), per pixel, exact in radius.

    Point samples cannot integrate a steep cusp (n >~ 3 at r_eff of a pixel or less): a sample that lands
    near the centre of an n = 6 profile can carry tens of per cent of the flux. Inside ``radius`` this
    takes the flux of elliptical annuli from the analytic enclosed fraction (``sersic_enclosed_fraction``;
    ``n_log`` geometric radii from 1e-6 to 1/16 of ``radius`` where the cusp is steep, then ``n_lin`` linear
    steps to ``radius`` where most of a shallow profile's flux is; the innermost disc included) and
    spreads each, at its middle radius, over ``n_ang``
    points uniform in the angle t of x' = R cos t / sqrt(q), y' = R sin t sqrt(q) (the area element is
    R dR dt, so an elliptical annulus's flux is uniform in t), each point's share going to the pixel it
    falls in (points outside the stamp are dropped). Pair with ``sersic_on_grid(..., hole=radius)``."""
    col = lambda v: np.broadcast_to(np.asarray(v, np.float64), np.shape(r_eff)).reshape(-1, 1)  # noqa: E731
    r_eff, n, q, phi, x0, y0, radius = (col(v) for v in (r_eff, n, q, phi, x0, y0, radius))
    steps = np.concatenate([[0.0], np.geomspace(1e-6, 1.0 / 16, n_log), np.linspace(1.0 / 16, 1.0, n_lin + 1)[1:]])
    edges = radius * steps                                                     # (M, annuli + 1)
    shares = np.diff(sersic_enclosed_fraction(edges, r_eff, n), axis=1)       # (M, annuli)
    mid = np.concatenate([edges[:, 1:2] / 2, (edges[:, 1:-1] + edges[:, 2:]) / 2], axis=1)
    t = (np.arange(n_ang) + 0.5) * (2 * np.pi / n_ang)
    out = np.zeros((len(r_eff), size, size))
    _spread_inner(out, shares / n_ang, mid, np.cos(t), np.sin(t), np.sqrt(q[:, 0]), np.cos(phi[:, 0]),
                  np.sin(phi[:, 0]), x0[:, 0], y0[:, 0], float(scale))
    return out


@numba.njit(cache=True)
def _spread_inner(out, share, mid, cos_t, sin_t, sq, cos_phi, sin_phi, x0, y0, scale):
    """out[m, row, col] += share[m, k] for each annulus k of profile m at each angle of (cos_t, sin_t):
    the point x' = mid cos t / sqrt(q), y' = mid sin t sqrt(q), rotated by phi about (x0, y0), falls in
    pixel (row, col); points off the stamp are dropped. Compiled: numpy needs ~15 passes over
    (M, annuli, angles) temporaries and a bincount, ~10x slower for the 16 stamps of a chunk."""
    size = out.shape[1]
    half = size / 2.0
    for m in range(out.shape[0]):
        for k in range(mid.shape[1]):
            a = mid[m, k] / sq[m]
            b = mid[m, k] * sq[m]
            w = share[m, k]
            for j in range(cos_t.shape[0]):
                xp = a * cos_t[j]
                yp = b * sin_t[j]
                col = int(np.floor((x0[m] + cos_phi[m] * xp - sin_phi[m] * yp) / scale + half))
                row = int(np.floor((y0[m] + sin_phi[m] * xp + cos_phi[m] * yp) / scale + half))
                if 0 <= row < size and 0 <= col < size:
                    out[m, row, col] += w


def pixel_grid(size: int = STAMP_SIZE, supersample: int = 1, scale: float = PIXEL_SCALE_ARCSEC):
    """(x, y) arcsec coordinates of the (sub-)pixel centres of a size x size stamp, each of shape
    (size * supersample, size * supersample), indexed [row, column]; the stamp centre is 0.

    Sub-pixel k of pixel i (0-based) sits at i - 1/2 + (k + 1/2) / supersample pixels.
    """
    if supersample < 1 or int(supersample) != supersample:
        raise DHSError(f"supersample must be a positive integer, got {supersample}")
    s = int(supersample)
    centre = (size - 1) / 2.0
    pos = (np.arange(size * s) + 0.5) / s - 0.5  # sub-pixel centres in pixel units
    coords = (pos - centre) * scale
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return x, y


def bin_image(image, supersample: int):
    """Mean over supersample x supersample blocks of the last two axes: (..., H*s, W*s) -> (..., H, W)."""
    s = int(supersample)
    image = np.asarray(image)
    if s == 1:
        return image
    *lead, hs, ws = image.shape
    if hs % s or ws % s:
        raise DHSError(f"image of shape {image.shape} does not bin by {s}")
    return image.reshape(*lead, hs // s, s, ws // s, s).mean(axis=(-3, -1))
