"""benchmarks/gpu_check.py --headline_of: the seed's headline read from a run's stratified tables (issue 30)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope import cli
from workflow_helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)


def evaluated(run, model, separation, n_pos=1500, n_neg=12000, seed=0):
    """``dhs eval`` of synthetic scores with the seed's bins and targets: lenses N(separation, 1), controls N(0, 1)."""
    rng = np.random.default_rng(seed)
    logit = np.r_[rng.normal(separation, 1.0, n_pos), rng.normal(0.0, 1.0, n_neg)].astype(np.float32)
    df = pd.DataFrame({
        "task_id": np.arange(n_pos + n_neg), "is_control": np.r_[np.zeros(n_pos, int), np.ones(n_neg, int)],
        "theta_e_arcsec": np.r_[rng.uniform(0.5, 2.5, n_pos), np.full(n_neg, np.nan)],
        "psfsize_r": np.full(n_pos + n_neg, 1.25), "arc_snr": np.r_[rng.lognormal(2.0, 1.0, n_pos), np.full(n_neg, np.nan)],
        "logit": logit, "score": 1 / (1 + np.exp(-logit)),
    })
    scores = run / f"{model}_scores.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), scores)
    assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(run / f"{model}_stratified_fpr.csv"),
                     "--theta_bins", "0.5,0.75,1.0,1.25,1.5,1.75,2.0,2.5", "--res_bins", "0.5,0.7,0.9,1.1,1.4,2.0",
                     "--tpr_targets", "0.80,0.85,0.90,0.95", "--fpr_targets", "1e-5,1e-4,1e-3,1e-2"]) == 0


def test_headline_is_the_all_rows_and_the_claim_is_judged_by_the_interval(tmp_path, capsys):
    evaluated(tmp_path, "gen3", 9.0)   # separates almost perfectly: meets both claims
    evaluated(tmp_path, "gen2", 2.0, seed=1)
    h = gc.headline(tmp_path)
    for key, metric, target in (("tpr@fpr0.0001", "tpr@fpr", 1e-4), ("fpr@tpr0.85", "fpr@tpr", 0.85)):
        for model in ("gen3", "gen2"):
            df = pd.read_csv(tmp_path / f"{model}_stratified_fpr.csv")
            row = df[(df["stratum"] == "all") & (df["metric"] == metric) & np.isclose(df["target"], target)].iloc[0]
            got = h[key][model]
            assert (got["value"], got["ci_low"], got["ci_high"], got["n_neg"]) == \
                (row["value"], row["ci_low"], row["ci_high"], row["n_neg"])
        assert h[key]["matched_filter"] == row["mf_value"]
    assert h["tpr@fpr0.0001"]["gen3"]["ci_low"] > 0.85 and h["tpr@fpr0.0001"]["gen3_meets_claim"] is True
    assert h["fpr@tpr0.85"]["gen3"]["ci_high"] < 0.001 and h["fpr@tpr0.85"]["gen3_meets_claim"] is True
    assert h["tpr@fpr0.0001"]["gen2"]["value"] < 0.5  # N(2, 1) against N(0, 1) at FPR 1e-4 (z = 3.72): ~0.04

    assert gc.main(["--headline_of", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tpr@fpr0.0001" in out and "> 0.85 / 0.778" in out and "< 0.001 / 0.0017" in out

    evaluated(tmp_path, "gen3", 2.0, seed=2)  # a weak Gen3: the claim fails, decided by the interval
    assert gc.headline(tmp_path)["tpr@fpr0.0001"]["gen3_meets_claim"] is False


def test_headline_of_a_run_without_the_tables_or_targets_is_refused(tmp_path, capsys):
    assert gc.main(["--headline_of", str(tmp_path)]) == 2
    assert "no gen3_stratified_fpr.csv or gen2_stratified_fpr.csv" in capsys.readouterr().err
    evaluated(tmp_path, "gen3", 3.0)
    evaluated(tmp_path, "gen2", 3.0)
    df = pd.read_csv(tmp_path / "gen2_stratified_fpr.csv")
    df[df["metric"] != "fpr@tpr"].to_csv(tmp_path / "gen2_stratified_fpr.csv", index=False)
    assert gc.main(["--headline_of", str(tmp_path)]) == 2
    assert "has no 'all' row for fpr@tpr0.85" in capsys.readouterr().err
