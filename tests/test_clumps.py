"""Optional source clumps (simulation.source_clumps): the renderer against lenstronomy, flux =
magnification x unlensed flux, nothing changes with the option off, truth round-trip, bad input."""

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from darkhaloscope import cli
from darkhaloscope.errors import DHSError
from darkhaloscope.simulation import scene
from darkhaloscope.simulation.draws import CLUMP_COLUMNS, ClumpPrior, draw_clumps
from darkhaloscope.simulation.manifest import build_manifest, write_manifest
from darkhaloscope.simulation.physics import light, psf, render
from darkhaloscope.stamps.contract import decode_stamp

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil  # noqa: E402
from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver  # noqa: E402
from test_physics_render import N_PIX, _draws, _lens_kwargs, _lenstronomy_arc  # noqa: E402
from workflow_helpers import snakemake, write_config  # noqa: E402


def _bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _clumps_for(S, k=3, seed=7):
    """Clumps of the test systems as the manifest draws them, with 1..k used slots per system (row i
    gets 1 + i % k) and NaN in the empty ones."""
    n = len(S["r_eff"])
    drawn = draw_clumps(np.random.default_rng(seed), {"src_reff": S["r_eff"], "src_q": S["q"], "src_phi": S["phi"]},
                        ClumpPrior(max=k))
    again = draw_clumps(np.random.default_rng(seed + 1), {"src_reff": S["r_eff"], "src_q": S["q"], "src_phi": S["phi"]},
                        ClumpPrior(max=k))
    out = {}
    for key, col in zip(render.CLUMP_KEYS, CLUMP_COLUMNS):
        v = np.where(np.isfinite(drawn[col]), drawn[col], again[col])  # fill the slots both draws left empty
        v = np.where(np.isfinite(v), v, {"x": 0.05, "y": -0.04, "sigma": 0.05, "frac": 0.15}[key])
        v[np.arange(k)[None, :] >= (1 + np.arange(n) % k)[:, None]] = np.nan
        out[key] = v
    return out


@pytest.fixture(scope="module")
def clumpy():
    L, S, fwhm = _draws()
    return L, S, fwhm, _clumps_for(S)


@pytest.mark.parametrize("model,spread", (("moffat", 1.0), ("gaussian", 3.0)))
def test_clumpy_arcs_match_lenstronomy(clumpy, model, spread, monkeypatch):
    """SIE + SHEAR + SERSIC_ELLIPSE + one GAUSSIAN per clump, supersampling_factor=4, PSF 'PIXEL' with our
    kernel: generic, strongly sheared and caustic systems (compact sources included). spread 3: clumps
    three times further out (up to 4.5 r_eff) and wide, beyond the Sersic's own supersampling radius
    (the comparison fails if the supersampled region is not widened for them)."""
    monkeypatch.setattr(SersicUtil, "b_n", staticmethod(light.sersic_b))
    L, S, fwhm, C = clumpy
    if spread != 1.0:
        C = dict(C, x=C["x"] * spread, y=C["y"] * spread, sigma=np.where(np.isnan(C["sigma"]), np.nan, 0.1))
    idx = np.arange(0, 24, 2) if model == "moffat" else np.arange(24)
    sub = lambda d: {k: np.asarray(v)[idx] for k, v in d.items()}  # noqa: E731
    res = render.render_arcs(sub(L), sub(S), fwhm[idx], model, moffat_beta=3.5, supersample=4, clumps=sub(C))
    smooth = render.render_arcs(sub(L), sub(S), fwhm[idx], model, moffat_beta=3.5, supersample=4)
    kernels = psf.make_kernels(fwhm[idx].ravel(), model, beta=3.5).reshape(idx.size, 3, -1)
    k = int(np.sqrt(kernels.shape[-1]))
    for row, i in enumerate(idx):
        assert np.abs(res.images[row] - smooth.images[row]).max() > 0.02 * res.images[row].max()  # clumps show
        for b, band in enumerate("grz"):
            ref = _lenstronomy_arc(L, S, i, band, kernels[row, b].reshape(k, k), 4, clumps=C)
            mine = res.images[row, b]
            assert np.abs(mine - ref).max() <= 0.01 * ref.max(), f"draw {i} band {band}"
            assert mine.sum() == pytest.approx(ref.sum(), rel=5e-3), f"draw {i} band {band}"


def test_total_lensed_flux_is_magnification_times_unlensed_flux_with_clumps():
    # compact source and clumps well inside the stamp: each component's lensed flux is its flux times
    # the summed point-image magnification at its position (lenstronomy's solver)
    L = dict(theta_e=[1.2], q=[0.7], phi=[0.3], gamma1=[0.03], gamma2=[-0.02], x0=[0.0], y0=[0.0])
    S = dict(x=[0.45], y=[0.3], r_eff=[0.05], n=[1.0], q=[0.8], phi=[0.4], flux_g=[1.0], flux_r=[2.0], flux_z=[3.0])
    C = dict(x=[[0.12, -0.1, np.nan]], y=[[0.05, 0.11, np.nan]], sigma=[[0.04, 0.05, np.nan]],
             frac=[[0.3, 0.2, np.nan]])
    res = render.render_arcs(L, S, np.full((1, 3), 1.0), "gaussian", supersample=16, clumps=C)
    flux = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(res.lensed_flux[0], res.magnification[0] * flux)
    np.testing.assert_allclose(res.images[0].sum(axis=(1, 2)), res.lensed_flux[0], rtol=1e-4)
    kw = _lens_kwargs({k: np.asarray(v) for k, v in L.items()}, 0)
    model = LensModel(["SIE", "SHEAR"])
    solver = LensEquationSolver(model)

    def mu(bx, by):
        xi, yi = solver.image_position_from_source(bx, by, kw, min_distance=0.02, search_window=6)
        return np.abs(model.magnification(xi, yi, kw)).sum()

    want = 0.5 * mu(0.45, 0.3) + 0.3 * mu(0.45 + 0.12, 0.3 + 0.05) + 0.2 * mu(0.45 - 0.1, 0.3 + 0.11)
    assert res.magnification[0] == pytest.approx(want, rel=0.01)
    # no lens: magnification 1, the unlensed flux in every band (the Sersic keeps 1 - sum(frac))
    L0 = dict(L, theta_e=[1e-6], gamma1=[0.0], gamma2=[0.0])
    res0 = render.render_arcs(L0, dict(S, r_eff=[0.3]), np.full((1, 3), 1.0), "moffat", clumps=C)
    assert res0.magnification[0] == pytest.approx(1.0, abs=2e-3)
    np.testing.assert_allclose(res0.images[0].sum(axis=(1, 2)), flux, rtol=3e-3)


def test_option_off_changes_nothing(tmp_path):
    """Off (max 0, the shipped configs): the manifest is the same bytes as without the option, from
    the library and from the CLI; on: every other column is unchanged (own random stream), and stamps
    without clumps (controls, positives that drew none) are the same bytes as with the option off."""
    off = build_manifest(160, seed=3)
    assert _bytes(build_manifest(160, seed=3, clumps=ClumpPrior(max=0, flux_frac=(0.2, 0.9)))) == _bytes(off)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert cli.main(["manifest", "--out", str(a), "--n_tasks", "60", "--seed", "2"]) == 0
    assert cli.main(["manifest", "--out", str(b), "--n_tasks", "60", "--seed", "2", "--source_clumps_max", "0"]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert not set(CLUMP_COLUMNS) & set(pq.read_schema(a).names)

    on = build_manifest(160, seed=3, clumps=ClumpPrior(max=3))
    assert _bytes(on.select(off.column_names).replace_schema_metadata(None)) == \
        _bytes(off.replace_schema_metadata(None))
    rows_off, rows_on = scene.column_arrays(off.slice(0, 64)), scene.column_arrays(on.slice(0, 64))
    n_clumps = np.isfinite(rows_on["src_clump_frac"]).sum(axis=1)
    assert np.all(n_clumps[rows_on["is_control"] == 1] == 0)
    plain = (rows_on["is_control"] == 1) | (n_clumps == 0)
    assert plain.sum() > 32 and (~plain).sum() > 8
    img_off = scene.render_scenes(rows_off, "moffat", 3.5)
    img_on = scene.render_scenes(rows_on, "moffat", 3.5)
    assert img_off.image[plain].tobytes() == img_on.image[plain].tobytes()
    assert all(not np.array_equal(x, y) for x, y in zip(img_off.image[~plain], img_on.image[~plain]))
    # clump columns present but every slot empty: the very same bytes as the smooth render
    rows_empty = dict(rows_on, src_clump_frac=np.full_like(rows_on["src_clump_frac"], np.nan))
    assert scene.render_scenes(rows_empty, "moffat", 3.5).image.tobytes() == img_off.image.tobytes()
    # the positives' unlensed flux is src_flux_* whatever the clumps: arc_snr and magnification stay
    # comparable (same order) with and without them
    pos = rows_on["is_control"] == 0
    np.testing.assert_allclose(img_on.magnification[pos], img_off.magnification[pos], rtol=0.5)


def test_manifest_clump_draws():
    t = build_manifest(2000, seed=9, clumps=ClumpPrior(max=4, flux_frac=(0.05, 0.2), radius_reff=1.5))
    rows = scene.column_arrays(t)
    assert t.schema.field("src_clump_x").type == pa.list_(pa.float64(), 4)
    assert b"source_clumps=max:4" in t.schema.metadata[b"dhs_manifest"]
    pos = rows["is_control"] == 0
    assert t.column("src_clump_frac").null_count == (~pos).sum()
    frac = rows["src_clump_frac"][pos]
    count = np.isfinite(frac).sum(axis=1)
    assert set(np.unique(count)) == {0, 1, 2, 3, 4}
    assert np.all(np.isfinite(frac) == np.isfinite(rows["src_clump_sigma"][pos]))
    assert np.nanmin(frac) >= 0.05 and np.nanmax(frac) <= 0.2 and np.nansum(frac, axis=1).max() <= 0.8
    sig = rows["src_clump_sigma"][pos]
    assert np.nanmin(sig) >= 0.04 and np.nanmax(sig) <= 0.10
    # centres inside the source's own ellipse of radius 1.5 r_eff (product-average radius)
    phi, q, reff = (rows[k][pos][:, None] for k in ("src_phi", "src_q", "src_reff"))
    x, y = rows["src_clump_x"][pos], rows["src_clump_y"][pos]
    major, minor = np.cos(phi) * x + np.sin(phi) * y, np.cos(phi) * y - np.sin(phi) * x
    radius = np.sqrt(q * major**2 + minor**2 / q) / reff
    assert np.nanmax(radius) <= 1.5 + 1e-9 and np.nanmedian(radius) > 0.9  # uniform in area: median 1.5/sqrt(2)


def test_truth_columns_rerender_the_clumpy_arc(tmp_path):
    path = tmp_path / "manifest.parquet"
    write_manifest(build_manifest(96, seed=4, clumps=ClumpPrior(max=3)), path)
    out = tmp_path / "data"
    assert cli.main(["inject", "--manifest", str(path), "--out_dir", str(out), "--psf-model", "moffat",
                     "--batch_size", "32", "--write_arc"]) == 0
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.schema.field("src_clump_frac").type == pa.list_(pa.float64(), 3)
    rows = scene.column_arrays(table)
    ctrl = rows["is_control"] == 1
    assert table.filter(pa.array(ctrl)).column("src_clump_x").null_count == ctrl.sum()
    # the stored truth is the manifest's
    man = scene.column_arrays(pq.read_table(path))
    order = np.argsort(rows["task_id"])
    for c in CLUMP_COLUMNS:
        np.testing.assert_array_equal(rows[c][order][~ctrl[order]], man[c][rows["task_id"][order]][~ctrl[order]])
    pos = np.nonzero(~ctrl & (np.isfinite(rows["src_clump_frac"]).sum(axis=1) > 0))[0][:12]
    assert len(pos) >= 6
    sub = {k: v[pos] for k, v in rows.items()}
    again = scene.render_arcs(sub, "moffat", 3.5)
    stored = np.stack([decode_stamp(table.column("arc_npz")[int(i)].as_py()) for i in pos])
    peak = stored.max(axis=(1, 2, 3))[:, None, None, None]
    assert (np.abs(again["arc"] - stored) <= 1e-3 * peak).all()  # see test_inject: batch-dependent wings
    np.testing.assert_allclose(again["magnification"], rows["magnification"][pos], rtol=1e-6)
    # the clumps matter: dropping them does not reproduce the arc
    smooth = scene.render_arcs({k: v for k, v in sub.items() if k not in CLUMP_COLUMNS}, "moffat", 3.5)
    assert (np.abs(smooth["arc"] - stored).max(axis=(1, 2, 3)) > 1e-2 * peak[:, 0, 0, 0]).all()
    # a pandas round trip (list columns as arrays, controls None) gives the same clumps
    df = table.to_pandas()
    np.testing.assert_array_equal(scene.arc_clumps({c: df[c].to_numpy() for c in CLUMP_COLUMNS})["frac"],
                                  rows["src_clump_frac"])


@pytest.mark.parametrize("prior,message", [
    (ClumpPrior(max=-1), "--source_clumps_max must be >= 0"),
    (ClumpPrior(max=4, flux_frac=(0.1, 0.4)), "--source_clumps_flux_frac: 4 clumps of up to 0.4"),
    (ClumpPrior(max=2, flux_frac=(0.3, 0.1)), "--source_clumps_flux_frac must be lo,hi"),
    (ClumpPrior(max=2, sigma_arcsec=(0.0, 0.1)), "--source_clumps_sigma_arcsec"),
    (ClumpPrior(max=2, radius_reff=float("nan")), "--source_clumps_radius_reff"),
])
def test_bad_clump_prior_is_one_line_error(prior, message):
    with pytest.raises(DHSError, match=message.replace("(", r"\(")) as err:
        build_manifest(20, 0, clumps=prior)
    assert "\n" not in str(err.value)


def test_bad_clump_flags_on_the_cli(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert cli.main(["manifest", "--out", str(out), "--n_tasks", "20", "--source_clumps_max", "3",
                     "--source_clumps_flux_frac", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--source_clumps_flux_frac '0.2'" in err and "\n" not in err
    assert not out.exists()


def test_render_refuses_bad_clumps():
    L = dict(theta_e=[1.2], q=[0.7], phi=[0.3], gamma1=[0.0], gamma2=[0.0], x0=[0.0], y0=[0.0])
    S = dict(x=[0.1], y=[0.0], r_eff=[0.2], n=[1.0], q=[0.8], phi=[0.4], flux_g=[1.0], flux_r=[1.0], flux_z=[1.0])
    C = dict(x=[[0.1, 0.0]], y=[[0.0, 0.1]], sigma=[[0.05, 0.05]], frac=[[0.6, 0.5]])
    fwhm = np.full((1, 3), 1.0)
    with pytest.raises(DHSError, match="sum to more than 1"):
        render.render_arcs(L, S, fwhm, "gaussian", clumps=C)
    with pytest.raises(DHSError, match="sigma must be > 0"):
        render.render_arcs(L, S, fwhm, "gaussian", clumps=dict(C, frac=[[0.2, 0.2]], sigma=[[0.05, 0.0]]))
    with pytest.raises(DHSError, match=r"\(1, K\) arrays"):
        render.render_arcs(L, S, fwhm, "gaussian", clumps=dict(C, x=[0.1, 0.0]))
    with pytest.raises(DHSError, match="missing: frac"):
        render.render_arcs(L, S, fwhm, "gaussian", clumps={k: v for k, v in C.items() if k != "frac"})


def test_workflow_threads_the_clump_config(tmp_path):
    """simulation.source_clumps reaches `dhs manifest` when on (and adds no flag when off); a bad value
    stops the parse with one line naming the key."""
    on = write_config(tmp_path / "on.yaml", tmp_path / "run_on", {"simulation": {"source_clumps": {"max": 3}}})
    result = snakemake("manifest/manifest.parquet", "-n", "-p", "--configfile", str(on))
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("--source_clumps_max 3 --source_clumps_flux_frac 0.05,0.25 --source_clumps_sigma_arcsec 0.04,0.1 "
            "--source_clumps_radius_reff 1.5") in result.stdout
    off = write_config(tmp_path / "off.yaml", tmp_path / "run_off")
    result = snakemake("manifest/manifest.parquet", "-n", "-p", "--configfile", str(off))
    assert result.returncode == 0 and "dhs manifest" in result.stdout and "source_clumps" not in result.stdout
