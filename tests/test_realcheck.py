"""The real check set: cutout-service centring (astropy WCS), contract resampling, halves, and `dhs realcheck`
scored through `dhs infer` at a stratified table's thresholds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord

from darkhaloscope.cli import main
from darkhaloscope.errors import DHSError
from darkhaloscope.metrics import wilson_interval
from darkhaloscope.sky.realcheck import HALVES, cutout_wcs, half_of, to_contract, write_check_set
from test_infer import make_checkpoint

RA, DEC = 150.1, 2.2


def test_cutout_service_puts_the_request_between_the_four_central_pixels():
    for size, centre in ((64, 31.5), (101, 50.0)):
        w = cutout_wcs(RA, DEC, size, 0.262)
        x, y = w.world_to_pixel(SkyCoord(RA, DEC, unit="deg"))
        assert (float(x), float(y)) == pytest.approx((centre, centre), abs=1e-9)
        # north up, east left: a step north raises the row, a step east lowers the column
        xn, yn = w.world_to_pixel(SkyCoord(RA, DEC + 1 / 3600, unit="deg"))
        xe, _ = w.world_to_pixel(SkyCoord(RA + 1 / 3600 / math.cos(math.radians(DEC)), DEC, unit="deg"))
        assert float(yn) - centre == pytest.approx(1 / 0.262, rel=1e-4) and float(xe) < centre


def _point_source(size, scale, fwhm=1.2, flux=2.0, offset=(0.0, 0.0)):
    """A Gaussian of total flux ``flux`` at the cutout's request position (+ offset, arcsec)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    s = fwhm / 2.3548 / scale
    g = np.exp(-((xx - c - offset[0] / scale) ** 2 + (yy - c - offset[1] / scale) ** 2) / (2 * s * s))
    g *= flux / g.sum()
    return np.stack([g, 2 * g, 3 * g])


@pytest.mark.parametrize("size,scale", [(101, 0.262), (96, 0.27), (120, 0.2)])
def test_to_contract_centres_the_request_and_keeps_flux(size, scale):
    stamp = to_contract(_point_source(size, scale), RA, DEC, scale)
    assert stamp.shape == (3, 64, 64) and stamp.dtype == np.float32
    yy, xx = np.mgrid[:64, :64]
    for band, total in enumerate((2.0, 4.0, 6.0)):
        img = stamp[band].astype(np.float64)
        assert img.sum() == pytest.approx(total, rel=0.01)
        assert (img * xx).sum() / img.sum() == pytest.approx(31.5, abs=0.02)
        assert (img * yy).sum() / img.sum() == pytest.approx(31.5, abs=0.02)


def test_to_contract_keeps_the_sky_orientation():
    # an object 2" north of the request lands 2 / 0.262 rows above the stamp centre
    stamp = to_contract(_point_source(101, 0.262, offset=(0.0, 2.0)), RA, DEC, 0.262)[0].astype(np.float64)
    yy, xx = np.mgrid[:64, :64]
    assert (stamp * yy).sum() / stamp.sum() == pytest.approx(31.5 + 2 / 0.262, abs=0.05)


def test_to_contract_refuses_a_cutout_too_small_or_bad():
    with pytest.raises(DHSError, match="reaches outside"):
        to_contract(np.zeros((3, 40, 40)), RA, DEC, 0.262)
    with pytest.raises(DHSError, match="expected"):
        to_contract(np.zeros((3, 80, 70)), RA, DEC, 0.262)
    bad = np.zeros((3, 101, 101))
    bad[0, 3, 3] = np.nan
    with pytest.raises(DHSError, match="non-finite"):
        to_contract(bad, RA, DEC, 0.262)


def test_halves_are_a_fixed_function_of_the_id_and_balanced():
    ids = [f"gal{i}" for i in range(2000)]
    halves = [half_of(i) for i in ids]
    assert set(halves) == set(HALVES)
    assert halves == [half_of(i) for i in ids]
    assert 0.45 < halves.count("look") / len(ids) < 0.55


def _check_set(root, n_ctl=30, n_cand=4):
    rng = np.random.default_rng(1)
    recs = []
    for i in range(n_ctl + n_cand):
        img = rng.normal(0, 0.004, (3, 64, 64)) + to_contract(_point_source(101, 0.262, flux=float(rng.uniform(1, 5))),
                                                              RA, DEC, 0.262)
        recs.append({"id": f"g{i:03d}", "ra": RA + i * 1e-3, "dec": DEC, "is_control": int(i < n_ctl), "image": img,
                     "source_repo": "o/r", "source_path": f"p/{i}.npz", "source_commit": "c" * 40,
                     "source_units": "nanomaggy", "source_pixscale": "0.262",
                     "psfsize_r": 1.3, "psfdepth_r": 24.4})
    write_check_set(recs, root)
    return root


def test_write_check_set_refuses_repeated_ids(tmp_path):
    rec = {"id": "a", "ra": RA, "dec": DEC, "is_control": 1, "image": np.zeros((3, 64, 64))}
    with pytest.raises(DHSError, match="repeat"):
        write_check_set([rec, dict(rec)], tmp_path / "cs")
    assert not (tmp_path / "cs").exists()


@pytest.fixture(scope="module")
def scored_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("realcheck")
    data = _check_set(root / "check")
    ckpt = make_checkpoint(root / "best.pt")
    # independent path: dhs infer on the check set
    ref = root / "ref.parquet"
    assert main(["infer", "--data", str(data), "--ckpt", str(ckpt), "--out", str(ref), "--split", "test"]) == 0
    logits = pq.read_table(ref).to_pandas().set_index("task_id")["logit"]
    # a simulated score file: 200 controls and 50 positives
    rng = np.random.default_rng(2)
    sim = root / "sim.parquet"
    pq.write_table(pa.table({"task_id": pa.array(np.arange(250)), "is_control": pa.array([1] * 200 + [0] * 50, pa.int8()),
                             "logit": pa.array(rng.normal(0, 1, 250), pa.float32())}), sim)
    real_ctl = np.sort(logits[[f"g{i:03d}" for i in range(30)]].to_numpy())
    thr = {1e-2: float(real_ctl[20]), 1e-3: float(real_ctl[27]), 1e-4: None}
    table = root / "gen3_stratified_fpr.csv"
    pd.DataFrame([{"stratum": "all", "metric": "tpr@fpr", "target": t, "threshold": "" if v is None else v}
                  for t, v in thr.items()]).to_csv(table, index=False)
    return root, data, ckpt, sim, table, logits, thr


def _run(root, data, ckpt, sim, table, *extra):
    return main(["realcheck", "--data", str(data), "--ckpt", f"gen3={ckpt}", "--table", f"gen3={table}",
                 "--sim_scores", f"gen3={sim}", "--out_csv", str(root / "out.csv"), "--report",
                 str(root / "out.html"), *extra])


def test_realcheck_counts_real_controls_above_the_simulated_thresholds(scored_world, capsys):
    root, data, ckpt, sim, table, logits, thr = scored_world
    assert _run(root, data, ckpt, sim, table) == 0
    out = pd.read_csv(root / "out.csv")
    check = pq.read_table(data / "region_split=test" / "part-00000.parquet", columns=["task_id", "half"]).to_pandas()
    half = dict(zip(check["task_id"], check["half"]))
    ctl_ids = [f"g{i:03d}" for i in range(30)]
    for h in (*HALVES, "all"):
        ids = [i for i in ctl_ids if h == "all" or half[i] == h]
        for target, v in thr.items():
            row = out[(out["row"] == "controls") & (out["half"] == h) & np.isclose(out["fpr_target"], target)]
            assert len(row) == 1
            row = row.iloc[0]
            assert row["n_controls"] == len(ids)
            if v is None:
                assert pd.isna(row["n_above"]) and pd.isna(row["fpr"])
                continue
            k = sum(logits[i] >= v for i in ids)
            assert row["n_above"] == k and row["fpr"] == pytest.approx(k / len(ids))
            assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(k, len(ids)))
            assert row["median_real_logit"] == pytest.approx(np.median([logits[i] for i in ids]), abs=1e-6)
    sim_ctl = pq.read_table(sim).to_pandas().query("is_control == 1")["logit"]
    assert out["median_sim_control_logit"].dropna().iloc[0] == pytest.approx(float(np.median(sim_ctl)), abs=1e-6)
    cand = out[out["row"] == "candidate"].set_index("task_id")
    assert sorted(cand.index) == [f"g{i:03d}" for i in range(30, 34)]
    for tid, r in cand.iterrows():
        assert r["logit"] == pytest.approx(logits[tid], abs=1e-6)
        passed = [t for t, v in thr.items() if v is not None and logits[tid] >= v]
        assert (pd.isna(r["fpr_target"]) if not passed else r["fpr_target"] == pytest.approx(min(passed)))
    page = (root / "out.html").read_text()
    assert 'data-figure="realcheck-logits"' in page and "held_out" in page
    assert "30 real controls, 4 candidates" in capsys.readouterr().out


def test_realcheck_skips_with_a_clear_message_when_the_data_is_absent(scored_world, tmp_path, capsys):
    root, _, ckpt, sim, table, _, _ = scored_world
    assert _run(tmp_path, tmp_path / "nope", ckpt, sim, table) == 0
    assert "absent: skipped" in capsys.readouterr().out and "fetch_realcheck.py" in (tmp_path / "out.html").read_text()
    assert pd.read_csv(tmp_path / "out.csv").empty


def test_realcheck_refuses_mismatched_models(scored_world, tmp_path, capsys):
    root, data, ckpt, sim, table, _, _ = scored_world
    rc = main(["realcheck", "--data", str(data), "--ckpt", f"gen3={ckpt}", "--table", f"gen2={table}",
               "--sim_scores", f"gen3={sim}", "--out_csv", str(tmp_path / "o.csv")])
    assert rc == 2 and "same models" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_realcheck_refuses_bad_inputs_in_one_line_writing_nothing(scored_world, tmp_path, capsys):
    root, data, ckpt, sim, table, _, _ = scored_world
    not_a_set = tmp_path / "plain"
    (not_a_set / "region_split=test").mkdir(parents=True)
    pq.write_table(pa.table({"task_id": ["a"], "is_control": [1]}), not_a_set / "region_split=test" / "p.parquet")
    for data_arg, table_arg, what in ((not_a_set, table, "is not a check set"),
                                      (data, tmp_path / "missing.csv", "does not exist")):
        rc = main(["realcheck", "--data", str(data_arg), "--ckpt", f"gen3={ckpt}", "--table", f"gen3={table_arg}",
                   "--sim_scores", f"gen3={sim}", "--out_csv", str(tmp_path / "o.csv"), "--report",
                   str(tmp_path / "o.html")])
        err = capsys.readouterr().err
        assert rc == 2 and what in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.html").exists()
