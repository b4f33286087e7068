"""Simulated hosts (--host_priors): the DR10 parent sample's quantiles, correlations and Tractor type mix,
per-type shapes, the seed's hosts unchanged, and the host render against lenstronomy's SERSIC_ELLIPSE."""

import numpy as np
import pytest
from scipy.special import roots_hermitenorm

from darkhaloscope import cli
from darkhaloscope.simulation import scene
from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.manifest import build_manifest
from darkhaloscope.simulation.physics import light, psf
from darkhaloscope.simulation import hosts

PARENT = hosts.load_parent_sample()
LEVELS = np.asarray(PARENT["quantile_levels"])
N_BIG = 30000


@pytest.fixture(scope="module")
def big():
    t = build_manifest(N_BIG, seed=21).to_pandas()
    t["z_mag"] = t["host_mag_r"] - t["host_r_minus_z"]
    return t


@pytest.mark.parametrize("name,column", [("z_mag", "z_mag"), ("g_minus_r", "host_g_minus_r"),
                                         ("r_minus_z", "host_r_minus_z")])
def test_host_photometry_has_the_parent_quantiles(big, name, column):
    """At each of the JSON's quantiles x_p, the manifest's empirical CDF is p within 0.01 (the binomial
    standard error at 30,000 hosts is <= 0.003), and the quantile itself is within 0.05 mag."""
    v = big[column].to_numpy()
    json_q = np.asarray(PARENT[name])
    cdf = (v[:, None] <= json_q[None, :]).mean(axis=0)
    np.testing.assert_allclose(cdf, LEVELS, atol=0.01)
    np.testing.assert_allclose(np.quantile(v, LEVELS), json_q, atol=0.05)


def test_r_magnitude_the_copula_implies_matches_the_parent(big):
    """r = z + (r - z) is not imposed anywhere: its quantiles follow from the marginals and the z, r - z
    correlation. The empirical CDF at the JSON's r quantiles is within 0.03 of the levels (measured:
    0.024 at the median, where r is 0.04 mag brighter than the JSON's), each quantile within 0.15 mag
    (measured: 0.12 at 95 %, where the density is low)."""
    r = big["host_mag_r"].to_numpy()
    cdf = (r[:, None] <= np.asarray(PARENT["r_mag"])[None, :]).mean(axis=0)
    np.testing.assert_allclose(cdf, LEVELS, atol=0.03)
    np.testing.assert_allclose(np.quantile(r, LEVELS), PARENT["r_mag"], atol=0.15)


def test_host_correlations_are_the_parents(big):
    """Pearson correlations within 0.025 of the JSON's (standard error ~0.006 at 30,000 hosts); the
    pair the JSON does not give (z, g - r) is uncorrelated."""
    c = lambda a, b: np.corrcoef(big[a], big[b])[0, 1]  # noqa: E731
    assert c("host_r_minus_z", "host_g_minus_r") == pytest.approx(PARENT["corr_r_minus_z__g_minus_r"], abs=0.025)
    assert c("z_mag", "host_r_minus_z") == pytest.approx(PARENT["corr_z_mag__r_minus_z"], abs=0.025)
    assert abs(c("z_mag", "host_g_minus_r")) < 0.025


def test_copula_solves_the_json_correlations_exactly():
    """The latent correlations give the JSON's Pearson correlations to 1e-6 by quadrature; a 400,000-draw
    sample of the copula agrees to 0.005 (independent of the quadrature)."""
    nodes, weights = roots_hermitenorm(80)
    weights = weights / weights.sum()
    corr = hosts.latent_correlation()
    assert np.all(np.linalg.eigvalsh(corr) > 0)
    phot = hosts.draw_dr10_photometry(np.random.default_rng(0), 400_000)
    for (a, b), key in hosts.CORRELATION_KEYS.items():
        rho = corr[hosts.PHOTOMETRY.index(a), hosts.PHOTOMETRY.index(b)]
        got = hosts._pearson_of_latent(rho, hosts.marginal(a), hosts.marginal(b), nodes, weights)
        assert got == pytest.approx(PARENT[key], abs=1e-6)
        assert np.corrcoef(phot[a], phot[b])[0, 1] == pytest.approx(PARENT[key], abs=0.005)


@pytest.mark.parametrize("name", hosts.PHOTOMETRY)
def test_marginal_is_monotone_through_the_json_quantiles_and_the_ends(name):
    f = hosts.marginal(name)
    np.testing.assert_allclose(f(LEVELS), PARENT[name], atol=1e-12)
    assert (f(0.0), f(1.0)) == pytest.approx(hosts.MARGINAL_ENDS[name])
    assert np.all(np.diff(f(np.linspace(0, 1, 20001))) > 0)


def test_hosts_pass_the_parent_cuts(big):
    assert (big["z_mag"] < 20.4 + 1e-9).all() and (big["host_r_minus_z"] >= 0.4).all()
    assert big["host_g_minus_r"].between(0.0, 2.7).all() and big["host_r_minus_z"].max() <= 4.0


def test_tractor_type_fractions_are_the_parents(big):
    """Each type's fraction within 0.012 of the JSON's (binomial standard error ~0.0026)."""
    frac = big["host_type"].value_counts(normalize=True)
    assert set(frac.index) == set(hosts.TRACTOR_TYPES)
    total = sum(PARENT["tractor_type_fraction"].values())
    for t, f in PARENT["tractor_type_fraction"].items():
        assert frac[t] == pytest.approx(f / total, abs=0.012), t


def test_profiles_follow_the_tractor_type(big):
    by = {t: g for t, g in big.groupby("host_type")}
    rex, exp, dev, ser = by["REX"], by["EXP"], by["DEV"], by["SER"]
    assert (rex["host_n"] == 1).all() and (rex["host_q"] == 1).all()  # round exponential
    assert (exp["host_n"] == 1).all() and exp["host_q"].median() == pytest.approx(0.60, abs=0.03)
    assert (exp["host_q"] < 1).all() and exp["host_q"].min() >= 0.2
    assert (dev["host_n"] == 4).all() and dev["host_q"].median() == pytest.approx(0.75, abs=0.03)
    # SER: a free index inside Tractor's bounds, spread over intermediate and steeper-than-DEV profiles
    assert ser["host_n"].between(0.5, 6.0).all() and ser["host_n"].std() > 0.9
    assert ser["host_n"].median() == pytest.approx(3.5, abs=0.15)
    assert (ser["host_n"] < 2).mean() > 0.05 and (ser["host_n"] > 4.5).mean() > 0.15
    for t, g in by.items():
        lo, hi = hosts.TYPE_PRIORS[t].reff_bounds
        assert g["host_reff"].between(lo - 1e-9, hi + 1e-9).all(), t
    # sizes: REX the smallest, DEV the largest; fainter hosts are smaller within a type
    med = {t: g["host_reff"].median() for t, g in by.items()}
    assert med["REX"] < med["EXP"] < med["SER"] < med["DEV"]
    for g in by.values():
        assert np.corrcoef(g["z_mag"], np.log(g["host_reff"]))[0, 1] < -0.15


def test_controls_and_positives_get_the_same_hosts(big):
    ctrl, pos = big[big.is_control == 1], big[big.is_control == 0]
    for t in hosts.TRACTOR_TYPES:
        assert (ctrl["host_type"] == t).mean() == pytest.approx((pos["host_type"] == t).mean(), abs=0.02)


def test_host_priors_change_only_the_hosts():
    """Every component has its own random stream: the dr10 and sota manifests of one seed differ only
    in the host columns and in the lens columns tied to the host (centre, angle, grid_sota's src mag)."""
    a = scene.column_arrays(build_manifest(300, seed=4, host_priors="dr10"))
    b = scene.column_arrays(build_manifest(300, seed=4, host_priors="sota"))
    tied = {"lens_x0", "lens_y0", "lens_phi"}
    for k in a:
        if k.startswith("host_") or k in tied:
            continue
        same = (np.array_equal(a[k], b[k], equal_nan=True) if a[k].dtype.kind == "f" else (a[k] == b[k]).all())
        assert same, k
    assert not np.allclose(a["host_mag_r"], b["host_mag_r"])


def test_sota_hosts_are_the_seeds():
    """--host_priors sota draws what the manifest drew before host priors existed (figures from that
    code, seed 7, grid_sota sources), so config/full.yaml keeps its data."""
    t = build_manifest(50, seed=7, source_priors="grid_sota", host_priors="sota").to_pandas()
    rows = [0, 17, 49]
    expect = {
        "host_mag_r": [19.430764854413358, 20.832176355313255, 20.559243690791952],
        "host_g_minus_r": [1.8115025268931704, 1.5139127321350845, 1.2397919699334268],
        "host_r_minus_z": [1.1091210723203062, 0.9482110552278615, 1.3047781757974963],
        "host_reff": [0.9693151057974545, 0.7720390121363729, 0.6302916987008289],
        "host_n": [4.197806759076314, 4.708244231597965, 4.545045370941008],
        "host_q": [0.7817273628274272, 0.6517800308461279, 1.0],
        "host_phi": [2.4182559508596047, 0.04549101532910114, 2.4639024652199697],
        "host_x": [-0.0023850303552736068, -0.06204165962726393, -0.0684385354682043],
    }
    for k, v in expect.items():
        np.testing.assert_array_equal(t[k].to_numpy()[rows], v, err_msg=k)
    np.testing.assert_array_equal(t["src_mag_r"].to_numpy()[rows[:2]], [19.930764854413358, 21.332176355313255])
    assert (t["host_type"] == "SER").all()


def test_unknown_host_priors_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(DHSError, match="unknown --host_priors 'seed'"):
        build_manifest(10, 0, host_priors="seed")
    with pytest.raises(DHSError, match="host_priors"):
        hosts.draw_hosts(np.random.default_rng(0), 5, "uniform")
    with pytest.raises(SystemExit):  # argparse's choices
        cli.main(["manifest", "--out", str(tmp_path / "m.parquet"), "--n_tasks", "5", "--host_priors", "x"])
    assert not (tmp_path / "m.parquet").exists()
    assert cli.main(["manifest", "--out", str(tmp_path / "m.parquet"), "--n_tasks", "20",
                     "--host_priors", "sota"]) == 0


# ----------------------------------------------------------------------------------------------------
# The host render against lenstronomy
# ----------------------------------------------------------------------------------------------------

def _lenstronomy_host(p, levels=((64, 4), (8, 32), (2, 128))):
    """Converged pixel-integrated reference: lenstronomy's SERSIC_ELLIPSE (exact b_n) averaged over 4x4
    sub-pixels, the central 8x8 pixels over 32x32, the central 2x2 over 128x128."""
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import param_util
    e1, e2 = param_util.phi_q2_ellipticity(p["host_phi"], p["host_q"])
    kw = [dict(amp=light.sersic_norm(1.0, p["host_reff"], p["host_n"]), R_sersic=p["host_reff"],
               n_sersic=p["host_n"], e1=e1, e2=e2, center_x=p["host_x"], center_y=p["host_y"])]
    model = LightModel(["SERSIC_ELLIPSE"])
    img = None
    for box, s in levels:
        lo = 32 - box // 2
        x, y = light.pixel_grid(64, s)
        sl = slice(lo * s, (lo + box) * s)
        part = model.surface_brightness(x[sl, sl].ravel(), y[sl, sl].ravel(), kw).reshape(box * s, box * s)
        part = light.bin_image(part, s) * scene.PIX_AREA
        if img is None:
            img = part
        else:
            img[lo:lo + box, lo:lo + box] = part
    return img


# Host centres (arcsec) at the corners of the reference's 128x128 sub-pixels (so that the reference does not
# point-sample the cusp itself): an ordinary one, one on a sample of the old 4x4 core grid (where point
# sampling failed worst) and one on a sample of the 32x32 cusp grid.
CENTRES = {"ordinary": (26 / 128 * 0.262, -12 / 128 * 0.262), "on_4x4_sample": (-16 / 128 * 0.262, 16 / 128 * 0.262),
           "on_32x32_sample": (-18 / 128 * 0.262, 18 / 128 * 0.262)}


@pytest.mark.parametrize("centre", sorted(CENTRES))
@pytest.mark.parametrize("n,reff,q", [
    (1.0, 0.15, 1.0),   # compact REX
    (1.0, 0.45, 1.0),   # typical REX
    (1.0, 0.6, 0.35),   # flat EXP
    (0.5, 0.3, 0.5),    # SER at Tractor's lower bound
    (2.5, 0.3, 0.7),    # intermediate SER
    (4.0, 0.25, 0.75),  # compact DEV
    (4.0, 1.0, 0.75),   # typical DEV
    (6.0, 0.2, 0.8),    # most compact, steepest SER: the hardest cusp
    (6.0, 0.3, 0.2),    # steepest and flattest
])
def test_host_render_matches_lenstronomy_sersic_ellipse(n, reff, q, centre, monkeypatch):
    """scene.host_light (unit flux) against a converged lenstronomy render (to ~0.3% of the peak): every
    pixel within 1.5% of the peak before the PSF (measured <= 1.1%) and 1% after a good-seeing (0.9
    arcsec) Moffat (measured <= 0.7%), the flux in the stamp within 1% (measured <= 0.7%). Before the
    exact inner flux, the centre on a 4x4 sample put a compact n = 6 host's central pixel 2.3x too bright."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil
    monkeypatch.setattr(SersicUtil, "b_n", staticmethod(light.sersic_b))  # exact b_n, as ours
    x0, y0 = CENTRES[centre]
    p = {"host_reff": reff, "host_n": n, "host_q": q, "host_phi": 0.6, "host_x": x0, "host_y": y0}
    mine = scene.host_light({k: np.array([v]) for k, v in p.items()})[0].astype(np.float64)
    ref = _lenstronomy_host(p)
    assert np.abs(mine - ref).max() <= 0.015 * ref.max()
    assert mine.sum() == pytest.approx(ref.sum(), rel=0.01)
    a, b = (psf.convolve_psf(img[None], np.array([0.9]), "moffat", 3.5)[0] for img in (mine, ref))
    assert np.abs(a - b).max() <= 0.01 * b.max()


def test_inner_pixels_hold_the_enclosed_flux_where_the_hole_is():
    """sersic_inner_pixels: the enclosed fraction inside the radius, in the pixels the ellipse covers, in
    proportion to their share of its area for a nearly flat profile (n = 0.5, r_eff >> radius); the
    grid's samples inside the hole are zero and the rest unchanged."""
    radius = 0.4
    args = dict(r_eff=np.array([5.0, 0.3]), n=np.array([0.5, 6.0]), q=np.array([0.5, 0.8]),
                phi=np.array([0.3, 1.0]), x0=np.array([0.0, 0.05]), y0=np.array([0.0, -0.02]))
    inner = light.sersic_inner_pixels(*args.values(), radius)
    np.testing.assert_allclose(inner.sum(axis=(1, 2)), light.sersic_enclosed_fraction(radius, args["r_eff"],
                                                                                       args["n"]), rtol=1e-12)
    # flat profile: pixel shares = area shares of the ellipse (fine point count in the ellipse)
    xs, ys = light.pixel_grid(64, 64)
    r = light.elliptical_radius(xs, ys, 0.5, 0.3, 0.0, 0.0)
    area = light.bin_image((r < radius).astype(np.float64), 64)
    np.testing.assert_allclose(inner[0] / inner[0].sum(), area / area.sum(), atol=0.01)
    ax = xs[0]
    full = light.sersic_on_grid(ax, ax, np.ones(2), **args)
    holed = light.sersic_on_grid(ax, ax, np.ones(2), **args, hole=np.full(2, radius))
    r2 = np.stack([light.elliptical_radius(xs, ys, args["q"][i], args["phi"][i], args["x0"][i], args["y0"][i])
                   for i in range(2)])
    assert np.all(holed[r2 < radius] == 0) and np.array_equal(holed[r2 >= radius], full[r2 >= radius])
    # a centre off the stamp: its points are dropped, nothing wraps around
    off = light.sersic_inner_pixels(1.0, 1.0, 1.0, 0.0, 8.5, 0.0, 0.3)
    assert 0 < off.sum() < light.sersic_enclosed_fraction(0.3, 1.0, 1.0) and off[0, :, :5].sum() == 0
