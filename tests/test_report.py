"""`dhs report`: every section and figure is present, missing inputs are said, and Chromium renders it."""

import base64
import io
import json
import re

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from darkhaloscope import cli
from darkhaloscope.evaluation import strata
from chromium import needs_chromium, probe, screenshot

FIGURES = ["roc", "tpr-vs-theta", "tpr-vs-res", "tpr-vs-snr", "completeness", "completeness-snr", "training", "gallery-top-controls",
           "gallery-hard-negatives", "gallery-missed-positives"]


@pytest.fixture(scope="module")
def inputs(fake_phase4c, tmp_path_factory):
    """Score files of two 'models' on the fake test split (built directly: no network needed), a
    hard-negative file mined from train-split scores, and two history.json files."""
    d = tmp_path_factory.mktemp("report")
    cols = ["task_id", "ra", "dec", "is_control", "theta_e_arcsec", "psf_fwhm_used_r", "psfsize_r", "arc_snr",
            "region_split"]
    table = pads.dataset(fake_phase4c, partitioning="hive").to_table(columns=cols).to_pandas()
    rng = np.random.default_rng(0)
    paths = {}
    for name, sep in (("gen3", 2.0), ("gen2", 1.0)):
        df = table.copy()
        pos = (df.is_control == 0).to_numpy()
        df["logit"] = (rng.normal(size=len(df)) + sep * pos * np.nan_to_num(df.theta_e_arcsec)).astype(np.float32)
        df["score"] = (1 / (1 + np.exp(-df.logit.astype(np.float64)))).astype(np.float32)
        df[df.region_split == "train"].to_parquet(d / f"{name}_train.parquet")
        df[df.region_split == "test"].to_parquet(d / f"{name}_test.parquet")
        paths[name] = d / f"{name}_test.parquet"
    paths["hard_negs"] = d / "hard_negs.parquet"
    assert cli.main(["mine", "--scores", str(d / "gen3_train.parquet"), "--out", str(paths["hard_negs"]),
                     "--topk", "12", "--min_score", "0.5", "--exclude_radius_arcsec", "0"]) == 0
    assert pq.read_metadata(paths["hard_negs"]).num_rows == 12
    for stage in ("A1", "A2"):
        epochs = [{"epoch": e, "train_loss": 0.5 / e, "lr": 1e-4,
                   "val_all": {"auroc": 0.9 + 0.01 * e, "tpr@fpr0.001": 0.2 * e, "tpr@fpr0.0001": None},
                   "val_cut": {"auroc": 0.95}} for e in (1, 2, 3)]
        paths[stage] = d / f"{stage}.json"
        paths[stage].write_text(json.dumps({"epochs": epochs, "best": {"epoch": 3}}))
    for name in ("gen3", "gen2"):  # what `dhs eval` writes for each model: the report draws these tables
        paths[f"{name}_tables"] = d / f"{name}_stratified_fpr.csv"
        assert cli.main(["eval", "--scores", str(paths[name]), "--out_csv", str(paths[f"{name}_tables"]),
                         "--fpr_targets", "1e-3,1e-2,0.05"]) == 0  # 65 test controls: 0.05 is the estimable one
    paths["dir"] = d
    paths["data"] = fake_phase4c
    return paths


def _figures(page):
    return dict(re.findall(r'data-figure="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page))


def _models(inputs, *labels):
    """--scores and --tables (dhs eval's --out_csv) of each model."""
    return [a for m in labels for a in ("--scores", f"{m}={inputs[m]}", "--tables", f"{m}={inputs[m + '_tables']}")]


def _full_report(inputs, out):
    return cli.main(["report", *_models(inputs, "gen3", "gen2"),
                     "--history", f"A1={inputs['A1']}", "--history", f"A2={inputs['A2']}",
                     "--hard_negs", str(inputs["hard_negs"]), "--data", str(inputs["data"]), "--out", str(out),
                     "--gallery_n", "8"])


def test_every_section_and_figure_is_present(inputs, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "report.html"
    assert _full_report(inputs, out) == 0
    page = out.read_text()
    for sid in ("summary", "roc", "stratified", "completeness", "training", "galleries"):
        assert f'<section id="{sid}">' in page
    figures = _figures(page)
    assert sorted(figures) == sorted(FIGURES)
    for name, data in figures.items():
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.01, name
    assert 'class="missing"' not in page
    # self-contained: no external resource of any kind
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page
    assert "gen2" in page and "gen3" in page


def test_missing_optional_inputs_are_said_not_crashed(inputs, tmp_path):
    out = tmp_path / "report.html"
    assert cli.main(["report", *_models(inputs, "gen3"), "--history", f"A1={tmp_path / 'none.json'}",
                     "--out", str(out)]) == 0
    page = out.read_text()
    figures = _figures(page)
    assert {"roc", "tpr-vs-theta", "tpr-vs-res", "completeness"} <= set(figures)
    assert not any(name.startswith("gallery") for name in figures) and "training" not in figures
    missing = re.findall(r'<p class="missing">([^<]+)</p>', page)
    assert any("none.json" in m for m in missing)
    assert any("no --hard_negs given" in m for m in missing)
    assert any("no --data given" in m for m in missing)


def test_bad_inputs_are_one_line_errors_and_write_nothing(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    tables = f"gen3={inputs['gen3_tables']}"
    cases = [(["--scores", f"gen3={tmp_path / 'nope.parquet'}", "--tables", tables], "does not exist"),
             (["--scores", f"a={inputs['gen3']}", "--scores", f"a={inputs['gen2']}", "--tables", tables],
              "repeats a label"),
             (["--scores", f"gen3={inputs['gen3']}", "--tables", f"gen2={inputs['gen2_tables']}"],
              "must be the --scores labels"),
             (["--scores", f"gen3={inputs['gen3']}", "--tables", f"gen3={tmp_path / 'none.csv'}"], "does not exist")]
    for argv, message in cases:
        assert cli.main(["report", *argv, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    # a table that is not dhs eval's, and a history.json of another shape
    foreign = tmp_path / "foreign.csv"
    for path in strata.table_paths(foreign).values():
        path.write_text("a,b\n1,2\n")
    assert cli.main(["report", "--scores", f"gen3={inputs['gen3']}", "--tables", f"gen3={foreign}", "--out", str(out)]) == 2
    assert "is not a table from dhs eval" in capsys.readouterr().err
    old = tmp_path / "history.json"
    old.write_text("[]")
    assert cli.main(["report", *_models(inputs, "gen3"), "--history", f"A1={old}", "--out", str(out)]) == 2
    assert "not a history.json of dhs train" in capsys.readouterr().err
    assert not out.exists()


def test_report_reads_the_operating_point_and_tables_dhs_eval_wrote(inputs, tmp_path):
    """The report draws dhs eval's tables, not its own: a changed table value shows on the page, and the
    operating point is the completeness table's (fpr_target, threshold)."""
    src = strata.read_tables(inputs["gen3_tables"])
    op = strata.OperatingPoint.read(src["completeness"], "t")
    assert op.fpr == 0.05 == strata.completeness_target(int(src["table"].n_neg.iloc[0]), [1e-3, 1e-2, 0.05])
    # the threshold is read back exactly as dhs eval computed it
    frame = strata.load_scores(inputs["gen3"])
    assert op == strata.OperatingPoint.of(frame, [1e-3, 1e-2, 0.05])
    edited = tmp_path / "gen3_stratified_fpr.csv"
    for key, path in strata.table_paths(inputs["gen3_tables"]).items():
        edited.with_name(path.name).write_bytes(path.read_bytes())
    table = src["table"].copy()
    table.loc[(table.stratum == "all") & (table.metric == "fpr@tpr") & (table.target == 0.8), "value"] = 0.123456
    table.to_csv(edited, index=False, na_rep="")
    out = tmp_path / "r.html"
    assert cli.main(["report", "--scores", f"gen3={inputs['gen3']}", "--tables", f"gen3={edited}", "--out", str(out)]) == 0
    page = out.read_text()
    assert "0.1235" in page and f"fpr {op.fpr:g}" in page


@pytest.mark.browser
@needs_chromium
def test_report_renders_in_headless_chromium(inputs, tmp_path):
    out = tmp_path / "report.html"
    assert _full_report(inputs, out) == 0
    # every image's decoded size once the page has loaded
    found = probe(out, "var r=[];for(const i of document.images)"
                  "{r.push(i.dataset.figure+':'+i.naturalWidth+'x'+i.naturalHeight+':'+i.complete)}return r.join(';');",
                  tmp_path)
    rendered = {}
    for item in found.split(";"):
        name, size, complete = item.split(":")
        w, h = map(int, size.split("x"))
        rendered[name] = (w, h, complete)
    assert sorted(rendered) == sorted(FIGURES)
    for name, (w, h, complete) in rendered.items():
        assert w > 100 and h > 100 and complete == "true", (name, w, h)
    # and a screenshot of the page is produced
    shot = tmp_path / "shot.png"
    screenshot(out, shot, tmp_path)
    assert shot.stat().st_size > 10_000
