"""Scene components: flux conservation of host, stars and confusers, PSF-convolved background, noise."""

import numpy as np
import pytest

from darkhaloscope.simulation import scene
from darkhaloscope.simulation.manifest import build_manifest
from darkhaloscope.simulation.physics import light


@pytest.fixture(scope="module")
def rows():
    return scene.column_arrays(build_manifest(40, seed=8, confuser_frac=1.0, n_regions=24))


def test_host_unit_flux_matches_enclosed_fraction(rows):
    img = scene.host_light(rows)
    # flux inside the stamp vs a fine 8x8 sub-sampled render of the same profile
    x, y = light.pixel_grid(64, 8)
    for i in range(5):
        fine = light.sersic(x, y, 1.0, rows["host_reff"][i], rows["host_n"][i], rows["host_q"][i],
                            rows["host_phi"][i], rows["host_x"][i], rows["host_y"][i])
        expect = light.bin_image(fine, 8).sum() * scene.PIX_AREA
        assert img[i].sum() == pytest.approx(expect, rel=0.01)
        assert np.unravel_index(img[i].argmax(), img[i].shape) in {(31, 31), (31, 32), (32, 31), (32, 32)}


def test_star_flux_and_centroid(rows):
    r = dict(rows)
    r["star_mag_r"] = np.full_like(rows["star_mag_r"], np.nan)
    r["star_mag_r"][:, 0] = 20.0
    img = scene.star_light(r)
    np.testing.assert_allclose(img[:, 1].sum(axis=(1, 2)), 10 ** (-0.4 * (20.0 - 22.5)), rtol=1e-9)
    yy, xx = np.mgrid[:64, :64]
    cx = (img[:, 1] * xx).sum(axis=(1, 2)) / img[:, 1].sum(axis=(1, 2))
    np.testing.assert_allclose((cx - 31.5) * 0.262, rows["star_x"][:, 0], atol=1e-9)


@pytest.mark.parametrize("kind", ["tidal_arc", "ring", "spiral_arm", "blue_companion"])
def test_confusers_have_their_flux_near_the_einstein_radius(rows, kind):
    r = dict(rows)
    r["confuser_kind"] = np.array([kind] * len(rows["task_id"]), dtype=object)
    img = scene.confuser_light(r)
    flux_r = 10 ** (-0.4 * (rows["conf_mag_r"] - 22.5))
    np.testing.assert_allclose(img[:, 1].sum(axis=(1, 2)), flux_r, rtol=1e-6)
    yy, xx = (np.mgrid[:64, :64] - 31.5) * 0.262
    rad = np.hypot(xx[None] - rows["host_x"][:, None, None], yy[None] - rows["host_y"][:, None, None])
    mean_r = (img[:, 1] * rad).sum(axis=(1, 2)) / img[:, 1].sum(axis=(1, 2))
    assert np.all(np.abs(mean_r - rows["conf_r"]) < 0.6 * rows["conf_r"] + 0.3)


def test_background_is_centred_and_conserves_flux(rows):
    r = dict(rows)
    for k in ("nb_mag_r", "star_mag_r"):
        r[k] = np.full_like(rows[k], np.nan)
    r["confuser_kind"] = np.array(["none"] * len(rows["task_id"]), dtype=object)
    bg, sum_sq = scene.noiseless_background(r)
    pre = scene.host_light(r)[:, None] * scene.band_fluxes(r["host_mag_r"], r["host_g_minus_r"],
                                                           r["host_r_minus_z"])[:, :, None, None]
    # the PSF moves some light out of the stamp but never creates or wraps any
    ratio = bg.sum(axis=(2, 3)) / pre.sum(axis=(2, 3))
    assert (ratio <= 1.0 + 1e-5).all() and (ratio > 0.9).all()
    peak = [np.unravel_index(b.argmax(), b.shape) for b in bg[:, 1]]
    assert all(abs(i - 31.5) <= 1 and abs(j - 31.5) <= 1 for i, j in peak)
    assert sum_sq.shape == (len(r["task_id"]), 3)
    # noise-equivalent area 1/sum(PSF^2) of a Moffat: pi alpha^2 (2 beta - 1) / (beta - 1)^2 (pixels)
    beta = scene.SKY_MOFFAT_BETA
    alpha_pix = r["psfsize_r"] / (2 * np.sqrt(2 ** (1 / beta) - 1)) / 0.262
    np.testing.assert_allclose(1 / sum_sq[:, 1], np.pi * alpha_pix**2 * (2 * beta - 1) / (beta - 1) ** 2, rtol=0.03)


def test_noise_adds_source_poisson_term():
    noiseless = np.zeros((200, 3, 64, 64))
    noiseless[:, :, 30:34, 30:34] = 3.0  # a bright core
    sigma = np.full((200, 3), 0.004)
    out = scene.add_noise(noiseless, sigma, np.arange(200))
    core = (out - noiseless)[:, :, 30:34, 30:34].std()
    sky = (out - noiseless)[:, :, :20, :20].std()
    assert sky == pytest.approx(0.004, rel=0.02)
    assert core == pytest.approx(np.sqrt(0.004**2 + 3.0 / scene.GAIN_E_PER_NMGY), rel=0.03)
    again = scene.add_noise(noiseless[:5], sigma[:5], np.arange(5))
    np.testing.assert_array_equal(again, out[:5])  # per-task seeds: independent of the batch


def test_compiled_background_adds_equal_the_numpy_formulation(rows):
    """Neighbours and stars are added into the scene by compiled loops: bit for bit what the previous
    numpy formulation (fancy-indexed adds per neighbour slot, np.add.at per star corner) gave, with
    several neighbours and stars per stamp and stars on and beyond the stamp edge."""
    r = {k: v.copy() for k, v in rows.items()}
    r["star_mag_r"][:, :2] = 19.0
    r["star_x"][:3, 0] = [-8.3, 8.3, 20.0]  # (63 - 31.5) * 0.262 = 8.25: partly and wholly off the stamp
    pre = np.random.default_rng(2).random((len(r["task_id"]), 3, 64, 64)).astype(np.float32)

    want = pre.copy()
    stamp, slot = np.nonzero(np.isfinite(r["nb_mag_r"]))
    get = {k: r[k][stamp, slot] for k in ("nb_x", "nb_y", "nb_mag_r", "nb_g_minus_r", "nb_r_minus_z", "nb_reff",
                                          "nb_n", "nb_q", "nb_phi")}
    shape = light.sersic_on_grid(scene._AX1, scene._AX1, np.full(len(stamp), scene.PIX_AREA), get["nb_reff"],
                                 get["nb_n"], get["nb_q"], get["nb_phi"], get["nb_x"], get["nb_y"])
    flux = scene.band_fluxes(get["nb_mag_r"], get["nb_g_minus_r"], get["nb_r_minus_z"]).astype(np.float32)
    assert np.bincount(stamp).max() > 1
    for k in np.unique(slot):
        m = slot == k
        want[stamp[m]] += shape[m][:, None] * flux[m][:, :, None, None]
    stamp, slot = np.nonzero(np.isfinite(r["star_mag_r"]))
    px, py = (r[c][stamp, slot] / 0.262 + 31.5 for c in ("star_x", "star_y"))
    flux = scene.band_fluxes(r["star_mag_r"][stamp, slot], r["star_g_minus_r"][stamp, slot],
                             r["star_r_minus_z"][stamp, slot])
    i0, j0 = np.floor(py).astype(int), np.floor(px).astype(int)
    fy, fx = py - i0, px - j0
    for di, dj, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        i, j = i0 + di, j0 + dj
        ok = (i >= 0) & (i < 64) & (j >= 0) & (j < 64)
        for band in range(3):
            np.add.at(want, (stamp[ok], band, i[ok], j[ok]), (w * flux[:, band])[ok])

    got = scene.star_light(r, out=scene.neighbour_light(r, out=pre.copy()))
    np.testing.assert_array_equal(got, want)


def test_compiled_noise_equals_the_numpy_formulation():
    """add_noise's compiled scaling gives the previous numpy formulation bit for bit (same float32
    operations in the same order), NaN and negative noiseless pixels included."""
    rng = np.random.default_rng(5)
    noiseless = rng.normal(0.02, 0.05, (6, 3, 64, 64)).astype(np.float32)
    noiseless[0, 1, 3, 4] = np.nan
    sigma = rng.uniform(0.002, 0.01, (6, 3))
    seeds = rng.integers(0, 2**62, 6)
    var = np.maximum(noiseless, np.float32(0.0)) * np.float32(1.0 / scene.GAIN_E_PER_NMGY)
    var += (sigma**2).astype(np.float32)[:, :, None, None]
    normals = np.stack([np.random.default_rng(int(s)).standard_normal((3, 64, 64), dtype=np.float32) for s in seeds])
    want = normals * np.sqrt(var) + noiseless
    np.testing.assert_array_equal(scene.add_noise(noiseless, sigma, seeds), want)
    np.testing.assert_array_equal(scene.add_noise(noiseless.astype(np.float64), sigma, seeds), want)


def test_arc_snr_definition():
    arc = np.zeros((2, 3, 64, 64), np.float32)
    arc[0, 1, 10:20, 10:20] = 0.01  # 100 pixels at 2.5 sigma
    arc[1, 1, 10, 10] = 0.002       # one pixel below 1 sigma
    sigma = np.full((2, 3), 0.004)
    integrated, peak = scene.arc_snr(arc, sigma)
    assert integrated[0] == pytest.approx(0.01 * 100 / (10 * 0.004), rel=1e-5)
    assert integrated[1] == 0.0 and peak[1] == pytest.approx(0.5, rel=1e-5)


def test_arc_truth_mapping_places_arcs_around_the_lens(rows):
    """Truth columns -> renderer: a source behind the lens centre makes a ring centred on the lens
    (not on the stamp centre: catches a swapped or absolute/relative source position), and a source
    offset along +x puts the brighter image on the +x side."""
    n = 4
    r = {k: np.asarray(v[:n], np.float64) if np.asarray(v).dtype.kind == "f" else v[:n] for k, v in rows.items()}
    r.update(theta_e_arcsec=np.full(n, 1.5), lens_q=np.full(n, 0.999), lens_phi=np.zeros(n),
             lens_x0=np.array([0.5, -0.4, 0.0, 0.3]), lens_y0=np.array([-0.3, 0.2, 0.0, 0.3]),
             shear_g1=np.zeros(n), shear_g2=np.zeros(n), src_x=np.zeros(n), src_y=np.zeros(n),
             src_reff=np.full(n, 0.2), src_n=np.ones(n), src_q=np.ones(n), src_phi=np.zeros(n),
             src_flux_g=np.ones(n), src_flux_r=np.ones(n), src_flux_z=np.ones(n))
    arc = scene.render_arcs(r, "moffat", 3.5)["arc"][:, 1]
    yy, xx = (np.mgrid[:64, :64] - 31.5) * 0.262
    cx, cy = (arc * xx).sum((1, 2)) / arc.sum((1, 2)), (arc * yy).sum((1, 2)) / arc.sum((1, 2))
    np.testing.assert_allclose(cx, r["lens_x0"], atol=0.03)
    np.testing.assert_allclose(cy, r["lens_y0"], atol=0.03)
    r["src_x"] = np.full(n, 0.4)
    arc = scene.render_arcs(r, "moffat", 3.5)["arc"][:, 1]
    cx = (arc * xx).sum((1, 2)) / arc.sum((1, 2))
    assert np.all(cx > r["lens_x0"] + 0.2)


def test_sersic_on_grid_matches_sersic():
    """The float32 fast path of the background profiles equals light.sersic to float32 precision."""
    rng = np.random.default_rng(4)
    m = 30
    p = dict(flux=rng.uniform(0.1, 10, m), r_eff=rng.uniform(0.1, 4, m), n=rng.uniform(0.5, 8, m),
             q=rng.uniform(0.1, 1, m), phi=rng.uniform(-np.pi, np.pi, m), x0=rng.uniform(-6, 6, m),
             y0=rng.uniform(-6, 6, m))
    x, y = light.pixel_grid(64, 2)
    ref = light.sersic(x, y, *[p[k][:, None, None] for k in p])
    got = light.sersic_on_grid(x[0], y[:, 0], **p)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6 * ref.max())
    one = {k: v[:1] for k, v in p.items()}  # parameters of length 1 broadcast against longer ones
    moved = light.sersic_on_grid(x[0], y[:, 0], **{**one, "x0": p["x0"]})
    assert moved.shape == (m,) + ref.shape[1:]
    np.testing.assert_array_equal(moved[3], light.sersic_on_grid(x[0], y[:, 0], **{**one, "x0": p["x0"][3:4]})[0])
    with pytest.raises(Exception, match="r_eff > 0"):
        light.sersic_on_grid(x[0], y[:, 0], **{**p, "q": np.full(m, 1.5)})
