"""Realism gates: figures on simulated data, and gates that do fail on leaky data (warn vs stop)."""

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from darkhaloscope import cli
from darkhaloscope.errors import DHSError
from darkhaloscope.simulation import audit
from darkhaloscope.simulation.manifest import build_manifest, write_manifest
from factory import fake_rows, write_fake_phase4c


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    write_manifest(build_manifest(300, seed=5, split_fracs=(0.9, 0.05, 0.05), n_regions=40), root / "m.parquet")
    assert cli.main(["inject", "--manifest", str(root / "m.parquet"), "--out_dir", str(root / "data"),
                     "--psf-model", "moffat", "--moffat-beta", "3.5", "--shard", "0", "--n_shards", "1"]) == 0
    return root / "data"


def test_audit_on_simulated_data_writes_all_figures(simulated, tmp_path):
    out = tmp_path / "audit.json"
    assert cli.main(["audit", "--data", str(simulated), "--out", str(out), "--split", "train"]) == 0
    rep = json.loads(out.read_text())
    for key in ("core_only_auc", "metadata_only_auc", "thresholds", "gates", "class_balance", "passed",
                "n_positives", "n_controls"):
        assert key in rep
    assert rep["n_positives"] > 50 and rep["n_controls"] > 50
    assert rep["thresholds"] == {"core_auc_max": 0.65, "meta_auc_max": 0.55}
    assert 0.0 <= rep["core_only_auc"] <= 1.0 and 0.0 <= rep["metadata_only_auc"] <= 1.0
    # small sample: loose bounds; the demo-size figures are in docs/simulator.md
    assert rep["core_only_auc"] < 0.75 and rep["metadata_only_auc"] < 0.65
    bal = rep["class_balance"]["psfsize_r"]
    assert set(bal) == {"positives", "controls", "ks_pvalue"} and bal["ks_pvalue"] > 0.01


def test_core_shortcut_fails_gate_warn_and_stop(tmp_path, capsys):
    data = write_fake_phase4c(tmp_path / "leaky", {"train": 300, "val": 20, "test": 20}, arc_amp=0.05)
    out = tmp_path / "a.json"
    assert cli.main(["audit", "--data", str(data), "--out", str(out), "--on_fail", "warn"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: REALISM GATE(S) FAILED: core_only" in err and err.count("\n") >= 3
    rep = json.loads(out.read_text())
    assert rep["core_only_auc"] > 0.9 and not rep["gates"]["core_only"]["passed"] and not rep["passed"]
    assert cli.main(["audit", "--data", str(data), "--out", str(out), "--on_fail", "stop"]) == 2
    assert "realism gate failed: core_only AUC" in capsys.readouterr().err


def test_metadata_leak_fails_meta_gate(tmp_path):
    table = fake_rows(400, "train", seed=3, arc_amp=0.0)
    is_pos = pc.equal(table.column("is_control"), 0).to_numpy(zero_copy_only=False)
    psf = table.column("psfsize_r").to_numpy() + np.where(is_pos, 0.15, 0.0)  # positives' seeing worse
    table = table.set_column(table.schema.get_field_index("psfsize_r"), "psfsize_r", [psf])
    (tmp_path / "region_split=train").mkdir()
    pq.write_table(table.drop(["region_split"]), tmp_path / "region_split=train" / "part-0.parquet")
    rep = audit.audit(tmp_path, "train")
    assert rep["metadata_only_auc"] > 0.6 and not rep["gates"]["metadata_only"]["passed"]
    assert rep["gates"]["core_only"]["passed"]  # arc_amp 0: the core carries nothing


def test_bad_input(tmp_path, simulated):
    with pytest.raises(DHSError, match="does not exist"):
        audit.audit(tmp_path / "missing")
    with pytest.raises(DHSError, match="split must be one of"):
        audit.audit(simulated, "holdout")
    data = write_fake_phase4c(tmp_path / "only_train", {"train": 40})
    with pytest.raises(DHSError, match="no parquet files for split 'val'"):
        audit.audit(data, "val")
