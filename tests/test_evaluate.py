"""`dhs eval`: stratified table against scikit-learn, empty cells, CSV round trip, completeness, bad input."""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from darkhaloscope import cli
from darkhaloscope.evaluation import evaluate as ev
from darkhaloscope.evaluation import strata

THETA = "0.5,1.0,1.5,2.0,9.0"  # the last bin is empty of positives by construction
RES = "0.3,0.8,1.2,5.0"
TPR = "0.5,0.8,0.9"
FPR = "1e-3,1e-2,0.1"


def score_frame(n_pos=400, n_neg=3000, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.5, 2.0, n_pos)
    used = rng.uniform(0.9, 1.6, n_pos)
    used[::5] = np.nan  # falls back to psfsize_r
    psfsize = rng.uniform(0.9, 1.6, n_pos + n_neg)
    logit_pos = rng.normal(1.0, 1.0, n_pos) + theta
    logit_neg = rng.normal(0.0, 1.0, n_neg)
    logit = np.r_[logit_pos, logit_neg]
    if ties:
        logit = np.round(logit * 2) / 2  # heavy ties across classes
    return pd.DataFrame({
        "task_id": np.arange(n_pos + n_neg, dtype=np.int64),
        "is_control": np.r_[np.zeros(n_pos, np.int32), np.ones(n_neg, np.int32)],
        "theta_e_arcsec": np.r_[theta, np.full(n_neg, np.nan)],
        "psf_fwhm_used_r": np.r_[used, np.full(n_neg, np.nan)],
        "psfsize_r": psfsize,
        "logit": logit.astype(np.float32),
        "score": (1 / (1 + np.exp(-logit))).astype(np.float32),
    })


def write(df, path):
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def reference_rates(pos_logit, neg_logit, metric, target):
    """From sklearn's operating points, written independently of darkhaloscope.metrics."""
    y = np.r_[np.ones(pos_logit.size), np.zeros(neg_logit.size)]
    fpr, tpr, thr = roc_curve(y, np.r_[pos_logit, neg_logit].astype(np.float64), drop_intermediate=False)
    if metric == "tpr@fpr":
        ok = np.flatnonzero(fpr <= target)
        best = ok[np.argmax(tpr[ok])]
        return tpr[best], thr[best]
    ok = np.flatnonzero(tpr >= target)
    best = ok[np.argmin(fpr[ok])]
    return fpr[best], thr[best]


@pytest.mark.parametrize("ties", [True, False])
def test_stratified_table_matches_sklearn_per_stratum(ties):
    df = score_frame(ties=ties)
    loaded_df = df.assign(y=(df.is_control == 0).astype(np.int8), rank=df.logit.astype(np.float64))
    psf = np.where(np.isfinite(df.psf_fwhm_used_r), df.psf_fwhm_used_r, df.psfsize_r)
    loaded_df["theta_over_psf"] = df.theta_e_arcsec / psf
    theta_bins, res_bins = strata.parse_bins(THETA), strata.parse_bins(RES)
    table = ev.stratified_table(loaded_df, theta_bins, res_bins, strata.parse_targets(TPR), strata.parse_targets(FPR))
    pos, neg = df[df.is_control == 0], df[df.is_control == 1]
    ratio = pos.theta_e_arcsec / np.where(np.isfinite(pos.psf_fwhm_used_r), pos.psf_fwhm_used_r, pos.psfsize_r)
    assert (table["n_neg"] == len(neg)).all()  # controls are never binned
    checked = 0
    for _, row in table.iterrows():
        if row.stratum == "arc_snr":  # no arc_snr column here: empty strata (tests/test_detectability.py)
            assert row.n_pos == 0 and math.isnan(row.value)
            continue
        if row.stratum == "all":
            sel = np.ones(len(pos), bool)
        else:
            x = pos.theta_e_arcsec if row.stratum == "theta_e" else ratio
            sel = (x >= row.bin_lo) & (x < row.bin_hi)
        assert row.n_pos == sel.sum()
        if row.n_pos == 0:
            assert math.isnan(row.value) and math.isnan(row.threshold) and math.isnan(row.ci_low)
            continue
        value, thr = reference_rates(pos.logit[sel].to_numpy(), neg.logit.to_numpy(), row.metric, row.target)
        assert row.value == value and row.threshold == thr
        assert row.ci_low <= row.value <= row.ci_high
        checked += 1
    assert checked >= 30
    assert (table.loc[table.stratum == "theta_e"].groupby("bin_lo").n_pos.first().iloc[-1]) == 0


def test_cli_csv_round_trip_and_siblings(tmp_path):
    scores = write(score_frame(), tmp_path / "s.parquet")
    out = tmp_path / "gen3_stratified_fpr.csv"
    assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(out), "--theta_bins", THETA, "--res_bins", RES,
                     "--tpr_targets", TPR, "--fpr_targets", "1e-5,1e-4,1e-3,1e-2"]) == 0
    text = out.read_text()
    assert '"' not in text
    assert text.splitlines()[0] == ",".join(strata.TABLE_COLUMNS)
    back = pd.read_csv(out)
    assert back["stratum"].dtype.kind in "OT" or str(back["stratum"].dtype) in ("str", "string")
    assert back["n_pos"].dtype == np.int64 and back["n_neg"].dtype == np.int64
    for col in ("bin_lo", "bin_hi", "target", "value", "ci_low", "ci_high", "threshold"):
        assert back[col].dtype == np.float64, col
    assert len(back) == (1 + 4 + 3 + 6) * (4 + 3)  # all, theta_E, theta_E/PSF, arc_snr (empty here) strata
    # 3000 controls: fpr 1e-5 and 1e-4 cannot be estimated -> empty cells; 1e-3 can
    tpr = back[back.metric == "tpr@fpr"]
    assert tpr.loc[np.isclose(tpr.target, 1e-4), "value"].isna().all()
    assert tpr.loc[np.isclose(tpr.target, 1e-5), "value"].isna().all()
    assert tpr.loc[np.isclose(tpr.target, 1e-3) & (tpr.n_pos > 0), "value"].notna().all()
    assert ",,,," in text  # empty value/ci/threshold cells, not a made-up number
    auroc_path, comp_path = strata.table_paths(out)["auroc"], strata.table_paths(out)["completeness"]
    assert auroc_path.name == "gen3_stratified_fpr_auroc.csv" and comp_path.name == "gen3_stratified_fpr_completeness.csv"
    auroc = pd.read_csv(auroc_path)
    assert list(auroc.columns) == strata.AUROC_COLUMNS
    df = score_frame()
    y = (df.is_control == 0).astype(int)
    assert auroc.loc[auroc.stratum == "all", "auroc"].iloc[0] == pytest.approx(roc_auc_score(y, df.logit), abs=1e-12)
    comp = pd.read_csv(comp_path)
    assert list(comp.columns) == strata.COMPLETENESS_COLUMNS
    assert (comp["fpr_target"] == 1e-3).all()  # 1e-4 not estimable with 3000 controls: lowest estimable


def test_min_neg_per_fpr_empties_targets():
    frame = score_frame(n_neg=3000).assign(y=lambda d: (d.is_control == 0).astype(np.int8),
                                           rank=lambda d: d.logit.astype(np.float64), theta_over_psf=np.nan)
    t = ev.stratified_table(frame, strata.parse_bins(THETA), strata.parse_bins(RES), [0.9], [1e-3, 1e-2],
                            min_neg_per_fpr=10)
    allrows = t[(t.stratum == "all") & (t.metric == "tpr@fpr")]
    assert math.isnan(allrows.value.iloc[0]) and not math.isnan(allrows.value.iloc[1])


def test_completeness_recall_matches_direct_count(tmp_path):
    df = score_frame(n_pos=600, n_neg=20000, seed=3, ties=False)
    frame = strata.load_scores(write(df, tmp_path / "s.parquet"))
    theta_bins, res_bins = strata.parse_bins(THETA), strata.parse_bins(RES)
    comp = ev.completeness_table(frame, theta_bins, res_bins, strata.OperatingPoint.of(frame, [1e-4, 1e-3]))
    assert (comp.fpr_target == 1e-4).all()
    pos, neg = df[df.is_control == 0], df[df.is_control == 1]
    _, thr = reference_rates(pos.logit.to_numpy(), neg.logit.to_numpy(), "tpr@fpr", 1e-4)
    assert (neg.logit >= thr).sum() <= 2  # the global cut admits at most 1e-4 x 20000 controls
    ratio = pos.theta_e_arcsec / np.where(np.isfinite(pos.psf_fwhm_used_r), pos.psf_fwhm_used_r, pos.psfsize_r)
    for _, row in comp.iterrows():
        sel = ((pos.theta_e_arcsec >= row.theta_lo) & (pos.theta_e_arcsec < row.theta_hi)
               & (ratio >= row.res_lo) & (ratio < row.res_hi))
        assert row.n_pos == sel.sum()
        if sel.sum():
            assert row.n_recovered == (pos.logit[sel] >= thr).sum()
            assert row.recall == pytest.approx((pos.logit[sel] >= thr).mean(), abs=0)
        else:
            assert pd.isna(row.recall)


def test_score_fallback_without_logit(tmp_path):
    df = score_frame(ties=False).drop(columns=["logit"])
    frame = strata.load_scores(write(df, tmp_path / "s.parquet"))
    assert (frame["rank"] == df["score"].astype(np.float64)).all()


def test_bad_inputs(tmp_path, capsys):
    good = score_frame(n_pos=50, n_neg=200)
    paths = {
        "no_ctrl": write(good.drop(columns=["is_control"]), tmp_path / "a.parquet"),
        "no_logit": write(good.drop(columns=["logit", "score"]), tmp_path / "b.parquet"),
        "empty": write(good.iloc[:0], tmp_path / "c.parquet"),
        "ok": write(good, tmp_path / "d.parquet"),
    }
    out = tmp_path / "t.csv"
    cases = [(["--scores", str(paths["no_ctrl"])], "is_control"),
             (["--scores", str(paths["no_logit"])], "logit"),
             (["--scores", str(paths["empty"])], "no rows"),
             (["--scores", str(tmp_path / "nope.parquet")], "does not exist"),
             (["--scores", str(paths["ok"]), "--theta_bins", "0.5,1.0,0.9"], "--theta_bins"),
             (["--scores", str(paths["ok"]), "--res_bins", "1.0"], "--res_bins"),
             (["--scores", str(paths["ok"]), "--res_bins", "a,b"], "--res_bins"),
             (["--scores", str(paths["ok"]), "--tpr_targets", "0.8,1.0"], "--tpr_targets"),
             (["--scores", str(paths["ok"]), "--fpr_targets", "0,1e-4"], "--fpr_targets")]
    for extra, word in cases:
        assert cli.main(["eval", *extra, "--out_csv", str(out)]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("dhs eval: error:") and word in err, err
        assert not out.exists() and not list(tmp_path.glob("t_*.csv"))


def test_values_on_bin_edges_fall_in_half_open_bins(tmp_path):
    """Bins are [lo, hi) as documented: a theta_E or theta_E/PSF exactly on an inner edge belongs to the
    bin above it, one on the lowest edge is in the first bin, one on the top edge is in no bin. The
    expected counts are written out by hand from the values below."""
    theta = np.array([0.5, 1.0, 1.0, 1.5, 2.0, 9.0, 0.7, 1.2, 6.25, 0.375])
    # PSF 1.25": theta/PSF = 0.4, 0.8, 0.8, 1.2, 1.6, 7.2, 0.56, 0.96, 5.0, 0.3 (each edge value exact)
    assert (theta / 1.25)[[1, 3, 8, 9]].tolist() == [0.8, 1.2, 5.0, 0.3]
    n_neg = 50
    df = pd.DataFrame({
        "task_id": np.arange(theta.size + n_neg, dtype=np.int64),
        "is_control": np.r_[np.zeros(theta.size, np.int32), np.ones(n_neg, np.int32)],
        "theta_e_arcsec": np.r_[theta, np.full(n_neg, np.nan)],
        "psf_fwhm_used_r": np.r_[np.full(theta.size, 1.25), np.full(n_neg, np.nan)],
        "psfsize_r": np.full(theta.size + n_neg, 1.1),
        "logit": np.r_[np.linspace(1, 3, theta.size), np.linspace(-3, 1.5, n_neg)].astype(np.float32),
    })
    frame = strata.load_scores(write(df, tmp_path / "s.parquet"))
    theta_bins, res_bins = strata.parse_bins(THETA), strata.parse_bins(RES)  # 0.5,1,1.5,2,9 and 0.3,0.8,1.2,5
    assert strata.bin_index(theta, theta_bins).tolist() == [0, 1, 1, 2, 3, -1, 0, 1, 3, -1]
    table = ev.stratified_table(frame, theta_bins, res_bins, [0.5], [0.1])
    per_bin = lambda name: table[(table.stratum == name) & (table.metric == "tpr@fpr")].n_pos.tolist()  # noqa: E731
    assert per_bin("theta_e") == [2, 3, 1, 2]
    assert per_bin("theta_e_over_psf") == [3, 3, 2]
    assert per_bin("all") == [10]
    comp = ev.completeness_table(frame, theta_bins, res_bins, strata.OperatingPoint.of(frame, [0.1]))
    cells = {(r.theta_lo, r.res_lo): r.n_pos for r in comp.itertuples() if r.n_pos}
    assert cells == {(0.5, 0.3): 2, (1.0, 0.8): 3, (1.5, 1.2): 1, (2.0, 1.2): 1}
    auroc = ev.auroc_table(frame, theta_bins, res_bins)
    assert auroc[auroc.stratum == "theta_e"].n_pos.tolist() == [2, 3, 1, 2]
