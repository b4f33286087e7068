"""`dhs manifest --extra_test_controls`: controls added to test regions only, from the ordinary controls'
distribution, leaving every ordinary task exactly as it was."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import ks_2samp

from darkhaloscope import cli
from darkhaloscope.simulation.draws import region_split_of
from darkhaloscope.simulation.manifest import add_test_controls, build_manifest

FRACS = (0.6, 0.15, 0.25)


@pytest.fixture(scope="module")
def tables():
    base = build_manifest(4000, 5, 0.5, FRACS)
    return base, add_test_controls(base, 3000, 5, FRACS)


def test_extra_controls_are_test_controls_after_the_ordinary_tasks(tables):
    base, full = tables
    assert full.num_rows == base.num_rows + 3000
    assert full.slice(0, base.num_rows).to_pandas().equals(base.to_pandas())  # untouched (NaN == NaN), same order
    extra = full.slice(base.num_rows).to_pandas()
    assert (extra.task_id == np.arange(4000, 7000)).all() and full.column("task_id").to_pandas().is_unique
    assert (extra.is_control == 1).all() and extra.theta_e_arcsec.isna().all()
    assert (extra.region_split == "test").all()
    assert (region_split_of(extra.region_id.to_numpy(), FRACS) == "test").all()  # the hash, not a label
    assert len(set(extra.noise_seed) & set(base.column("noise_seed").to_pylist())) == 0
    assert b"extra_test_controls=3000" in full.schema.metadata[b"dhs_manifest"]


def test_extra_controls_follow_the_ordinary_controls_distribution(tables):
    base, full = tables
    ordinary = base.to_pandas().query("is_control == 1")
    extra = full.slice(base.num_rows).to_pandas()
    for col in ("psfsize_r", "psfdepth_r", "psfsize_g", "psfdepth_z"):
        assert ks_2samp(ordinary[col], extra[col]).pvalue > 1e-3, col
    host_cols = [c for c in ordinary.columns if c.startswith("host_") and pd.api.types.is_numeric_dtype(ordinary[c])]
    assert host_cols
    for col in host_cols[:4]:
        assert ks_2samp(ordinary[col].dropna(), extra[col].dropna()).pvalue > 1e-3, col
    has_confuser = lambda d: (d.confuser_kind.fillna("none") != "none").mean()  # noqa: E731
    assert abs(has_confuser(extra) - has_confuser(ordinary)) < 0.03


def test_deterministic_and_zero_is_a_no_op(tables):
    base, full = tables
    assert add_test_controls(base, 3000, 5, FRACS).to_pandas().equals(full.to_pandas())
    assert add_test_controls(base, 0, 5, FRACS) is base


def test_cli_and_bad_input(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert cli.main(["manifest", "--out", str(out), "--n_tasks", "300", "--seed", "2",
                     "--split_fracs", "0.6,0.15,0.25", "--extra_test_controls", "500"]) == 0
    t = pq.read_table(out).to_pandas()
    assert len(t) == 800 and (t.query("task_id >= 300").region_split == "test").all()
    for extra, word in ((["--extra_test_controls", "-1"], "--extra_test_controls"),
                        (["--extra_test_controls", "10", "--split_fracs", "0.8,0.2,0"], "test split")):
        bad = tmp_path / "bad.parquet"
        assert cli.main(["manifest", "--out", str(bad), "--n_tasks", "300", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("dhs manifest: error:") and word in err, err
        assert not bad.exists()


def test_inject_can_skip_the_extra_controls(tmp_path):
    """A variant whose test split nothing scores renders every ordinary task and none of the extra controls."""
    from darkhaloscope.simulation.manifest import first_extra_test_id

    man = tmp_path / "m.parquet"
    assert cli.main(["manifest", "--out", str(man), "--n_tasks", "200", "--seed", "4",
                     "--split_fracs", "0.6,0.15,0.25", "--extra_test_controls", "60"]) == 0
    assert first_extra_test_id(man) == 200
    ids = {}
    for name, flag in (("all", []), ("skip", ["--skip_extra_test_controls"])):
        out = tmp_path / name
        assert cli.main(["inject", "--manifest", str(man), "--out_dir", str(out), "--batch_size", "64", *flag]) == 0
        ids[name] = set(pq.read_table(out, columns=["task_id"]).column("task_id").to_pylist())
    assert ids["all"] == set(range(260))
    assert ids["skip"] == set(range(200))
    plain = tmp_path / "plain.parquet"
    assert cli.main(["manifest", "--out", str(plain), "--n_tasks", "50", "--seed", "4"]) == 0
    assert first_extra_test_id(plain) is None and first_extra_test_id(tmp_path / "missing.parquet") is None
