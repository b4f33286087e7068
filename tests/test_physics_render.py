"""Light profiles, the pixel grid, and the arc renderer against lenstronomy."""

import numpy as np
import pytest

from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.physics import light

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


# ----------------------------------------------------------------------------------------------------
# The arc renderer against lenstronomy
# ----------------------------------------------------------------------------------------------------
from lenstronomy.Data.imaging_data import ImageData  # noqa: E402
from lenstronomy.Data.psf import PSF  # noqa: E402
from lenstronomy.ImSim.image_model import ImageModel  # noqa: E402
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.LensModel.lens_model_extensions import LensModelExtensions  # noqa: E402

from darkhaloscope.simulation.physics import psf, render  # noqa: E402

SCALE = 0.262
N_PIX = 64


def _lens_kwargs(L, i):
    e1, e2 = param_util.phi_q2_ellipticity(L["phi"][i], L["q"][i])
    return [
        dict(theta_E=L["theta_e"][i], e1=e1, e2=e2, center_x=L["x0"][i], center_y=L["y0"][i]),
        dict(gamma1=L["gamma1"][i], gamma2=L["gamma2"][i], ra_0=L["x0"][i], dec_0=L["y0"][i]),
    ]


def _lenstronomy_arc(L, S, i, band, kernel, supersample, clumps=None):
    """lenstronomy's full render: supersampling_factor everywhere, PSF 'PIXEL' with our kernel. With
    ``clumps`` ((B, K) arrays x, y, sigma, frac; NaN frac = empty slot) each clump is one more source
    component, a 'GAUSSIAN' (amp = its total flux), and the Sersic keeps 1 - sum(frac) of the flux."""
    data = ImageData(image_data=np.zeros((N_PIX, N_PIX)), ra_at_xy_0=-(N_PIX - 1) / 2 * SCALE,
                     dec_at_xy_0=-(N_PIX - 1) / 2 * SCALE, transform_pix2angle=np.eye(2) * SCALE)
    flux, cx, cy = S[f"flux_{band}"][i], L["x0"][i] + S["x"][i], L["y0"][i] + S["y"][i]
    used = [] if clumps is None else [j for j, f in enumerate(clumps["frac"][i]) if np.isfinite(f) and f != 0]
    smooth = 1.0 - sum(clumps["frac"][i][j] for j in used) if used else 1.0
    model = ImageModel(data, PSF(psf_type="PIXEL", kernel_point_source=kernel),
                       lens_model_class=LensModel(["SIE", "SHEAR"]),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"] + ["GAUSSIAN"] * len(used)),
                       kwargs_numerics=dict(supersampling_factor=supersample))
    e1, e2 = param_util.phi_q2_ellipticity(S["phi"][i], S["q"][i])
    kw_src = [dict(amp=light.sersic_norm(smooth * flux, S["r_eff"][i], S["n"][i]), R_sersic=S["r_eff"][i],
                   n_sersic=S["n"][i], e1=e1, e2=e2, center_x=cx, center_y=cy)]
    kw_src += [dict(amp=clumps["frac"][i][j] * flux, sigma=clumps["sigma"][i][j], center_x=cx + clumps["x"][i][j],
                    center_y=cy + clumps["y"][i][j]) for j in used]
    return model.image(_lens_kwargs(L, i), kw_src)


def _draws():
    """24 systems: 8 generic, 6 with q 0.3-0.4 and strong shear, 10 with the source centre on a caustic
    (including compact sources)."""
    rng = np.random.default_rng(2024)
    n = 24
    L = dict(theta_e=rng.uniform(0.5, 2.8, n), q=rng.uniform(0.3, 1.0, n), phi=rng.uniform(0, np.pi, n),
             gamma1=rng.uniform(-0.08, 0.08, n), gamma2=rng.uniform(-0.08, 0.08, n),
             x0=rng.uniform(-0.3, 0.3, n), y0=rng.uniform(-0.3, 0.3, n))
    S = dict(x=rng.uniform(-0.5, 0.5, n), y=rng.uniform(-0.5, 0.5, n), r_eff=rng.uniform(0.08, 0.6, n),
             n=rng.uniform(0.5, 2.0, n), q=rng.uniform(0.35, 1.0, n), phi=rng.uniform(0, np.pi, n),
             flux_g=rng.uniform(0.5, 5, n), flux_r=rng.uniform(0.5, 5, n), flux_z=rng.uniform(0.5, 5, n))
    strong = slice(8, 14)
    L["q"][strong] = rng.uniform(0.3, 0.4, 6)
    amp = rng.uniform(0.1, 0.15, 6)
    ang = rng.uniform(0, 2 * np.pi, 6)
    L["gamma1"][strong], L["gamma2"][strong] = amp * np.cos(ang), amp * np.sin(ang)
    ext = LensModelExtensions(LensModel(["SIE", "SHEAR"]))
    for i in range(14, n):
        _, _, cx, cy = ext.critical_curve_caustics(_lens_kwargs(L, i), compute_window=7.0, grid_scale=0.03,
                                                   center_x=L["x0"][i], center_y=L["y0"][i])
        cx, cy = np.concatenate(cx), np.concatenate(cy)
        j = rng.integers(cx.size)
        S["x"][i], S["y"][i] = cx[j] - L["x0"][i], cy[j] - L["y0"][i]
    S["r_eff"][18:24] = rng.uniform(0.03, 0.1, 6)  # compact sources on the caustic
    return L, S, rng.uniform(0.8, 1.6, (n, 3))


@pytest.fixture(scope="module")
def draws():
    return _draws()


@pytest.mark.parametrize("model", ("gaussian", "moffat"))
def test_arcs_match_lenstronomy(draws, model, monkeypatch):
    monkeypatch.setattr(SersicUtil, "b_n", staticmethod(light.sersic_b))
    L, S, fwhm = draws
    idx = np.arange(24) if model == "moffat" else np.arange(0, 24, 3)  # all 24 once; a subset again
    sub = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
    res = render.render_arcs(sub(L), sub(S), fwhm[idx], model, moffat_beta=3.5, supersample=4)
    assert res.images.shape == (idx.size, 3, N_PIX, N_PIX) and res.images.dtype == np.float32
    kernels = psf.make_kernels(fwhm[idx].ravel(), model, beta=3.5).reshape(idx.size, 3, -1)
    k = int(np.sqrt(kernels.shape[-1]))
    for row, i in enumerate(idx):
        for b, band in enumerate("grz"):
            ref = _lenstronomy_arc(L, S, i, band, kernels[row, b].reshape(k, k), 4)
            mine = res.images[row, b]
            assert np.abs(mine - ref).max() <= 0.01 * ref.max(), f"draw {i} band {band}"
            assert mine.sum() == pytest.approx(ref.sum(), rel=5e-3), f"draw {i} band {band}"


def _numpy_unit_images(lens, src, s=4, size=N_PIX, scale=SCALE):
    """The renderer's previous formulation in whole-array float32 numpy passes (trace the pixel
    corners, trapezoid values, supersample the flagged pixels): the reference of the compiled kernels."""
    from darkhaloscope.simulation.physics.lens import ray_shoot_lens_frame, rotate_shear

    lens = {k: np.asarray(v, np.float64) for k, v in lens.items()}
    src = {k: np.asarray(v, np.float64) for k, v in src.items()}
    n, b = src["n"], light.sersic_b(src["n"])
    g1p, g2p = rotate_shear(lens["gamma1"], lens["gamma2"], lens["phi"])
    cl, sl, dphi = np.cos(lens["phi"]), np.sin(lens["phi"]), src["phi"] - lens["phi"]
    p = dict(x0=lens["x0"], y0=lens["y0"], cos_l=cl, sin_l=sl, theta_e=lens["theta_e"], q=lens["q"], g1p=g1p,
             g2p=g2p, cxp=cl * src["x"] + sl * src["y"], cyp=cl * src["y"] - sl * src["x"], cos_s=np.cos(dphi),
             sin_s=np.sin(dphi), sq=np.sqrt(src["q"]), half_inv_n=0.5 / n, log_t0=-np.log(src["r_eff"]) / n, b=b,
             log_amp=np.log(light.sersic_norm(1.0, src["r_eff"], n)) + b,
             r_cut=src["r_eff"] * (1.0 - np.log(render.SB_TOL) / b) ** n)
    p = {k: v.astype(np.float32) for k, v in p.items()}

    def trace(p, x, y):
        dx, dy = x - p["x0"], y - p["y0"]
        xp, yp = p["cos_l"] * dx + p["sin_l"] * dy, p["cos_l"] * dy - p["sin_l"] * dx
        bx, by = ray_shoot_lens_frame(xp, yp, p["theta_e"], p["q"], p["g1p"], p["g2p"])
        bx, by = bx - p["cxp"], by - p["cyp"]
        u = (p["cos_s"] * bx + p["sin_s"] * by) * p["sq"]
        v = (p["cos_s"] * by - p["sin_s"] * bx) / p["sq"]
        r2 = np.maximum(u * u + v * v, np.float32(light.R_FLOOR**2))
        return u, v, r2, np.exp(p["log_amp"] - p["b"] * np.exp(p["half_inv_n"] * np.log(r2) + p["log_t0"]))

    edges = ((np.arange(size + 1) - 0.5 - (size - 1) / 2.0) * scale).astype(np.float32)
    yc, xc = np.meshgrid(edges, edges, indexing="ij")
    u, v, r2, sb = trace({k: a[:, None, None] for k, a in p.items()}, xc, yc)
    image = 0.25 * (sb[:, :-1, :-1] + sb[:, :-1, 1:] + sb[:, 1:, :-1] + sb[:, 1:, 1:])
    r_min = np.sqrt(np.minimum(np.minimum(r2[:, :-1, :-1], r2[:, :-1, 1:]), np.minimum(r2[:, 1:, :-1], r2[:, 1:, 1:])))
    diag = np.maximum(np.hypot(u[:, 1:, 1:] - u[:, :-1, :-1], v[:, 1:, 1:] - v[:, :-1, :-1]),
                      np.hypot(u[:, 1:, :-1] - u[:, :-1, 1:], v[:, 1:, :-1] - v[:, :-1, 1:]))
    near = r_min - render.CORNER_MARGIN * diag < p["r_cut"][:, None, None]
    bi, iy, ix = np.nonzero(near)
    sub = (((np.arange(s) + 0.5) / s - 0.5) * scale).astype(np.float32)
    sy, sx = (a.ravel() for a in np.meshgrid(sub, sub, indexing="ij"))
    centre = np.float32((size - 1) / 2.0)
    px = ((ix.astype(np.float32) - centre) * np.float32(scale))[:, None] + sx
    py = ((iy.astype(np.float32) - centre) * np.float32(scale))[:, None] + sy
    image[bi, iy, ix] = trace({k: a[bi, None] for k, a in p.items()}, px, py)[3].mean(axis=1)
    return image, near.sum(axis=(1, 2))


def test_compiled_trace_equals_the_numpy_formulation(draws):
    """The compiled trace kernels give the previous numpy formulation's images to float32 rounding, for
    generic, strongly sheared and caustic-straddling systems, a source on the lens centre (the R floor)
    and q = 1 (the q cap)."""
    L, S, _ = draws
    L = {k: np.append(v, v[:2]) for k, v in L.items()}
    S = {k: np.append(v, v[:2]) for k, v in S.items()}
    L["q"][-1], S["x"][-2], S["y"][-2] = 1.0, 0.0, 0.0
    for s in (1, 4):
        got, n_got = render.lensed_unit_images(L, S, s)
        want, n_want = _numpy_unit_images(L, S, s)
        assert got.dtype == np.float32 and got.shape == want.shape
        peak = want.max(axis=(1, 2), keepdims=True)
        assert np.all(np.abs(got - want) <= 2e-6 * peak + 1e-6 * np.abs(want))
        assert np.abs(n_got - n_want).max() <= 2  # pixels on the supersampling boundary may flip
        assert n_got.sum() > 0


def test_rendered_flux_is_the_magnified_source_flux(draws, exact_bn):
    """The renderer keeps the lens's magnification (the classic bug renormalises the lensed image to the
    unlensed flux). For the 18 systems with resolved sources: (1) ``magnification`` equals the lensed flux
    of a unit source computed independently, lenstronomy's ray shooting + Sersic surface brightness summed
    over the stamp on an 8x finer grid; every one is > 2, so a renormalised image would be off by > 2x;
    (2) each band's rendered flux is magnification x the unlensed flux (the PSF conserves flux)."""
    L, S, fwhm = draws
    idx = np.arange(18)  # 18-23: compact sources on the caustic, not resolved by the 8x reference grid
    sub = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
    res = render.render_arcs(sub(L), sub(S), fwhm[idx], "gaussian")
    s = 8
    step = SCALE / s
    g = (np.arange(N_PIX * s) - (N_PIX * s - 1) / 2) * step
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    lens_model, source_model = LensModel(["SIE", "SHEAR"]), LightModel(["SERSIC_ELLIPSE"])
    for row, i in enumerate(idx):
        bx, by = lens_model.ray_shooting(x, y, _lens_kwargs(L, i))
        e1, e2 = param_util.phi_q2_ellipticity(S["phi"][i], S["q"][i])
        unit = dict(amp=light.sersic_norm(1.0, S["r_eff"][i], S["n"][i]), R_sersic=S["r_eff"][i], n_sersic=S["n"][i],
                    e1=e1, e2=e2, center_x=L["x0"][i] + S["x"][i], center_y=L["y0"][i] + S["y"][i])
        mu = source_model.surface_brightness(bx, by, [unit]).sum() * step**2
        assert mu > 2.0
        assert res.magnification[row] == pytest.approx(mu, rel=0.015), f"draw {i}"
        flux = np.array([S["flux_g"][i], S["flux_r"][i], S["flux_z"][i]])
        np.testing.assert_allclose(res.images[row].sum(axis=(1, 2)), res.magnification[row] * flux, rtol=1e-3)


def _single(theta_e=1.2, q=0.7, phi=0.3, g1=0.03, g2=-0.02, x0=0.0, y0=0.0, sx=0.1, sy=0.05, r_eff=0.2, n=1.0,
            sq=0.8, sphi=0.4, flux=(1.0, 2.0, 3.0)):
    L = dict(theta_e=[theta_e], q=[q], phi=[phi], gamma1=[g1], gamma2=[g2], x0=[x0], y0=[y0])
    S = dict(x=[sx], y=[sy], r_eff=[r_eff], n=[n], q=[sq], phi=[sphi], flux_g=[flux[0]], flux_r=[flux[1]],
             flux_z=[flux[2]])
    return L, S


def test_total_lensed_flux_is_magnification_times_unlensed_flux():
    # a small source well inside the stamp: the pre-PSF flux, the PSF-convolved flux and the sum of
    # the point-image magnifications (lenstronomy's lens-equation solver) all agree
    L, S = _single(r_eff=0.05, sx=0.45, sy=0.3)
    res = render.render_arcs(L, S, np.full((1, 3), 1.0), "gaussian", supersample=16)
    np.testing.assert_allclose(res.lensed_flux[0], res.magnification[0] * np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(res.images[0].sum(axis=(1, 2)), res.lensed_flux[0], rtol=1e-4)
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    kw = _lens_kwargs({k: np.asarray(v) for k, v in L.items()}, 0)
    model = LensModel(["SIE", "SHEAR"])
    xi, yi = LensEquationSolver(model).image_position_from_source(0.45, 0.3, kw, min_distance=0.02,
                                                                   search_window=6)
    mu_points = np.abs(model.magnification(xi, yi, kw)).sum()
    assert res.magnification[0] == pytest.approx(mu_points, rel=0.01)
    # without lensing the magnification is 1 and the flux is the unlensed flux
    L0, S0 = _single(theta_e=1e-6, g1=0.0, g2=0.0, r_eff=0.3)
    res0 = render.render_arcs(L0, S0, np.full((1, 3), 1.0), "moffat")
    assert res0.magnification[0] == pytest.approx(1.0, abs=2e-3)
    np.testing.assert_allclose(res0.images[0].sum(axis=(1, 2)), [1.0, 2.0, 3.0], rtol=3e-3)


def test_supersampling_versus_point_sampling_for_a_compact_source(monkeypatch):
    monkeypatch.setattr(SersicUtil, "b_n", staticmethod(light.sersic_b))
    # compact (0.1", n = 1) unlensed source on a pixel centre: point sampling overestimates its flux
    # (here 3x: the pixel-centre value of the cusp); 4x4 gets within 2% of a 16x16 render
    L, S = _single(theta_e=1e-6, g1=0.0, g2=0.0, sx=0.0, sy=0.0, r_eff=0.1, n=1.0, sq=1.0)
    L["x0"] = L["y0"] = [0.5 * SCALE]  # the stamp centre is a pixel corner; move to a pixel centre
    fwhm = np.full((1, 3), 1.0)
    flux = {s: render.render_arcs(L, S, fwhm, "gaussian", supersample=s).lensed_flux[0, 0] for s in (1, 4, 16)}
    assert flux[1] > 1.2 * flux[16]
    assert flux[4] == pytest.approx(flux[16], rel=0.02)
    assert flux[16] == pytest.approx(1.0, rel=0.01)
    # lenstronomy's supersampling_factor=1 is point sampling too: it agrees with ours
    kern = psf.gaussian_kernel(1.0)
    Ln = {k: np.asarray(v, dtype=float) for k, v in L.items()}
    Sn = {k: np.asarray(v, dtype=float) for k, v in S.items()}
    ref1 = _lenstronomy_arc(Ln, Sn, 0, "g", kern, 1)
    mine1 = render.render_arcs(L, S, fwhm, "gaussian", supersample=1).images[0, 0]
    assert mine1.sum() == pytest.approx(ref1.sum(), rel=5e-3)


def test_render_refuses_bad_input():
    L, S = _single()
    fwhm = np.full((1, 3), 1.0)
    with pytest.raises(DHSError, match="missing: gamma2"):
        render.render_arcs({k: v for k, v in L.items() if k != "gamma2"}, S, fwhm, "gaussian")
    with pytest.raises(DHSError, match="not finite: r_eff"):
        render.render_arcs(L, dict(S, r_eff=[np.nan]), fwhm, "gaussian")
    with pytest.raises(DHSError, match="unknown PSF model"):
        render.render_arcs(L, S, fwhm, "airy")
    with pytest.raises(DHSError, match="beta"):
        render.render_arcs(L, S, fwhm, "moffat", moffat_beta=0.9)
    with pytest.raises(DHSError, match="psf_fwhm"):
        render.render_arcs(L, S, np.ones(3), "gaussian")
    with pytest.raises(DHSError, match="lens q"):
        render.render_arcs(dict(L, q=[1.2]), S, fwhm, "gaussian")


def test_arc_snr_definition():
    arc = np.zeros((2, 8, 8))
    arc[0, 2, 2:6] = [3.0, 2.0, 1.5, 0.5]  # with sigma 1: three pixels above 1 sigma
    snr = render.arc_snr(arc, np.array([1.0, 1.0]))
    assert snr[0] == pytest.approx((3.0 + 2.0 + 1.5) / np.sqrt(3.0))
    assert snr[1] == 0.0  # no significant pixel
    assert render.arc_snr(arc, np.array([2.0, 1.0]))[0] == pytest.approx(3.0 / 2.0)  # only 3.0 > 2 sigma
    assert render.arc_snr(arc, np.array([1.0, 1.0]), threshold=0.0)[0] == pytest.approx(7.0 / np.sqrt(4.0))
    var = np.full((2, 8, 8), 4.0)
    np.testing.assert_allclose(render.arc_snr(arc, variance=var), render.arc_snr(arc, np.array([2.0, 2.0])))
    np.testing.assert_allclose(render.arc_snr_peak(arc, np.array([0.5, 1.0])), [6.0, 0.0])
    with pytest.raises(DHSError):
        render.arc_snr(arc[0], np.array([1.0]))
    with pytest.raises(DHSError):
        render.arc_snr(arc, np.array([0.0, 1.0]))
