"""Every command on the original pipeline's stage-4c layout (tests/phase4c_layout.py): string task ids,
gzip parts with uuids, _SUCCESS, region_split as a column and a partition, failed cutouts, extra columns."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from factory import write_fake_phase4c
from phase4c_layout import string_id, write_phase4c_layout

from darkhaloscope import cli
from darkhaloscope.learning import stream
from darkhaloscope.simulation import audit
from darkhaloscope.stamps.dataset import fetch_stamps
from darkhaloscope.stamps import dataset


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    sim = write_fake_phase4c(base / "sim", {"train": 64, "val": 48, "test": 48}, seed=4, arc_amp=0.3)
    return sim, write_phase4c_layout(sim, base / "phase4c", n_failed=3)


def test_layout_is_the_stage4c_layout(both):
    _, p4c = both
    assert (p4c / "_SUCCESS").exists()
    names = sorted(p.name for p in (p4c / "region_split=train").iterdir())
    assert any(n.startswith("part-00000-") and n.endswith(".c000.gz.parquet") for n in names)
    assert any(n.startswith(".") and n.endswith(".crc") for n in names)
    f = next(p for p in (p4c / "region_split=train").glob("part-00000-*.gz.parquet"))
    schema = pq.read_schema(f)
    assert schema.field("task_id").type == pa.string() and schema.field("is_control").type == pa.int32()
    assert "region_split" in schema.names and "physics_warnings" in schema.names
    assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "GZIP"


def test_index_same_rows_string_ids_and_failed_cutouts_counted(both):
    sim, p4c = both
    for split in ("train", "val"):
        a, b = stream.open_split(str(sim), split), stream.open_split(str(p4c), split)
        ia = stream.build_index(a.fs, a.files, ["psfsize_r", "arc_snr", "theta_e_arcsec"])
        ib = stream.build_index(b.fs, b.files, ["psfsize_r", "arc_snr", "theta_e_arcsec"])
        assert ia.n_cutout_failed == 0 and ib.n_cutout_failed == 3
        assert ib.task_id.tolist() == [string_id(t) for t in ia.task_id.tolist()]
        np.testing.assert_array_equal(ia.label, ib.label)
        np.testing.assert_array_equal(ia.row_group, ib.row_group)
        np.testing.assert_array_equal(ia.columns["psfsize_r"], ib.columns["psfsize_r"])
        assert (ib.columns["theta_e_arcsec"][ib.label == 0] == 0.0).all()  # 0.0 for controls, not null


def test_id_types_int32_int64_string_large_string():
    for arr, kind in ((pa.array([3, 1], pa.int32()), "int"), (pa.array([3, 1], pa.int64()), "int"),
                      (pa.array(["b", "a"], pa.string()), "string"), (pa.array(["b", "a"], pa.large_string()), "string")):
        values = dataset.as_id_values(arr, "t")
        assert dataset.task_id_kind(arr.type, "t") == kind and values.tolist() == arr.to_pylist()
    with pytest.raises(Exception, match="integers but those of"):
        dataset.ids_compatible(np.array([1]), np.array(["a"], object), "a file", "the split")


def test_infer_scores_the_same_rows_with_string_ids(both, tmp_path, caplog):
    from test_infer import make_checkpoint

    sim, p4c = both
    ck = make_checkpoint(tmp_path / "best.pt")
    caplog.set_level(logging.INFO, logger="dhs.infer")
    outs = {}
    for name, data in (("sim", sim), ("p4c", p4c)):
        outs[name] = tmp_path / f"{name}.parquet"
        # --max_skip_frac 0: the 3 declared cutout failures do not count as bad stamps
        assert cli.main(["infer", "--data", str(data), "--ckpt", str(ck), "--out", str(outs[name]), "--split",
                         "test", "--max_skip_frac", "0"]) == 0
    assert "3 declared cutout failures (cutout_ok != 1) not scored; skipped 0 unscorable" in caplog.text
    a, b = pq.read_table(outs["sim"]), pq.read_table(outs["p4c"])
    assert b.schema.field("task_id").type == pa.string() and b.num_rows == a.num_rows == 48
    assert b.column("task_id").to_pylist() == [string_id(t) for t in a.column("task_id").to_pylist()]
    np.testing.assert_array_equal(a.column("logit").to_numpy(), b.column("logit").to_numpy())


def test_mine_eval_report_and_train_with_string_ids(both, tmp_path, capsys):
    from test_infer import make_checkpoint

    _, p4c = both
    ck = make_checkpoint(tmp_path / "best.pt")
    scores = tmp_path / "train_scores.parquet"
    assert cli.main(["infer", "--data", str(p4c), "--ckpt", str(ck), "--out", str(scores), "--split", "train"]) == 0
    hard = tmp_path / "hard.parquet"
    assert cli.main(["mine", "--scores", str(scores), "--out", str(hard), "--topk", "5", "--min_score", "0",
                     "--exclude_radius_arcsec", "0"]) == 0
    mined = pq.read_table(hard)
    assert mined.schema.field("task_id").type == pa.string() and mined.num_rows == 5
    assert all(t.startswith("v4sm_") for t in mined.column("task_id").to_pylist())
    # eval + report on the string-id score file, galleries fetched by string id
    test_scores = tmp_path / "test_scores.parquet"
    assert cli.main(["infer", "--data", str(p4c), "--ckpt", str(ck), "--out", str(test_scores)]) == 0
    assert cli.main(["eval", "--scores", str(test_scores), "--out_csv", str(tmp_path / "t.csv")]) == 0
    assert cli.main(["report", "--scores", f"gen3={test_scores}", "--tables", f"gen3={tmp_path / 't.csv'}", "--out",
                     str(tmp_path / "r.html"), "--hard_negs", str(hard), "--data", str(p4c), "--gallery_n", "4"]) == 0
    html = (tmp_path / "r.html").read_text()
    assert 'data-figure="gallery-hard-negatives"' in html and 'data-figure="gallery-top-controls"' in html
    stamps = fetch_stamps(str(p4c), mined.column("task_id").to_pylist() + ["v4sm_9000000_r0"])
    assert set(stamps) == set(mined.column("task_id").to_pylist())  # a failed cutout has no stamp
    # training matches the mined hard negatives by string id
    out = tmp_path / "run"
    rc = cli.main(["train", "--data", str(p4c), "--out_dir", str(out), "--arch", "convnext_atto", "--epochs", "1",
                   "--batch_size", "32", "--timm_kwargs", '{"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}',
                   "--hard_negs", str(hard)])
    err = capsys.readouterr().err
    assert rc == 0, err
    history = json.loads((out / "history.json").read_text())
    assert history["hard_negatives"]["n_matched"] == 5
    assert history["cutout_failed"] == {"train": 3, "val": 3}
    assert "3 declared cutout failures (cutout_ok != 1) excluded" in err
    assert re.search(r"skipped stamps: 0 of \d+ in training, 0 in validation", err)
    row = history["epochs"][0]
    assert row["n_skipped"] == 0 and row["val_skipped"] == 0


def test_audit_on_the_layout_equals_the_simulator_layout(both):
    sim, p4c = both
    a = audit.load_split(sim, "train", None)
    b = audit.load_split(p4c, "train", None)
    assert b["n_cutout_failed"] == 3 and a["n_cutout_failed"] == 0
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["is_control"], b["is_control"])
    sub = audit.load_split(p4c, "train", 20, seed=1)
    assert len(sub["images"]) == 20


def test_leftover_temp_files_only_are_named(tmp_path):
    d = tmp_path / "data" / "region_split=train"
    d.mkdir(parents=True)
    (d / ".part-00000.parquet.tmp-99999999").write_bytes(b"x" * 10)
    with pytest.raises(Exception, match="leftover temporary file"):
        stream.open_split(str(tmp_path / "data"), "train")
