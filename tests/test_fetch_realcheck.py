"""scripts/fetch_realcheck.py: pinned sources read from a git repository (blob checked), LRG controls selected
and fetched from a local fake cutout service, candidates resampled to the contract's centre."""

from __future__ import annotations

import importlib.util
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from darkhaloscope.stamps.contract import decode_stamp
from fake_cutouts import FakeCutoutService, key_of
from test_realcheck import _point_source
from workflow_helpers import REPO

spec = importlib.util.spec_from_file_location("fetch_realcheck", REPO / "scripts" / "fetch_realcheck.py")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def _git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def sources(tmp_path):
    repo = tmp_path / "upstream"
    repo.mkdir()
    _git(repo, "init", "-q")
    rows = [("DEV", 19.0, 10.0), ("SER", 19.2, 10.1), ("REX", 18.0, 10.2), ("DEV", 20.1, 10.3), ("SER", 18.5, 10.4),
            ("DEV", 18.9, 10.5), ("SER", 19.5, 10.6), ("DEV", 19.1, 10.7), ("DEV", 18.2, 10.8)]
    cat = pd.DataFrame({"RA": [r[2] for r in rows], "DEC": [-5.0] * len(rows), "TYPE": [r[0] for r in rows],
                        "z_mag": [r[1] for r in rows]})
    cat.to_csv(repo / "lrg.csv", index=False)
    cube = _point_source(101, 0.262).transpose(1, 2, 0).astype(np.float32)
    np.savez(repo / "cand.npz", cutout=cube, meta_ra=np.float64(3.0), meta_dec=np.float64(1.0),
             meta_galaxy_id=np.str_("cand1"), meta_pixel_scale=np.float64(0.262))
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data")
    commit = _git(repo, "rev-parse", "HEAD")
    lines = ["kind,repo,commit,path,blob_sha1,format,units,pixscale,how_known"]
    for kind, path, fmt in (("control", "lrg.csv", "lrg_catalog_csv"), ("candidate", "cand.npz", "npz_hwc_meta")):
        blob = _git(repo, "rev-parse", f"HEAD:{path}")
        lines.append(f"{kind},o/up,{commit},{path},{blob},{fmt},nanomaggy,0.262,test")
    src = tmp_path / "sources.csv"
    src.write_text("\n".join(lines) + "\n")
    known = tmp_path / "known.csv"
    pd.DataFrame({"ra": [10.8 + 1 / 3600], "dec": [-5.0]}).to_csv(known, index=False)  # 1" from the last row
    rng = np.random.default_rng(0)
    images = {key_of(ra, -5.0): rng.normal(0, 0.01, (3, 64, 64)).astype(np.float32) for ra in cat["RA"]}
    return tmp_path, repo, src, known, images


def _main(tmp_path, repo, src, known, svc, *extra):
    return fetch.main(["--out", str(tmp_path / "check"), "--sources", str(src), "--git_dir", f"o/up={repo}",
                       "--base_url", svc.base_url, "--cache_dir", str(tmp_path / "cache"), "--known_lenses",
                       str(known), *extra])


def test_controls_selected_fetched_and_candidates_centred(sources, capsys):
    tmp_path, repo, src, known, images = sources
    with FakeCutoutService(images) as svc:
        assert _main(tmp_path, repo, src, known, svc, "--n_controls", "4") == 0
    t = pq.read_table(tmp_path / "check" / "region_split=test" / "part-00000.parquet").to_pandas()
    ctl = t[t.is_control == 1]
    # eligible: DEV/SER brighter than z 19.7 and not within 5" of a known lens -> RA 10.0, 10.1, 10.4, 10.5, 10.6, 10.7
    assert len(ctl) == 4 and set(np.round(ctl.ra, 3)) <= {10.0, 10.1, 10.4, 10.5, 10.6, 10.7}
    for r in ctl.itertuples():
        np.testing.assert_array_equal(decode_stamp(r.stamp_npz), images[key_of(r.ra, r.dec)])  # not resampled
        assert "cutout.fits?ra=" in r.source_path and r.source_units == "nanomaggy"
    cand = t[t.is_control == 0]
    assert list(cand.task_id) == ["cand1"]
    img = decode_stamp(cand.stamp_npz.iloc[0])[0].astype(np.float64)
    yy, xx = np.mgrid[:64, :64]
    assert (img * xx).sum() / img.sum() == pytest.approx(31.5, abs=0.02)
    assert set(t.half) <= {"look", "held_out"}


def test_a_changed_upstream_file_is_refused_and_nothing_written(sources, capsys):
    tmp_path, repo, src, known, images = sources
    text = src.read_text().splitlines()
    text[2] = text[2].replace(",nanomaggy", "0,nanomaggy").replace(text[2].split(",")[4], "0" * 40)
    src.write_text("\n".join(text) + "\n")
    with FakeCutoutService(images) as svc:
        assert _main(tmp_path, repo, src, known, svc, "--kinds", "candidate") == 2
    assert "not the pinned blob" in capsys.readouterr().err
    assert not (tmp_path / "check").exists()
