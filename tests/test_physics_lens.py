"""SIE + shear lensing against lenstronomy, and the SIE's Einstein radius (sqrt(q) normalisation)."""

import numpy as np
import pytest

from darkhaloscope.simulation.physics import lens

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.Util import param_util  # noqa: E402


def _kwargs(theta_e, q, phi, g1, g2, x0, y0):
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    return [
        dict(theta_E=theta_e, e1=e1, e2=e2, center_x=x0, center_y=y0),
        dict(gamma1=g1, gamma2=g2, ra_0=x0, dec_0=y0),  # shear expanded about the lens centre
    ]


@pytest.mark.parametrize("q", (0.3, 0.5, 0.8, 1.0))
def test_deflection_matches_lenstronomy_sie_plus_shear(q):
    rng = np.random.default_rng(int(q * 10))
    x, y = rng.uniform(-6, 6, (2, 2000))
    args = (1.4, q, 0.6, 0.12, -0.09, 0.25, -0.31)
    ref_x, ref_y = LensModel(["SIE", "SHEAR"]).alpha(x, y, _kwargs(*args))
    ax, ay = lens.deflection(x, y, *args)
    np.testing.assert_allclose(ax, ref_x, atol=1e-7)
    np.testing.assert_allclose(ay, ref_y, atol=1e-7)
    bx, by = lens.ray_shoot(x, y, *args)
    ref_bx, ref_by = LensModel(["SIE", "SHEAR"]).ray_shooting(x, y, _kwargs(*args))
    np.testing.assert_allclose(bx, ref_bx, atol=1e-7)
    np.testing.assert_allclose(by, ref_by, atol=1e-7)
    # float32 inputs are computed in float32 and stay accurate to far below a pixel (0.262")
    a32 = lens.deflection(x.astype(np.float32), y.astype(np.float32), *(np.float32(a) for a in args))
    assert a32[0].dtype == np.float32
    np.testing.assert_allclose(a32[0], ref_x, atol=2e-5)
    np.testing.assert_allclose(a32[1], ref_y, atol=2e-5)


def test_convergence_and_magnification_match_lenstronomy():
    rng = np.random.default_rng(5)
    x, y = rng.uniform(-4, 4, (2, 500))
    args = (1.1, 0.45, -0.4, 0.05, 0.1, 0.1, 0.2)
    model = LensModel(["SIE", "SHEAR"])
    np.testing.assert_allclose(lens.sie_convergence(x, y, *args[:3], *args[5:]), model.kappa(x, y, _kwargs(*args)),
                               rtol=1e-3)
    np.testing.assert_allclose(lens.magnification_map(x, y, *args), model.magnification(x, y, _kwargs(*args)),
                               rtol=2e-3)


def _area_kappa_half(kappa_fn, theta_e, q):
    step = 0.004 * theta_e
    half = 2.0 * theta_e / np.sqrt(q)  # the kappa = 1/2 ellipse has semi-major axis theta_e / sqrt(q)
    g = np.arange(-half, half, step) + step / 2
    x, y = np.meshgrid(g, g)
    return np.count_nonzero(kappa_fn(x, y) >= 0.5) * step**2


@pytest.mark.parametrize("q", (0.3, 0.45, 0.6, 0.8, 1.0))
def test_einstein_radius_area_inside_kappa_half(q):
    theta_e = 1.3
    area = _area_kappa_half(lambda x, y: lens.sie_convergence(x, y, theta_e, q, 0.7, 0.0, 0.0), theta_e, q)
    assert area == pytest.approx(np.pi * theta_e**2, rel=0.01)


@pytest.mark.parametrize("q", (0.3, 0.5, 0.8))
def test_sie_normalisation_keeps_the_einstein_radius_for_any_q(q):
    """The library's SIE with b = theta_E sqrt(q) (the pitfall is b = theta_E, which grows the Einstein
    radius as 1/sqrt(q)). (1) Its kappa = 1/2 contour is the ellipse with semi-axes theta_E / sqrt(q) along
    phi and theta_E sqrt(q) across it, area pi theta_E^2 (b = theta_E would give theta_E / q and theta_E).
    (2) Its deflection carries the mass inside that ellipse: div(alpha) = 2 kappa, so the outward flux of
    alpha through the ellipse is 2 x (enclosed kappa) = 2 pi theta_E^2 (b = theta_E: 2 pi theta_E^2 / q).
    Shear is divergence-free and is included."""
    theta_e, phi, x0, y0 = 1.3, 0.7, 0.2, -0.1
    a, b = theta_e / np.sqrt(q), theta_e * np.sqrt(q)
    ux, uy = np.cos(phi), np.sin(phi)
    for r, (dx, dy) in ((a, (ux, uy)), (b, (-uy, ux))):
        for sign in (1.0, -1.0):
            kappa = lens.sie_convergence(x0 + sign * r * dx, y0 + sign * r * dy, theta_e, q, phi, x0, y0)
            assert kappa == pytest.approx(0.5, rel=1e-12)
    t = np.linspace(0.0, 2 * np.pi, 4096, endpoint=False)
    xe, ye = a * np.cos(t), b * np.sin(t)  # the ellipse in the lens frame, anticlockwise
    x, y = x0 + ux * xe - uy * ye, y0 + uy * xe + ux * ye
    dx_dt, dy_dt = -ux * a * np.sin(t) - uy * b * np.cos(t), -uy * a * np.sin(t) + ux * b * np.cos(t)
    ax, ay = lens.deflection(x, y, theta_e, q, phi, 0.07, -0.04, x0, y0)
    flux = np.mean(ax * dy_dt - ay * dx_dt) * 2 * np.pi  # periodic trapezoid rule: spectrally accurate
    assert flux == pytest.approx(2 * np.pi * theta_e**2, rel=1e-8)


def test_sis_ring_maps_to_the_source_at_the_centre():
    t = np.linspace(0, 2 * np.pi, 50)
    x, y = 1.7 * np.cos(t) + 0.3, 1.7 * np.sin(t) - 0.2
    bx, by = lens.ray_shoot(x, y, 1.7, 1.0, 0.3, 0.0, 0.0, 0.3, -0.2)
    np.testing.assert_allclose(bx, 0.3, atol=1e-9)
    np.testing.assert_allclose(by, -0.2, atol=1e-9)


def test_deflection_is_finite_at_the_singular_centre():
    ax, ay = lens.sie_deflection(np.array([0.0]), np.array([0.0]), 1.0, 0.5, 0.3, 0.0, 0.0)
    assert np.isfinite(ax).all() and np.isfinite(ay).all()
