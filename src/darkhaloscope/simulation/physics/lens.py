"""Singular isothermal ellipsoid (SIE) plus external shear: deflection, convergence, ray shooting.

Conventions (docs/physics.md): arcsec, angles in radians counter-clockwise from +x, ``phi`` is the
major-axis angle of the mass, ``q`` = minor / major axis ratio of the iso-convergence contours.
The SIE convergence is kappa = theta_E / (2 sqrt(q x'^2 + y'^2 / q)), i.e. the form
kappa = b / (2 sqrt(q^2 x'^2 + y'^2)) with b = theta_E sqrt(q): the kappa = 1/2 contour then encloses
the area pi theta_E^2 for every q (lenstronomy's SIE convention). Without the sqrt(q) the Einstein
radius would grow as 1/sqrt(q). External shear (gamma1, gamma2) has the potential
psi = (gamma1 (x^2 - y^2) + 2 gamma2 x y) / 2 about the lens centre (x0, y0).

The SIE formulas are written here (vectorised numpy) rather than calling lenstronomy because the
renderer needs them over a whole batch of lenses at once; lenstronomy is the test reference.

This module is the reference lens equation of the package. ``physics/render.py`` evaluates the same
equation again inside its fused numba kernels (for speed); tests/test_physics_render.py checks those
kernels against this module (and both against lenstronomy). What render.py takes from here (``q_capped``,
``PSI_FLOOR``, ``rotate_shear``) is public.
"""

from __future__ import annotations

import numpy as np

# q is capped just below 1: the q -> 1 limit of arctan(f t) / f is smooth, but f = sqrt(1 - q^2) = 0
# would divide by zero. The cap is 1 - 64 eps of the working precision (float64: 1 - 1.4e-14,
# float32: 1 - 7.6e-6); the deflection there differs from the q = 1 one by < 1e-5 relative.
def q_capped(q):
    q = np.asarray(q)
    dtype = q.dtype if q.dtype in (np.float32, np.float64) else np.float64
    return np.minimum(q.astype(dtype, copy=False), dtype.type(1.0 - 64 * np.finfo(dtype).eps))


# psi floor (arcsec): keeps the deflection finite (and zero-free) exactly at the singular centre.
PSI_FLOOR = 1e-12


def _rotate_in(x, y, phi, x0, y0):
    dx = x - x0
    dy = y - y0
    c, s = np.cos(phi), np.sin(phi)
    return c * dx + s * dy, -s * dx + c * dy, c, s


def sie_deflection(x, y, theta_e, q, phi, x0=0.0, y0=0.0):
    """SIE deflection (alpha_x, alpha_y) in arcsec at image-plane positions (x, y); broadcasts.
    Computes in the precision of the inputs (float32 parameters and positions stay float32)."""
    xp, yp, c, s = _rotate_in(x, y, phi, x0, y0)
    q = q_capped(q)
    f = np.sqrt(1 - q * q)
    b_over_f = theta_e * np.sqrt(q) / f
    psi = np.maximum(np.sqrt((q * xp) ** 2 + yp**2), PSI_FLOOR)
    axp = b_over_f * np.arctan(f * xp / psi)
    ayp = b_over_f * np.arctanh(f * yp / psi)
    return c * axp - s * ayp, s * axp + c * ayp


def sie_convergence(x, y, theta_e, q, phi, x0=0.0, y0=0.0):
    """SIE convergence kappa at (x, y)."""
    xp, yp, _, _ = _rotate_in(x, y, phi, x0, y0)
    q = q_capped(q)
    b = theta_e * np.sqrt(q)
    return b / (2 * np.maximum(np.sqrt((q * xp) ** 2 + yp**2), PSI_FLOOR))


def shear_deflection(x, y, gamma1, gamma2, x0=0.0, y0=0.0):
    """Deflection of an external shear expanded about (x0, y0)."""
    dx = x - x0
    dy = y - y0
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


def deflection(x, y, theta_e, q, phi, gamma1, gamma2, x0=0.0, y0=0.0):
    """Total SIE + shear deflection (shear about the lens centre)."""
    ax, ay = sie_deflection(x, y, theta_e, q, phi, x0, y0)
    sx, sy = shear_deflection(x, y, gamma1, gamma2, x0, y0)
    return ax + sx, ay + sy


def rotate_shear(gamma1, gamma2, phi):
    """Shear components in a frame rotated by ``phi`` (a spin-2 quantity turns by -2 phi)."""
    c2, s2 = np.cos(2 * phi), np.sin(2 * phi)
    return gamma1 * c2 + gamma2 * s2, gamma2 * c2 - gamma1 * s2


def ray_shoot_lens_frame(xp, yp, theta_e, q, gamma1p, gamma2p):
    """beta = theta - alpha in the lens frame: origin at the lens centre, x' along the SIE major axis,
    shear components (gamma1p, gamma2p) given in that frame (see rotate_shear). ray_shoot wraps it for
    the stamp frame; the renderer's compiled trace computes the same expression (tests compare them).
    Keeps the precision of the inputs."""
    q = q_capped(q)
    f = np.sqrt(1 - q * q)
    b_over_f = theta_e * np.sqrt(q) / f
    inv_psi = 1 / np.maximum(np.sqrt((q * xp) ** 2 + yp * yp), PSI_FLOOR)
    bx = xp - b_over_f * np.arctan(f * xp * inv_psi) - (gamma1p * xp + gamma2p * yp)
    by = yp - b_over_f * np.arctanh(f * yp * inv_psi) - (gamma2p * xp - gamma1p * yp)
    return bx, by


def ray_shoot(x, y, theta_e, q, phi, gamma1, gamma2, x0=0.0, y0=0.0):
    """Source-plane positions beta = theta - alpha(theta) (same frame as x, y) for SIE + shear."""
    xp, yp, c, s = _rotate_in(x, y, phi, x0, y0)
    g1p, g2p = rotate_shear(gamma1, gamma2, phi)
    bxp, byp = ray_shoot_lens_frame(xp, yp, theta_e, q, g1p, g2p)
    return x0 + c * bxp - s * byp, y0 + s * bxp + c * byp


def magnification_map(x, y, theta_e, q, phi, gamma1, gamma2, x0=0.0, y0=0.0, step=1e-4):
    """Signed point-source magnification 1 / det(d beta / d theta), by central differences of the
    analytic deflection (used to find critical curves in tests and diagnostics)."""
    args = (theta_e, q, phi, gamma1, gamma2, x0, y0)
    bxp, byp = ray_shoot(x + step, y, *args)
    bxm, bym = ray_shoot(x - step, y, *args)
    bx_yp, by_yp = ray_shoot(x, y + step, *args)
    bx_ym, by_ym = ray_shoot(x, y - step, *args)
    a11 = (bxp - bxm) / (2 * step)
    a21 = (byp - bym) / (2 * step)
    a12 = (bx_yp - bx_ym) / (2 * step)
    a22 = (by_yp - by_ym) / (2 * step)
    return 1.0 / (a11 * a22 - a12 * a21)
