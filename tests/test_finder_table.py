"""tools/finder_table.py: the finder-quality tables from score files, against direct computations."""

import importlib.util
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from workflow_helpers import REPO

spec = importlib.util.spec_from_file_location("finder_table", REPO / "tools" / "finder_table.py")
ft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ft)


def scores(tmp_path, n_pos=2000, n_neg=9000, seed=0):
    rng = np.random.default_rng(seed)
    snr = rng.lognormal(2.0, 1.2, n_pos)
    theta = rng.uniform(0.5, 3.0, n_pos)
    kind = rng.choice(["none", "ring", "tidal_arc"], n_neg, p=[0.9, 0.05, 0.05])
    ctrl_logit = rng.normal(0, 1, n_neg) + 2.5 * (kind == "ring")  # rings look like arcs
    df = pd.DataFrame({
        "task_id": np.arange(n_pos + n_neg), "is_control": np.r_[np.zeros(n_pos, int), np.ones(n_neg, int)],
        "theta_e_arcsec": np.r_[theta, np.full(n_neg, np.nan)], "psfsize_r": np.full(n_pos + n_neg, 1.25),
        "arc_snr": np.r_[snr, np.full(n_neg, np.nan)],
        "confuser_kind": np.r_[np.full(n_pos, "none"), kind],
        "logit": np.r_[rng.normal(0.5 * snr, 1.0), ctrl_logit].astype(np.float32)})
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return df, path


def test_tables_match_direct_computation(tmp_path):
    df, path = scores(tmp_path)
    out = tmp_path / "t.json"
    assert ft.main(["--scores", f"m={path}", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["models"]["m"]
    pos, neg = df[df.is_control == 0], df[df.is_control == 1]
    y = (df.is_control == 0).astype(int)
    assert r["all"]["auroc"] == pytest.approx(roc_auc_score(y, df.logit), abs=1e-12)
    lo, hi = r["all"]["auroc_ci"]
    assert lo < r["all"]["auroc"] < hi and hi - lo < 0.03
    bright = (pos.theta_e_arcsec / 1.25 >= 1.4) & (pos.arc_snr >= 20)
    assert r["resolved_bright"]["n_pos"] == bright.sum()
    cut = np.sort(neg.logit.to_numpy())[::-1][int(0.01 * len(neg))]  # the 91st highest control: FPR 1e-2 allows 90
    assert r["resolved_bright"]["tpr@0.01"] == pytest.approx((pos.logit[bright] > cut).mean(), abs=1e-12)
    assert r["all"]["tpr@0.0001"] is None  # 9000 controls cannot resolve 1e-4: empty, not made up
    assert sum(s["n_pos"] for s in r["snr_strata"]) == len(pos)
    ring = next(c for c in r["confusers"] if c["kind"] == "ring")
    none = next(c for c in r["confusers"] if c["kind"] == "none")
    assert ring["frac_above@0.01"] > 5 * none["frac_above@0.01"]
    assert sum(c["above@0.01"] for c in r["confusers"]) <= 90


def test_run_dir_without_gen2_scores_and_a_missing_file(tmp_path, capsys):
    """`snakemake gen3_stratified_fpr.csv` alone scores only Gen3: its run directory gives Gen3's tables and says
    Gen2 is left out; a score file that is not there is one line naming it, not a traceback."""
    _, path = scores(tmp_path, n_pos=300, n_neg=1200)
    (tmp_path / "run" / "scores").mkdir(parents=True)
    path.rename(tmp_path / "run" / "scores" / "gen3_test_scores.parquet")
    out = tmp_path / "t.json"
    assert ft.main(["--run_dir", str(tmp_path / "run"), "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["models"]) == ["gen3"]
    assert "gen2_test_scores.parquet absent" in capsys.readouterr().err
    assert ft.main(["--scores", f"m={tmp_path / 'nope.parquet'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finder_table: error:") and "nope.parquet" in err and len(err.splitlines()) == 1


def test_hanley_mcneil_interval_shrinks_with_n():
    w = [np.diff(ft.auroc_interval(0.8, n, n))[0] for n in (100, 1000, 10000)]
    assert w[0] > w[1] > w[2] > 0 and math.isnan(ft.auroc_interval(0.8, 0, 10)[0])


def test_append_csv_records_the_run_in_the_log_schema(tmp_path, capsys):
    """--append_csv writes one row per model in the schema of docs/measurements/finder_runs.csv (gen3 as the row
    id, gen2 as id'), with the figures the tables print; a repeated row id or a foreign file is refused untouched."""
    _, path = scores(tmp_path)
    log, out = tmp_path / "runs.csv", tmp_path / "t.json"
    assert ft.main(["--scores", f"gen3={path}", "--scores", f"gen2={path}", "--json", str(out),
                    "--append_csv", str(log), "--row_id", "72", "--change", "a test run"]) == 0
    rows = pd.read_csv(log, dtype=str, keep_default_na=False)
    assert tuple(rows.columns) == ft.CSV_COLUMNS
    assert list(rows.row_id) == ["72", "72'"] and list(rows.model) == ["gen3", "gen2"]
    r = json.loads(out.read_text())["models"]["gen3"]
    first = rows.iloc[0]
    assert float(first.auroc) == pytest.approx(r["all"]["auroc"], abs=5e-4)
    assert float(first["rb_tpr_1e-2"]) == pytest.approx(r["resolved_bright"]["tpr@0.01"], abs=5e-4)
    assert float(first["rb_tpr_1e-2_lo"]) <= float(first["rb_tpr_1e-2"]) <= float(first["rb_tpr_1e-2_hi"])
    assert int(first.rb_n) == r["resolved_bright"]["n_pos"] and int(first.n_neg) == 9000
    assert first["rb_tpr_1e-4"] == ""  # 9000 controls cannot resolve 1e-4: empty in the log too
    before = log.read_text()
    assert ft.main(["--scores", f"gen3={path}", "--append_csv", str(log), "--row_id", "72", "--change", "again"]) == 2
    assert "72 already recorded" in capsys.readouterr().err and log.read_text() == before
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert ft.main(["--scores", f"gen3={path}", "--append_csv", str(other), "--row_id", "1", "--change", "x"]) == 2
    assert other.read_text() == "a,b\n1,2\n"


def test_the_committed_log_has_the_tools_schema():
    log = pd.read_csv(REPO / "docs" / "measurements" / "finder_runs.csv", dtype=str, keep_default_na=False)
    assert tuple(log.columns) == ft.CSV_COLUMNS and log.row_id.is_unique
    assert {"69", "69'", "71"} <= set(log.row_id)


def test_repeated_label_and_json_onto_a_directory_are_one_line(tmp_path, capsys):
    _, path = scores(tmp_path, n_pos=300, n_neg=1200)
    assert ft.main(["--scores", f"m={path}", "--scores", f"m={path}"]) == 2  # the second model is not dropped silently
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label 'm'" in err and "Traceback" not in err
    (tmp_path / "outdir").mkdir()
    for flag in ("--json", "--md"):
        assert ft.main(["--scores", f"m={path}", flag, str(tmp_path / "outdir")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and "is a directory" in err
