"""The arc_snr strata, the (theta_E/PSF x arc_snr) completeness and the matched-filter reference of `dhs eval`:
against scikit-learn, a direct count and a Monte Carlo of the ideal detector."""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from darkhaloscope import cli
from darkhaloscope.evaluation import evaluate as ev
from darkhaloscope.evaluation import strata
from darkhaloscope.errors import DHSError

SNR = "0,3,5,10,20,50,inf"


def frame(n_pos=1500, n_neg=20000, seed=0, with_snr=True):
    """Positives scored like the ideal detector N(arc_snr, 1) times a finder's efficiency, controls N(0, 1)."""
    rng = np.random.default_rng(seed)
    snr = rng.lognormal(2.0, 1.2, n_pos)
    theta = rng.uniform(0.5, 2.5, n_pos)
    psf = rng.uniform(0.9, 1.6, n_pos + n_neg)
    logit = np.r_[rng.normal(0.6 * snr, 1.0), rng.normal(0.0, 1.0, n_neg)]
    df = pd.DataFrame({
        "task_id": np.arange(n_pos + n_neg, dtype=np.int64),
        "is_control": np.r_[np.zeros(n_pos, np.int32), np.ones(n_neg, np.int32)],
        "theta_e_arcsec": np.r_[theta, np.full(n_neg, np.nan)],
        "psfsize_r": psf,
        "logit": logit.astype(np.float32),
    })
    if with_snr:
        df["arc_snr"] = np.r_[snr, np.full(n_neg, np.nan)]
    return df


def loaded(df, tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return strata.load_scores(path)


def test_parse_bins_open_top():
    assert strata.parse_bins(SNR, open_top=True)[-1] == math.inf
    assert list(strata.parse_bins([0, 3, math.inf], open_top=True)) == [0, 3, math.inf]
    for bad in ("0,inf,5", "5,3,inf", "inf"):
        with pytest.raises(DHSError):
            strata.parse_bins(bad, "--snr_bins", open_top=True)
    with pytest.raises(DHSError):
        strata.parse_bins("0.5,1,inf", "--theta_bins")  # only where an open top bin is allowed


def test_snr_strata_match_sklearn(tmp_path):
    df = frame()
    data = loaded(df, tmp_path)
    edges = strata.parse_bins(SNR, open_top=True)
    table = ev.stratified_table(data, strata.parse_bins("0.5,2.5"), strata.parse_bins("0.3,3"), [0.9], [1e-3, 1e-2],
                                snr_bins=edges)
    auroc = ev.auroc_table(data, strata.parse_bins("0.5,2.5"), strata.parse_bins("0.3,3"), edges)
    pos, neg = df[df.is_control == 0], df[df.is_control == 1].logit.to_numpy()
    rows = table[table.stratum == "arc_snr"]
    assert sorted(set(rows.bin_lo)) == list(edges[:-1]) and rows.bin_hi.max() == math.inf
    for _, row in rows[rows.metric == "tpr@fpr"].iterrows():
        sel = (pos.arc_snr >= row.bin_lo) & (pos.arc_snr < row.bin_hi)
        assert row.n_pos == sel.sum() > 0
        p = pos.logit[sel].to_numpy()
        y = np.r_[np.ones(p.size), np.zeros(neg.size)]
        fpr, tpr, _ = roc_curve(y, np.r_[p, neg].astype(np.float64), drop_intermediate=False)
        assert row.value == tpr[fpr <= row.target].max()
        assert row.mf_value == pytest.approx(norm.sf(norm.isf(row.target) - pos.arc_snr[sel]).mean(), rel=1e-12)
        a = auroc[(auroc.stratum == "arc_snr") & (auroc.bin_lo == row.bin_lo)].iloc[0]
        assert a.auroc == pytest.approx(roc_auc_score(y, np.r_[p, neg]), abs=1e-12)
    assert rows.n_pos.groupby(rows.bin_lo).first().sum() == len(pos)  # every positive in one open-topped bin


def test_matched_filter_reference_against_monte_carlo():
    """The analytic reference equals a simulated ideal detector: lenses N(arc_snr, 1), controls N(0, 1)."""
    rng = np.random.default_rng(1)
    snr = rng.lognormal(1.5, 1.0, 300)
    reps = 400  # each positive drawn `reps` times: 120k lens scores
    lens = rng.normal(np.repeat(snr, reps), 1.0)
    ctrl = rng.normal(0.0, 1.0, 2_000_000)
    y = np.r_[np.ones(lens.size), np.zeros(ctrl.size)]
    sub = rng.choice(ctrl.size, 40000, replace=False)  # sklearn's AUROC on a subsample of controls
    mc_auc = roc_auc_score(np.r_[np.ones(lens.size), np.zeros(sub.size)], np.r_[lens, ctrl[sub]])
    assert ev.mf_auroc(snr) == pytest.approx(mc_auc, abs=0.004)
    for fpr in (1e-2, 1e-3, 1e-4):
        cut = np.quantile(ctrl, 1 - fpr)
        mc = (lens >= cut).mean()
        assert ev.mf_tpr_at_fpr(snr, fpr) == pytest.approx(mc, abs=0.006), fpr
    for tpr in (0.5, 0.8):
        cut = np.quantile(lens, 1 - tpr)
        mc = (ctrl >= cut).mean()
        assert ev.mf_fpr_at_tpr(snr, tpr) == pytest.approx(mc, rel=0.05, abs=2e-5), tpr
    # limits: unresolvable arcs are found at the FPR, bright ones always; a missing S/N is not guessed
    assert ev.mf_tpr_at_fpr(np.zeros(5), 1e-2) == pytest.approx(1e-2)
    assert ev.mf_tpr_at_fpr(np.full(5, 40.0), 1e-5) == pytest.approx(1.0)
    assert ev.mf_auroc(np.zeros(3)) == pytest.approx(0.5)
    assert math.isnan(ev.mf_auroc([3.0, np.nan])) and math.isnan(ev.mf_tpr_at_fpr([], 1e-2))


def test_completeness_snr_matches_direct_count(tmp_path):
    df = frame(seed=2)
    data = loaded(df, tmp_path)
    res, snr = strata.parse_bins("0.3,0.8,1.2,5"), strata.parse_bins(SNR, open_top=True)
    comp = ev.completeness_snr_table(data, res, snr, strata.OperatingPoint.of(data, [1e-4, 1e-3]))
    assert list(comp.columns) == strata.COMPLETENESS_SNR_COLUMNS and len(comp) == 3 * 6
    assert (comp.fpr_target == 1e-4).all()
    pos = data[data.y == 1]
    thr = comp.threshold.iloc[0]
    assert (data.loc[data.y == 0, "rank"] >= thr).sum() <= 2
    for _, row in comp.iterrows():
        sel = ((pos.theta_over_psf >= row.res_lo) & (pos.theta_over_psf < row.res_hi)
               & (pos.arc_snr >= row.snr_lo) & (pos.arc_snr < row.snr_hi))
        assert row.n_pos == sel.sum()
        if sel.sum():
            assert row.n_recovered == (pos["rank"][sel] >= thr).sum()
            assert row.mf_recall == pytest.approx(norm.sf(norm.isf(1e-4) - pos.arc_snr[sel]).mean(), rel=1e-12)
            assert row.ci_low <= row.recall <= row.ci_high


def test_real_data_without_arc_snr_leaves_snr_cells_empty(tmp_path):
    scores = tmp_path / "real.parquet"
    pq.write_table(pa.Table.from_pandas(frame(with_snr=False), preserve_index=False), scores)
    out = tmp_path / "gen3_stratified_fpr.csv"
    assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(out), "--snr_bins", SNR]) == 0
    table = pd.read_csv(out)
    snr_rows = table[table.stratum == "arc_snr"]
    assert len(snr_rows) == 6 * 8 and (snr_rows.n_pos == 0).all() and snr_rows.value.isna().all()
    assert table.mf_value.isna().all()  # no reference without arc_snr, not a made-up one
    assert table.loc[(table.stratum == "all") & (table.metric == "tpr@fpr"), "value"].notna().any()
    auroc = pd.read_csv(strata.table_paths(out)["auroc"])
    assert auroc.mf_auroc.isna().all() and auroc.loc[auroc.stratum == "arc_snr", "auroc"].isna().all()
    comp = pd.read_csv(strata.table_paths(out)["completeness_snr"])
    assert (comp.n_pos == 0).all() and comp.recall.isna().all() and comp.mf_recall.isna().all()


def test_cli_writes_snr_outputs_and_rejects_bad_bins(tmp_path, capsys):
    scores = tmp_path / "s.parquet"
    pq.write_table(pa.Table.from_pandas(frame(n_neg=20000), preserve_index=False), scores)
    out = tmp_path / "t.csv"
    assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(out), "--fpr_targets", "1e-4,1e-2"]) == 0
    table = pd.read_csv(out)
    row = table[(table.stratum == "all") & (table.metric == "tpr@fpr") & (table.target == 1e-4)].iloc[0]
    assert row.n_neg == 20000 and 0 < row.value < 1 and row.ci_low < row.value < row.ci_high  # 1e-4 estimable
    assert row.mf_value > row.value  # this finder has 0.6 of the ideal S/N
    assert strata.table_paths(out)["completeness_snr"].exists()
    out.unlink()
    for path in list(strata.table_paths(out).values())[1:]:
        path.unlink()
    assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(out), "--snr_bins", "0,inf,3"]) == 2
    assert "--snr_bins" in capsys.readouterr().err
    assert not out.exists() and not strata.table_paths(out)["completeness_snr"].exists()


def test_report_shows_snr_figures_or_says_why_not(tmp_path):
    with_snr, without = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pandas(frame(n_neg=3000), preserve_index=False), with_snr)
    pq.write_table(pa.Table.from_pandas(frame(n_neg=3000, with_snr=False), preserve_index=False), without)
    for scores, expect_figures in ((with_snr, True), (without, False)):
        out, tables = tmp_path / "r.html", tmp_path / f"{scores.stem}_stratified_fpr.csv"
        assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(tables)]) == 0
        assert cli.main(["report", "--scores", f"gen3={scores}", "--tables", f"gen3={tables}", "--out", str(out)]) == 0
        page = out.read_text()
        assert ('data-figure="tpr-vs-snr"' in page) == expect_figures
        assert ('data-figure="completeness-snr"' in page) == expect_figures
        assert ("no positive has an arc_snr" in page) != expect_figures
