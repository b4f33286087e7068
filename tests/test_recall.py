"""`dhs recall`: known-lens cutouts (fetched from the local fake service) scored at dhs eval's thresholds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from darkhaloscope.cli import main
from darkhaloscope.metrics import wilson_interval
from fake_cutouts import FakeCutoutService, simulated_sky
from test_infer import make_checkpoint


@pytest.fixture(scope="module")
def lens_data(tmp_path_factory):
    """Known-lens cutouts: 24 simulated positives, lenscat-like name/grading, one outside the footprint."""
    root = tmp_path_factory.mktemp("recall")
    cat, images, rows, _ = simulated_sky(24, seed=5, control_frac=0.0)
    cat = cat.rename_columns(["name", *cat.column_names[1:]])
    cat = cat.append_column("grading", pa.array(["confident", "probable", "confident"] * 8))
    cat_path = root / "lenses.parquet"
    pq.write_table(cat, cat_path)
    zero = (rows["ra"][3], rows["dec"][3])
    with FakeCutoutService(images, persistent={zero: "all_zero"}) as svc:
        assert main(["cutouts", "--catalog", str(cat_path), "--out_dir", str(root / "lenses"), "--base_url",
                     svc.base_url, "--id_column", "name", "--label", "lens", "--no_progress", "--timeout", "5"]) == 0
    ckpt = make_checkpoint(root / "best.pt")
    return root, cat, ckpt


def _stratified_csv(path, thresholds: dict):
    rows = [{"stratum": "all", "bin_lo": "", "bin_hi": "", "n_pos": 100, "n_neg": 100, "metric": "tpr@fpr",
             "target": t, "value": "", "ci_low": "", "ci_high": "", "threshold": "" if v is None else v}
            for t, v in thresholds.items()]
    rows.append({"stratum": "theta_e", "bin_lo": 0.5, "bin_hi": 1.0, "n_pos": 10, "n_neg": 100, "metric": "tpr@fpr",
                 "target": 0.01, "value": "", "ci_low": "", "ci_high": "", "threshold": -99.0})
    pd.DataFrame(rows).to_csv(path, index=False)


def test_recall_per_grade_at_the_eval_thresholds(lens_data, tmp_path, capsys):
    root, cat, ckpt = lens_data
    # the other path: dhs infer on every split, in 4 views, gives the lenses' logits
    infer_scores = tmp_path / "infer_all.parquet"
    assert main(["infer", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--out", str(infer_scores),
                 "--split", "all", "--max_skip_frac", "1", "--tta", "4"]) == 0
    t = pq.read_table(infer_scores)
    logits = dict(zip(t.column("task_id").to_pylist(), t.column("logit").to_pylist()))
    assert len(logits) == 23  # the all-zero cutout is not scorable
    values = np.array(sorted(logits.values()))
    thr = float(values[10])  # 13 of 23 at or above
    csv = tmp_path / "gen3_stratified_fpr.csv"
    _stratified_csv(csv, {1e-4: None, 1e-2: thr})
    scores = tmp_path / "lens_scores.parquet"
    report = tmp_path / "recall.html"
    assert main(["recall", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--stratified_csv", str(csv),
                 "--grade_column", "grading", "--scores_out", str(scores), "--report", str(report),
                 "--scored_with", str(infer_scores)]) == 0
    table = pd.read_csv(tmp_path / "gen3_stratified_fpr_recall.csv")
    assert set(table["tta_views"]) == {4}  # the views of the scores the thresholds came from
    # one scoring path: every lens has exactly the logit dhs infer gave it
    per_lens = pq.read_table(scores).to_pandas().set_index("task_id")
    scored = per_lens[per_lens["scored"]]
    assert len(scored) == 23
    np.testing.assert_array_equal(scored["logit"].to_numpy(np.float32),
                                  np.array([logits[i] for i in scored.index], np.float32))
    assert list(table["grade"].unique()) == ["all", "confident", "probable"]
    assert list(table["fpr_target"]) == [1e-4, 1e-2] * 3
    grading = dict(zip(cat.column("name").to_pylist(), cat.column("grading").to_pylist()))
    for grade in ("all", "confident", "probable"):
        names = [n for n in grading if grade == "all" or grading[n] == grade]
        scored = [logits[n] for n in names if n in logits]
        k = sum(v >= thr for v in scored)
        row = table[(table["grade"] == grade) & (table["fpr_target"] == 1e-2)].iloc[0]
        assert row["n_lenses"] == len(names) and row["n_scored"] == len(scored)
        assert row["n_found"] == k and row["recall"] == pytest.approx(k / len(scored))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(wilson_interval(k, len(scored)))
        assert row["n_unscored"] == len(names) - len(scored)
        empty = table[(table["grade"] == grade) & (table["fpr_target"] == 1e-4)].iloc[0]
        assert math.isnan(empty["recall"]) and math.isnan(empty["threshold"])  # not estimable -> empty
    assert table.iloc[1]["n_found"] == 13
    # positions are the catalogue's
    per = pq.read_table(scores).to_pandas().set_index("task_id")
    ra = dict(zip(cat.column("name").to_pylist(), cat.column("ra").to_pylist()))
    assert all(per.loc[n, "ra"] == pytest.approx(ra[n] % 360, abs=1e-12) for n in ra)
    assert (per["reason"] == "no_coverage:all_zero").sum() == 1
    page = report.read_text()
    assert 'data-figure="recall-found"' in page and 'data-figure="recall-missed"' in page
    assert "recall on 24 known lenses (1 not scorable), 4 view(s)" in capsys.readouterr().out


def test_recall_views_must_be_named_and_agree(lens_data, tmp_path, capsys):
    root, cat, ckpt = lens_data
    csv = tmp_path / "s.csv"
    _stratified_csv(csv, {1e-2: 0.0})
    base = ["recall", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--stratified_csv", str(csv)]
    assert main(base) == 2
    assert "say which views" in capsys.readouterr().err
    one_view = tmp_path / "one.parquet"
    assert main(["infer", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--out", str(one_view),
                 "--split", "test", "--max_skip_frac", "1"]) == 0
    assert main([*base, "--scored_with", str(one_view), "--tta", "4"]) == 2
    assert "disagrees" in capsys.readouterr().err
    legacy = tmp_path / "legacy.parquet"
    pq.write_table(pq.read_table(one_view).replace_schema_metadata(None), legacy)
    assert main([*base, "--scored_with", str(legacy)]) == 2
    assert "does not record the views" in capsys.readouterr().err


def test_recall_refuses_controls_and_a_foreign_table(lens_data, tmp_path, capsys):
    root, cat, ckpt = lens_data
    bad = tmp_path / "x.csv"
    pd.DataFrame({"a": [1]}).to_csv(bad, index=False)
    rc = main(["recall", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--stratified_csv", str(bad),
               "--tta", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "lacks column(s) metric, stratum, target, threshold" in err
    csv = tmp_path / "s.csv"
    _stratified_csv(csv, {1e-2: 0.0})
    rc = main(["recall", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--stratified_csv", str(csv),
               "--grade_column", "grade", "--tta", "1"])
    assert rc == 2 and "no grade column 'grade'" in capsys.readouterr().err


def test_recall_refuses_another_models_thresholds(lens_data, tmp_path, capsys):
    """The thresholds' score file records the checkpoint that made it (SHA-256): recall with another model's
    checkpoint (a Gen2 model with Gen3's table) is refused in one line, and writes nothing."""
    root, cat, ckpt = lens_data
    csv = tmp_path / "s.csv"
    _stratified_csv(csv, {1e-2: 0.0})
    scored = tmp_path / "gen3_like.parquet"
    assert main(["infer", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--out", str(scored),
                 "--split", "test", "--max_skip_frac", "1"]) == 0
    capsys.readouterr()  # infer's progress bar
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    out = tmp_path / "recall.csv"
    assert main(["recall", "--data", str(root / "lenses"), "--ckpt", str(other), "--stratified_csv", str(csv),
                 "--scored_with", str(scored), "--out_csv", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the checkpoint that scored" in err and not out.exists()
    assert main(["recall", "--data", str(root / "lenses"), "--ckpt", str(ckpt), "--stratified_csv", str(csv),
                 "--scored_with", str(scored), "--out_csv", str(out)]) == 0
