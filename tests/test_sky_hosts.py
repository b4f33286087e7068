"""Host injection (`dhs manifest --hosts`, `dhs inject --hosts`): simulator control stamps fetched through
`dhs cutouts` as real hosts must give back the simulator's own positives for the same draws."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from darkhaloscope.cli import main
from darkhaloscope.stamps.contract import decode_stamp
from darkhaloscope.simulation.draws import LENS_COLUMNS
from darkhaloscope.simulation.scene import GAIN_E_PER_NMGY, render_scenes
from darkhaloscope.simulation.real_hosts import shape_orientation
from fake_cutouts import FakeCutoutService, key_of, simulated_sky


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    cat, images, rows, batch = simulated_sky(16, seed=7)  # simulator controls, served as real cutouts
    cat_path = root / "cat.parquet"
    pq.write_table(cat, cat_path)
    zero = key_of(rows["ra"][5], rows["dec"][5])
    with FakeCutoutService(images, persistent={zero: "all_zero"}) as svc:
        assert main(["cutouts", "--catalog", str(cat_path), "--out_dir", str(root / "hosts"), "--base_url",
                     svc.base_url, "--id_column", "objid", "--no_progress", "--timeout", "5"]) == 0
    return root, rows, batch


@pytest.mark.parametrize("psf_model", ["moffat", "gaussian"])
def test_injection_into_simulator_controls_reproduces_simulator_positives(hosts, tmp_path, psf_model, capsys):
    root, rows, batch = hosts
    hm = tmp_path / "hm.parquet"
    assert main(["manifest", "--hosts", str(root / "hosts"), "--out", str(hm), "--control_frac", "0.25",
                 "--seed", "1"]) == 0
    assert "1 hosts with cutout_ok != 1 left out" in capsys.readouterr().out
    # one render block, as the simulator's batch below: the PSF kernels of a batch share one size, so
    # arcs are bit-identical only for the same set of stamps (otherwise they agree below 5e-4 of the flux)
    assert main(["inject", "--hosts", str(root / "hosts"), "--manifest", str(hm), "--out_dir", str(tmp_path / "inj"),
                 "--psf-model", psf_model]) == 0
    man = pq.read_table(hm).to_pandas().set_index("host_id")
    inj = pads.dataset(tmp_path / "inj", partitioning="hive").to_table().to_pandas().set_index("host_id")
    names = [f"obj{int(t):05d}" for t in rows["task_id"]]
    assert sorted(inj.index) == sorted(n for i, n in enumerate(names) if i != 5)  # the all-zero host left out
    assert 0 < (inj["is_control"] == 0).sum() < len(inj)
    # the simulator's own render of the same scenes with the host manifest's lens draws
    keep = [i for i in range(len(names)) if i != 5]
    sim_rows = {k: v[keep] for k, v in rows.items()}
    for c in LENS_COLUMNS:
        sim_rows[c] = man.loc[[names[i] for i in keep], c].to_numpy(np.float64)
    sim_rows["is_control"] = man.loc[[names[i] for i in keep], "is_control"].to_numpy()
    control_render = render_scenes({**sim_rows, "is_control": np.ones(len(keep), np.int32)}, psf_model, 3.5)
    sim = render_scenes(sim_rows, psf_model, 3.5)
    for j, i in enumerate(keep):
        name = names[i]
        got = decode_stamp(inj.loc[name, "stamp_npz"])
        np.testing.assert_array_equal(control_render.image[j], batch.image[i])  # same control in a smaller batch
        r = inj.loc[name]
        if sim_rows["is_control"][j] == 1:
            np.testing.assert_array_equal(got, batch.image[i])  # a control's real pixels are untouched
            assert np.isnan(r["arc_snr"]) and r["control_kind"] == "unpaired"
            continue
        arc = sim.arc[j]
        # the arc's own Poisson noise, from the task's noise_seed
        z_arc = np.random.default_rng(int(man.loc[name, "noise_seed"])).standard_normal(arc.shape, dtype=np.float32)
        arc_sigma = np.sqrt(np.maximum(arc, 0) / np.float32(GAIN_E_PER_NMGY))
        np.testing.assert_allclose(got, batch.image[i] + arc + z_arc * arc_sigma, rtol=0, atol=2e-6)
        # = the simulator's positive up to float32 rounding plus the noise terms: the simulator draws the
        # scene's noise with variance sky + (host + arc)/gain, the host stamp carries sky + host/gain
        z = np.random.default_rng(int(sim_rows["noise_seed"][j])).standard_normal(arc.shape, dtype=np.float32)
        residual = got - z_arc * arc_sigma - sim.image[j]
        assert (np.abs(residual) <= np.abs(z) * arc_sigma + 2e-6).all()
        assert np.abs(residual[arc == 0]).max(initial=0) <= 2e-6
        # sky sigma from the host's depth: the simulator's sum(PSF^2) comes from kernels sized per chunk (<1e-4)
        assert r["arc_snr"] == pytest.approx(sim.arc_snr[j], rel=1e-4)
        assert r["magnification"] == pytest.approx(sim.magnification[j], rel=1e-12)
        assert r["psf_fwhm_used_r"] == rows["psfsize_r"][i] and r["psf_model"] == psf_model
        assert r["theta_e_arcsec"] == man.loc[name, "theta_e_arcsec"]
    # the lens sits at the stamp centre with the simulator's 0.03" jitter
    pos = man[man["is_control"] == 0]
    assert np.abs(pos[["lens_x0", "lens_y0"]].to_numpy()).max() < 0.15


def test_tractor_shape_sets_lens_axis_ratio_and_angle(tmp_path):
    # |e| = 1/3 -> q = (1 - 1/3) / (1 + 1/3) = 0.5. e1 = 0, e2 = -1/3: PA = -atan2(-1/3, 0) / 2 = +45 deg east of
    # north, i.e. towards north-east; on a north-up, east-left stamp that is up-left: 135 deg from +x.
    q, phi = shape_orientation([0.0, 1 / 3, 0.0, np.nan], [-1 / 3, 0.0, 0.0, 0.1])
    assert q[0] == pytest.approx(0.5) and phi[0] == pytest.approx(3 * np.pi / 4)
    assert q[1] == pytest.approx(0.5) and phi[1] == pytest.approx(np.pi / 2)  # e1 > 0: PA 0, north-south axis
    assert np.isnan(q[2]) and np.isnan(phi[3])  # round or missing: the priors decide
    # through the command: hosts with a shape get the lens q and angle from it
    from darkhaloscope.simulation.real_hosts import build_host_manifest

    rng = np.random.default_rng(0)
    n = 40
    split = np.array(["train", "val", "test"])[rng.integers(0, 3, n)]
    for s in ("train", "val", "test"):
        sel = split == s
        t = pa.table({"task_id": pa.array(np.arange(n)[sel]), "ra": rng.uniform(0, 10, sel.sum()),
                      "dec": rng.uniform(0, 10, sel.sum()), "cutout_ok": pa.array(np.ones(sel.sum(), np.int32)),
                      **{f"psfsize_{b}": np.full(sel.sum(), 1.2) for b in "grz"},
                      **{f"psfdepth_{b}": np.full(sel.sum(), 24.0) for b in "grz"},
                      "shape_e1": np.zeros(sel.sum()), "shape_e2": np.full(sel.sum(), -0.2)})
        (tmp_path / f"region_split={s}").mkdir()
        pq.write_table(t, tmp_path / f"region_split={s}" / "part-00000.parquet")
    table, n_bad, _ = build_host_manifest(str(tmp_path), seed=0, control_frac=0.0)
    df = table.to_pandas()
    assert n_bad == 0 and len(df) == n
    assert np.allclose(df["lens_q"], (1 - 0.2) / 1.2)
    d = np.angle(np.exp(2j * (df["lens_phi"] - 3 * np.pi / 4))) / 2  # axis difference, modulo pi
    assert np.abs(d).max() < np.radians(25) and np.abs(d).std() > np.radians(1)  # 5-deg jitter around the host


def test_plain_manifest_still_needs_n_tasks(tmp_path, capsys):
    assert main(["manifest", "--out", str(tmp_path / "m.parquet")]) == 2
    assert "--n_tasks is required" in capsys.readouterr().err
