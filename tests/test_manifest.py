"""Phase 4a manifest: determinism, sky-region splits, label-independent conditions, priors, bad input."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from scipy.stats import ks_2samp

from darkhaloscope import cli
from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.draws import CELL_N_RA, region_split_of, sky_cell
from darkhaloscope.simulation.manifest import build_manifest, read_manifest, validate_manifest, write_manifest
from darkhaloscope.stamps.contract import load_conditions


def _bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def big():
    return build_manifest(3000, seed=11).to_pandas()


def test_same_seed_same_manifest_other_seed_differs():
    a, b = build_manifest(200, seed=5), build_manifest(200, seed=5)
    assert _bytes(a) == _bytes(b)  # NaN-safe equality (empty neighbour slots are NaN)
    c = build_manifest(200, seed=6)
    assert not np.allclose(a.column("psfsize_r").to_numpy(), c.column("psfsize_r").to_numpy())


def test_every_region_in_one_split_and_split_from_region_hash_only(big):
    per_region = big.groupby("region_id")["region_split"].nunique()
    assert (per_region == 1).all()
    assert big["region_id"].nunique() >= 24
    assert set(big["region_split"]) == {"train", "val", "test"}
    # the split is a function of the region id alone: the same cells give the same split in another manifest
    other = build_manifest(500, seed=99).to_pandas()
    common = set(other["region_id"]) & set(big["region_id"])
    for rid in common:
        assert big.loc[big.region_id == rid, "region_split"].iloc[0] == \
            other.loc[other.region_id == rid, "region_split"].iloc[0]
    assert (sky_cell(big["ra"], big["dec"]) == big["region_id"]).all()


def test_region_split_fractions_follow_split_fracs():
    ids = np.arange(20000)
    splits = region_split_of(ids, (0.7, 0.15, 0.15))
    assert np.mean(splits == "train") == pytest.approx(0.7, abs=0.015)
    assert np.mean(splits == "test") == pytest.approx(0.15, abs=0.015)


def test_positions_in_footprint_and_brickname(big):
    assert big["dec"].between(-20.0, 30.0).all()
    assert big["brickname"].str.fullmatch(r"\d{4}[pm]\d{3}").all()
    assert (big["region_id"] < 90 * CELL_N_RA).all()


def test_controls_conditions_match_positives(big):
    ctrl = big[big.is_control == 1]
    pos = big[big.is_control == 0]
    assert len(ctrl) == 1500
    for col in ("psfsize_g", "psfsize_r", "psfsize_z", "psfdepth_g", "psfdepth_r", "psfdepth_z",
                "host_mag_r", "host_reff"):
        assert ks_2samp(ctrl[col], pos[col]).pvalue > 0.01, col


def test_conditions_follow_dr10(big):
    cond = load_conditions()
    q = cond["psfsize_r_fwhm_arcsec"]["quantiles"]
    assert big["psfsize_r"].between(q["0.00"], q["1.00"]).all()
    assert big["psfsize_r"].median() == pytest.approx(q["0.50"], abs=0.06)
    d = cond["psfdepth_r_5sigma_abmag"]["quantiles"]
    assert big["psfdepth_r"].between(d["0.00"], d["1.00"]).all()
    assert (big["psfsize_g"] > big["psfsize_r"]).all() and (big["psfsize_g"] > big["psfsize_z"]).all()
    assert big["psfsize_g"].mean() / big["psfsize_r"].mean() == pytest.approx(1.531 / 1.325, rel=0.03)
    assert big[["psfsize_g", "psfsize_r", "psfsize_z", "psfdepth_g", "psfdepth_r", "psfdepth_z"]].notna().all().all()


def test_hosts_satisfy_lrg_cuts(big):
    """Both host priors pass the parent cuts; the seed's (sota) hosts are n ~ 4. The DR10-like hosts'
    distributions are tested in test_hosts.py."""
    sota = build_manifest(1000, seed=11, host_priors="sota").to_pandas()
    for t in (big, sota):
        z = t["host_mag_r"] - t["host_r_minus_z"]
        assert (z < 20.4).all() and (t["host_r_minus_z"] > 0.4).all()
        assert t["host_q"].between(0.2, 1.0).all() and t["host_n"].between(0.5, 6.0).all()
    assert sota["host_n"].median() == pytest.approx(4.0, abs=0.2)
    assert sota["host_q"].between(0.4, 1.0).all()


def test_confusers_same_rate_in_both_classes(big):
    has = big["confuser_kind"] != "none"
    rate_c, rate_p = has[big.is_control == 1].mean(), has[big.is_control == 0].mean()
    assert rate_c == pytest.approx(0.1, abs=0.025) and rate_p == pytest.approx(0.1, abs=0.025)
    assert set(big.loc[has, "confuser_kind"]) == {"tidal_arc", "ring", "spiral_arm", "blue_companion"}


def test_training_confuser_rate_leaves_validation_and_test_unchanged(big):
    rich = build_manifest(3000, seed=11, train_confuser_frac=0.4).to_pandas()
    train = (rich.region_split == "train").to_numpy()
    has = rich["confuser_kind"] != "none"
    # the training split's rate is raised, still the same in both classes (no label shortcut)
    for control in (0, 1):
        assert has[train & (rich.is_control == control)].mean() == pytest.approx(0.4, abs=0.04)
    # validation and test rows are exactly the population's draw (same random stream, same rows)
    for col in ("confuser_kind", "conf_r", "conf_mag_r", "theta_e_arcsec", "host_mag_r"):
        assert rich.loc[~train, col].equals(big.loc[~train, col]), col
    assert "train_confuser_frac=0.4" in build_manifest(50, seed=1, train_confuser_frac=0.4).schema.metadata[
        b"dhs_manifest"].decode()
    with pytest.raises(DHSError, match="--train_confuser_frac must be in"):
        build_manifest(50, seed=1, train_confuser_frac=1.5)


def test_lens_truth_only_for_positives_and_realistic_priors(big):
    pos, ctrl = big[big.is_control == 0], big[big.is_control == 1]
    assert ctrl["theta_e_arcsec"].isna().all() and ctrl["src_flux_r"].isna().all()
    pri = load_conditions()["realistic_source_priors"]
    assert pos["theta_e_arcsec"].between(*pri["theta_e_arcsec"]).all()
    assert pos["src_mag_r"].between(*pri["src_r_mag"]).all()
    beta = np.hypot(pos["src_x"], pos["src_y"]) / pos["theta_e_arcsec"]
    assert beta.between(0.1 - 1e-9, 0.4 + 1e-9).all()
    np.testing.assert_allclose(pos["src_flux_r"], 10 ** (-0.4 * (pos["src_mag_r"] - 22.5)))
    # mass tied to the light: small offsets and misalignments
    assert (np.hypot(pos["lens_x0"] - pos["host_x"], pos["lens_y0"] - pos["host_y"]) < 0.2).all()


def test_grid_sota_draws_grid_points():
    t = build_manifest(400, seed=3, source_priors="grid_sota").to_pandas()
    pos = t[t.is_control == 0]
    grid = load_conditions()["injection_grid_sota"]
    assert set(np.round(pos["theta_e_arcsec"], 6)) <= set(grid["theta_e_arcsec"])
    assert set(np.round(pos["src_reff"], 6)) <= set(grid["src_reff_arcsec"])
    dmag = np.round(pos["src_mag_r"] - pos["host_mag_r"], 6)
    assert set(dmag) <= set(grid["src_dmag"])


def test_cli_writes_and_reads_back(tmp_path):
    out = tmp_path / "m.parquet"
    rc = cli.main(["manifest", "--out", str(out), "--n_tasks", "60", "--seed", "2", "--control_frac", "0.25",
                   "--split_fracs", "0.6,0.2,0.2", "--source_priors", "grid_sota", "--confuser_frac", "0.5",
                   "--n_regions", "30"])
    assert rc == 0
    t = read_manifest(out)
    assert t.num_rows == 60 and int(pc.sum(t.column("is_control")).as_py()) == 15
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_input_is_one_line_error(tmp_path):
    t = build_manifest(50, seed=1)
    with pytest.raises(DHSError, match="lacks column.*psfdepth_r"):
        validate_manifest(t.drop(["psfdepth_r"]))
    bad = t.to_pandas()
    bad.loc[3, "psfsize_z"] = np.nan
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), path)
    with pytest.raises(DHSError, match="psfsize_z is NaN"):
        read_manifest(path)
    with pytest.raises(DHSError, match="does not exist"):
        read_manifest(tmp_path / "nope.parquet")
    with pytest.raises(DHSError, match="split_fracs"):
        cli_args = ["manifest", "--out", str(tmp_path / "x.parquet"), "--n_tasks", "5", "--split_fracs", "0.7,0.3"]
        from darkhaloscope.simulation import manifest
        manifest.run(cli.build_parser("manifest").parse_args(cli_args))
    assert cli.main(["manifest", "--out", str(tmp_path / "y.parquet"), "--n_tasks", "0"]) == 2
    assert not (tmp_path / "y.parquet").exists()
    with pytest.raises(DHSError, match="source_priors"):
        build_manifest(10, 0, source_priors="uniform")
    write_manifest(t, tmp_path / "ok.parquet")
    assert read_manifest(tmp_path / "ok.parquet").num_rows == 50
