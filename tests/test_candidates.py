"""`dhs candidates`: the top-N real-sky scores de-duplicated by position, matched to known lenses, written as a
CSV to grade and a gallery that Chromium renders; grades read back as counts and purity per rank."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from darkhaloscope.cli import main
from darkhaloscope.metrics import wilson_interval
from chromium import needs_chromium, probe, screenshot
from fake_cutouts import FakeCutoutService, simulated_sky
from test_infer import make_checkpoint


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """30 simulated hosts and lenses fetched from the fake service, one object listed twice, scored in 2 views."""
    root = tmp_path_factory.mktemp("candidates")
    cat, images, rows, _ = simulated_sky(30, seed=11, control_frac=0.5)
    dup = cat.slice(4, 1)  # the same object again, e.g. from an overlapping sweep file
    dup = dup.set_column(0, "objid", pa.array(["obj_dup"]))
    cat = pa.concat_tables([cat, dup])
    pq.write_table(cat, root / "parent.parquet")
    with FakeCutoutService(images) as svc:
        assert main(["cutouts", "--catalog", str(root / "parent.parquet"), "--out_dir", str(root / "hosts"),
                     "--base_url", svc.base_url, "--id_column", "objid", "--no_progress", "--timeout", "5"]) == 0
    ckpt = make_checkpoint(root / "best.pt")
    scores = root / "scores.parquet"
    assert main(["infer", "--data", str(root / "hosts"), "--ckpt", str(ckpt), "--out", str(scores), "--split", "all",
                 "--tta", "2"]) == 0
    return root, cat, scores


def _run(root, scores, tmp_path, *extra):
    out_csv, out_html = tmp_path / "candidates.csv", tmp_path / "candidates.html"
    rc = main(["candidates", "--scores", str(scores), "--data", str(root / "hosts"), "--out_csv", str(out_csv),
               "--out_html", str(out_html), *extra])
    return rc, out_csv, out_html


def _sep_arcsec(ra1, dec1, ra2, dec2):
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(h))) * 3600


def test_top_n_unique_positions_known_lens_and_viewer_link(sky, tmp_path):
    root, cat, scores = sky
    s = pq.read_table(scores).to_pandas()
    assert len(s) == 31 and s["region_split"].nunique() >= 2  # every split scored into one file
    best = s.sort_values(["logit", "task_id"], ascending=[False, True]).iloc[2]
    known = tmp_path / "known.csv"
    pd.DataFrame({"name": ["J-test"], "RA [deg]": [best["ra"] + 1.0 / 3600], "DEC [deg]": [best["dec"]],
                  "grading": ["confident"]}).to_csv(known, index=False)
    rc, out_csv, out_html = _run(root, scores, tmp_path, "--top_n", "12", "--known_lenses", str(known))
    assert rc == 0
    c = pd.read_csv(out_csv, keep_default_na=False)
    assert list(c["rank"]) == list(range(1, 13))
    assert (np.diff(c["logit"].to_numpy(float)) <= 0).all()
    # independent de-duplication: walk the logit order, drop anything within 3" of a kept row
    order = s.sort_values(["logit", "task_id"], ascending=[False, True])
    kept = []
    for r in order.itertuples():
        if all(_sep_arcsec(r.ra, r.dec, k.ra, k.dec) > 3.0 for k in kept):
            kept.append(r)
    assert list(c["task_id"]) == [k.task_id for k in kept[:12]]
    # all of them: 31 rows, one object twice -> 30 candidates, the kept one counts its duplicate
    rc, all_csv, _ = _run(root, scores, tmp_path / "all" if (tmp_path / "all").mkdir() is None else None,
                          "--top_n", "100", "--no_known_lenses")
    every = pd.read_csv(all_csv, keep_default_na=False)
    assert rc == 0 and len(every) == 30
    pair = every[every["task_id"].isin(["obj00004", "obj_dup"])]
    assert len(pair) == 1 and int(pair["n_duplicates"].iloc[0]) == 1 and every["n_duplicates"].sum() == 1
    hit = c[c["known_lens"] != ""]
    assert list(hit["task_id"]) == [best["task_id"]] and hit["known_lens_grading"].iloc[0] == "confident"
    assert float(hit["known_lens_sep_arcsec"].iloc[0]) == pytest.approx(
        _sep_arcsec(best["ra"], best["dec"], best["ra"] + 1 / 3600, best["dec"]), abs=1e-3)
    r0 = c.iloc[0]
    assert r0["viewer_url"] == (f"https://www.legacysurvey.org/viewer?ra={r0['ra']:.6f}&dec={r0['dec']:.6f}"
                                "&layer=ls-dr10&zoom=16")
    assert (c["grade"] == "").all()
    for col in ("psfsize_g", "psfsize_r", "psfsize_z", "psfdepth_g", "psfdepth_r", "psfdepth_z"):
        assert col in c.columns and np.isfinite(c[col].to_numpy(float)).all()
    page = out_html.read_text()
    assert len(re.findall(r'class="card[ "]', page)) == 12 and page.count('class="card known"') == 1
    assert "J-test" in page and "make_lupton_rgb" in page and r0["viewer_url"].replace("&", "&amp;") in page


def test_grades_counts_and_purity_per_rank(sky, tmp_path, capsys):
    root, cat, scores = sky
    rc, out_csv, _ = _run(root, scores, tmp_path, "--top_n", "6", "--no_known_lenses")
    assert rc == 0
    c = pd.read_csv(out_csv, keep_default_na=False)
    c["grade"] = ["A", "C", "", "B", "C", "A"]
    graded = tmp_path / "graded.csv"
    c.to_csv(graded, index=False)
    purity = tmp_path / "purity.csv"
    assert main(["candidates", "--grades", str(graded), "--purity_csv", str(purity)]) == 0
    out = capsys.readouterr().out
    assert "grades: A 2, B 1, C 2, ungraded 1" in out
    p = pd.read_csv(purity)
    # graded so far: 1,2,2,3,4,5; positive (A/B) so far: 1,1,1,2,2,3
    assert list(p["n_graded"]) == [1, 2, 2, 3, 4, 5] and list(p["n_positive"]) == [1, 1, 1, 2, 2, 3]
    assert p["purity"].to_numpy() == pytest.approx([1, 0.5, 0.5, 2 / 3, 0.5, 0.6])
    assert (p["ci_low"].iloc[-1], p["ci_high"].iloc[-1]) == pytest.approx(wilson_interval(3, 5))


def test_bad_input(sky, tmp_path, capsys):
    root, cat, scores = sky
    assert main(["candidates", "--scores", str(scores)]) == 2
    assert "--data, --out_csv required" in capsys.readouterr().err
    bad = tmp_path / "g.csv"
    pd.DataFrame({"rank": [1], "score": [0.5]}).to_csv(bad, index=False)
    assert main(["candidates", "--grades", str(bad)]) == 2
    assert "lacks column(s) grade" in capsys.readouterr().err
    other = tmp_path / "other.parquet"
    t = pq.read_table(scores)
    pq.write_table(t.set_column(0, "task_id", pa.array([f"x{i}" for i in range(t.num_rows)])), other)
    rc, out_csv, out_html = _run(root, other, tmp_path, "--no_known_lenses")
    assert rc == 2 and "not in --data" in capsys.readouterr().err
    assert not out_csv.exists() and not out_html.exists()


@pytest.mark.browser
@needs_chromium
def test_gallery_renders_in_headless_chromium(sky, tmp_path):
    root, cat, scores = sky
    rc, _, out_html = _run(root, scores, tmp_path, "--top_n", "8", "--no_known_lenses")
    assert rc == 0
    found = probe(out_html, "var r=[];for(const i of document.images){r.push(i.closest('.card').dataset.rank+':'"
                  "+i.dataset.kind+':'+i.naturalWidth+'x'+i.naturalHeight+':'+i.complete+':'+i.width)}"
                  "return r.join(';');", tmp_path)
    items = [x.split(":") for x in found.split(";")]
    assert len(items) == 8 * 4  # composite + g, r, z per candidate
    assert sorted({int(i[0]) for i in items}) == list(range(1, 9))
    for rank, kind, size, complete, width in items:
        assert size == "64x64" and complete == "true" and int(width) == 128, (rank, kind, size, width)
    shot = tmp_path / "shot.png"
    screenshot(out_html, shot, tmp_path, "1200,2000")
    assert shot.stat().st_size > 10_000
