"""Surface-brightness profiles and the pixel grid they are evaluated on.

Conventions (see docs/physics.md): positions in arcsec relative to the stamp centre, which is pixel
(size - 1) / 2 on both axes; x grows with the image column, y with the image row; angles in radians,
counter-clockwise from +x. Ellipses use the "product-average" (intermediate-axis) radius
R^2 = q x'^2 + y'^2 / q, where x' is along the major axis: the half-light radius ``r_eff`` is
sqrt(a * b) of the half-light ellipse, the same convention as lenstronomy's ``SERSIC_ELLIPSE``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammainc, gammaincinv, gammaln

from darkhaloscope.contract import PIXEL_SCALE_ARCSEC, STAMP_SIZE
from darkhaloscope.errors import DHSError

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
