"""Simulated hosts (--host_priors): the DR10 parent sample's quantiles, correlations and Tractor type mix,
per-type shapes, the seed's hosts unchanged, and the host render against lenstronomy's SERSIC_ELLIPSE."""

import numpy as np
import pytest
from scipy.special import roots_hermitenorm

from darkhaloscope import cli, scene
from darkhaloscope.errors import DHSError
from darkhaloscope.manifest import build_manifest
from darkhaloscope.physics import light, psf
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

def _lenstronomy_host(p, levels=((64, 8), (8, 32), (2, 128))):
    """Converged pixel-integrated reference: lenstronomy's SERSIC_ELLIPSE (exact b_n) averaged over 8x8
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


@pytest.mark.parametrize("n,reff,q,pre_tol,psf_tol", [
    (1.0, 0.15, 1.0, 0.005, 0.004),   # compact REX
    (1.0, 0.45, 1.0, 0.005, 0.004),   # typical REX
    (1.0, 0.6, 0.35, 0.005, 0.004),   # flat EXP
    (0.5, 0.3, 0.5, 0.005, 0.004),    # SER at Tractor's lower bound
    (2.5, 0.3, 0.7, 0.005, 0.004),    # intermediate SER
    (4.0, 0.25, 0.75, 0.02, 0.008),   # compact DEV
    (4.0, 1.0, 0.75, 0.01, 0.004),    # typical DEV
    (6.0, 0.2, 0.8, 0.06, 0.03),      # most compact, steepest SER: the hardest cusp
    (6.0, 1.2, 0.6, 0.02, 0.006),     # extended steep SER
])
def test_host_render_matches_lenstronomy_sersic_ellipse(n, reff, q, pre_tol, psf_tol, monkeypatch):
    """scene.host_light (unit flux) against a converged lenstronomy render: every pixel within ``pre_tol``
    of the peak before the PSF and ``psf_tol`` after a good-seeing (0.9 arcsec) Moffat, and the flux in
    the stamp within 1.5%."""
    pytest.importorskip("lenstronomy")
    from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil
    monkeypatch.setattr(SersicUtil, "b_n", staticmethod(light.sersic_b))  # exact b_n, as ours
    p = {"host_reff": reff, "host_n": n, "host_q": q, "host_phi": 0.6, "host_x": 0.05, "host_y": -0.03}
    mine = scene.host_light({k: np.array([v]) for k, v in p.items()})[0].astype(np.float64)
    ref = _lenstronomy_host(p)
    assert np.abs(mine - ref).max() <= pre_tol * ref.max()
    assert mine.sum() == pytest.approx(ref.sum(), rel=0.015)
    a, b = (psf.convolve_psf(img[None], np.array([0.9]), "moffat", 3.5)[0] for img in (mine, ref))
    assert np.abs(a - b).max() <= psf_tol * b.max()
