"""Light profiles, the pixel grid, and the arc renderer against lenstronomy."""

import numpy as np
import pytest

from darkhaloscope.errors import DHSError
from darkhaloscope.physics import light

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.LightModel.light_model import LightModel  # noqa: E402
from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil  # noqa: E402
from lenstronomy.Util import param_util  # noqa: E402


@pytest.fixture
def exact_bn(monkeypatch):
    """lenstronomy's Sersic uses the approximation b_n = 1.9992 n - 0.3271 (3% off at n = 0.5, so its
    R_sersic is not exactly the half-light radius); we use the exact b_n. Give the reference the same
    profile definition so that the comparison tests everything else."""
    monkeypatch.setattr(SersicUtil, "b_n", staticmethod(light.sersic_b))


def _lenstronomy_amp(flux, r_eff, n):
    """lenstronomy's SERSIC_ELLIPSE amp is the surface brightness at R_sersic."""
    return light.sersic_norm(flux, r_eff, n)


@pytest.mark.parametrize("n,q,phi", [(0.5, 1.0, 0.0), (1.0, 0.3, 0.7), (2.0, 0.6, -1.2), (4.0, 0.8, 2.5)])
def test_sersic_matches_lenstronomy_sersic_ellipse(n, q, phi, exact_bn):
    x, y = light.pixel_grid(48, 1, 0.1)
    mine = light.sersic(x, y, 7.0, 0.4, n, q, phi, 0.3, -0.2)
    e1, e2 = param_util.phi_q2_ellipticity(phi, q)
    ref = LightModel(["SERSIC_ELLIPSE"]).surface_brightness(
        x.ravel(), y.ravel(),
        [dict(amp=_lenstronomy_amp(7.0, 0.4, n), R_sersic=0.4, n_sersic=n, e1=e1, e2=e2, center_x=0.3, center_y=-0.2)],
    ).reshape(x.shape)
    np.testing.assert_allclose(mine, ref, rtol=1e-9)


def test_lenstronomy_stock_bn_is_an_approximation():
    n = np.array([0.5, 1.0, 2.0, 4.0])
    assert np.abs(SersicUtil.b_n(n) / light.sersic_b(n) - 1).max() > 0.02  # why exact_bn exists


@pytest.mark.parametrize("n", (0.5, 1.0, 2.0, 4.0))
def test_sersic_total_flux_and_half_light_radius(n):
    step = 0.02
    x, y = light.pixel_grid(1000, 1, step)  # 20" box; r_eff 0.6"
    img = light.sersic(x, y, 5.0, 0.6, n, 0.5, 0.4, 0.0, 0.0)
    r = light.elliptical_radius(x, y, 0.5, 0.4, 0.0, 0.0)
    inside = light.sersic_enclosed_fraction(4.0, 0.6, n)  # an ellipse well inside the box
    assert img[r < 4.0].sum() * step**2 == pytest.approx(5.0 * inside, rel=3e-3)
    assert img[r < 0.6].sum() * step**2 == pytest.approx(2.5, rel=1e-2)


def test_sersic_broadcasts_over_a_batch():
    x, y = light.pixel_grid(16)
    flux = np.array([1.0, 2.0])[:, None, None]
    img = light.sersic(x, y, flux, 0.5, 1.0, 0.7, 0.1, 0.0, 0.0)
    assert img.shape == (2, 16, 16)
    np.testing.assert_allclose(img[1], 2 * img[0])
    with pytest.raises(DHSError):
        light.sersic(x, y, 1.0, 0.5, 1.0, 1.5, 0.0, 0.0, 0.0)


def test_pixel_grid_and_binning():
    x, y = light.pixel_grid(64)
    assert x.shape == (64, 64)
    assert x[0, 0] == pytest.approx(-31.5 * 0.262) and y[-1, 0] == pytest.approx(31.5 * 0.262)
    assert np.all(np.diff(x, axis=1) > 0) and np.all(np.diff(y, axis=0) > 0)  # x with column, y with row
    xs, ys = light.pixel_grid(64, 4)
    assert xs.shape == (256, 256)
    np.testing.assert_allclose(light.bin_image(xs, 4), x, atol=1e-12)
    np.testing.assert_allclose(light.bin_image(ys, 4), y, atol=1e-12)
