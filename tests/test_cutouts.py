"""`dhs cutouts` against a local fake cutout service (127.0.0.1) serving simulator stamps, with faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from astropy.table import Table

from darkhaloscope.cli import main
from darkhaloscope.stamps.contract import decode_stamp, depth_from_tractor_ivar
from darkhaloscope.simulation.draws import region_split_of, sky_cell
from darkhaloscope.sky.cutouts import cache_path
from fake_cutouts import FakeCutoutService, key_of, simulated_sky

FAST = ["--timeout", "0.5", "--retries", "3", "--backoff", "0.01", "--no_progress"]


@pytest.fixture(scope="module")
def sky():
    return simulated_sky(14, seed=3)


def _read(out_dir) -> pa.Table:
    return pads.dataset(out_dir, format="parquet", partitioning="hive").to_table()


def test_depth_from_tractor_ivar_hand_worked():
    # ivar = 400 nmgy^-2 -> sigma = 0.05 nmgy -> 5 sigma = 0.25 nmgy -> 22.5 - 2.5 log10(0.25) = 24.00515 mag
    assert depth_from_tractor_ivar(400.0) == pytest.approx(24.005149978, abs=1e-8)
    # ivar = 1 -> 5 sigma = 5 nmgy -> 22.5 - 2.5 log10(5) = 20.752575 mag
    assert depth_from_tractor_ivar(1.0) == pytest.approx(20.752574989, abs=1e-8)


def test_cutouts_survive_every_fault_and_account_for_every_row(sky, tmp_path, capsys):
    cat, images, rows, _ = sky
    ra, dec = rows["ra"], rows["dec"]
    p = lambda i: (ra[i], dec[i])  # noqa: E731
    faults = {p(0): ["slow"], p(1): ["500", "500"], p(2): ["429"], p(3): ["truncated"],
              p(4): ["truncated_nolength"], p(7): ["drop"], p(10): ["503"]}
    persistent = {p(5): "wrong_shape", p(6): "all_zero", p(8): "500", p(9): "404"}
    cat_path = tmp_path / "cat.parquet"
    pq.write_table(cat, cat_path)
    out = tmp_path / "cutouts"
    with FakeCutoutService(images, faults, persistent) as svc:
        rc = main(["cutouts", "--catalog", str(cat_path), "--out_dir", str(out), "--base_url", svc.base_url,
                   "--id_column", "objid", "--max_fetch_fail_frac", "0.5", *FAST])
        assert rc == 0, capsys.readouterr().err
        # the retried faults were asked again, and no more than needed
        assert svc.count(*p(1)) == 3 and svc.count(*p(3)) == 2 and svc.count(*p(4)) == 2 and svc.count(*p(7)) == 2
        assert svc.count(*p(8)) == 4 and svc.count(*p(9)) == 1  # 1 + 3 retries; a 404 is not retried
        for i in (2, 10):  # Retry-After: 1 honoured (the backoff alone would be ~0.01 s)
            t = svc.times(*p(i))
            assert len(t) == 2 and t[1] - t[0] >= 0.95
        assert all(q["size"] == "64" and q["layer"] == "ls-dr10" and q["pixscale"] == "0.262" and q["bands"] == "grz"
                   for _, _, q in svc.requests)
    table = _read(out).sort_by("task_id")
    assert table.num_rows == len(ra)  # every row accounted for, once
    assert table.schema.field("task_id").type == pa.string()
    ids = table.column("task_id").to_pylist()
    assert ids == sorted(cat.column("objid").to_pylist())
    reason = dict(zip(ids, table.column("cutout_reason").to_pylist()))
    ok = dict(zip(ids, table.column("cutout_ok").to_pylist()))
    name = lambda i: cat.column("objid")[i].as_py()  # noqa: E731
    assert reason[name(5)] == "wrong_shape:1x64x64"
    assert reason[name(6)] == "no_coverage:all_zero"
    assert reason[name(8)].startswith("fetch_failed:http_500 after 4 tries")
    assert reason[name(9)] == "no_coverage:http_404"
    assert {i for i in ids if ok[i] == 0} == {name(i) for i in (5, 6, 8, 9)}
    # usable stamps are the simulator's pixels exactly (float32 through FITS and npz)
    by_id = {r["task_id"]: r for r in table.to_pylist()}
    for i in range(len(ra)):
        r = by_id[name(i)]
        if r["cutout_ok"]:
            np.testing.assert_array_equal(decode_stamp(r["stamp_npz"]), images[p(i)])
        else:
            assert r["stamp_npz"] is None
        # region and split: the manifest's own assignment for the same sky position
        assert r["region_id"] == rows["region_id"][i] == sky_cell(ra[i], dec[i])
        assert r["region_split"] == rows["region_split"][i]
        for b in "grz":  # Tractor inverse variance -> the manifest's 5-sigma AB depth
            assert r[f"psfdepth_{b}"] == pytest.approx(rows[f"psfdepth_{b}"][i], abs=1e-9)
            assert r[f"psfsize_{b}"] == rows[f"psfsize_{b}"][i]
        assert r["is_control"] == 1
    fails = pcsv.read_csv(out / "_failures.csv")
    assert sorted(fails.column("task_id").to_pylist()) == sorted(name(i) for i in (5, 6, 8, 9))
    printed = capsys.readouterr().out
    assert "10 of 14 usable" in printed and "_failures.csv" in printed

    # a rerun fetches nothing (the cache has every answer that parsed, and the 404: no coverage is permanent);
    # transient failures are asked again
    with FakeCutoutService(images) as svc:
        assert main(["cutouts", "--catalog", str(cat_path), "--out_dir", str(out), "--base_url", svc.base_url,
                     "--id_column", "objid", *FAST]) == 0
        assert sorted(r[0] for r in svc.requests) == [key_of(*p(8))]
    table = _read(out)
    assert sum(table.column("cutout_ok").to_pylist()) == 11


def test_region_split_follows_the_manifest_rule(sky, tmp_path):
    cat, images, rows, _ = sky
    fracs = (0.2, 0.3, 0.5)
    cat_path = tmp_path / "cat.csv"
    pcsv.write_csv(cat, cat_path)
    with FakeCutoutService(images) as svc:
        assert main(["cutouts", "--catalog", str(cat_path), "--out_dir", str(tmp_path / "o"), "--base_url",
                     svc.base_url, "--split_fracs", "0.2,0.3,0.5", "--label", "lens", *FAST]) == 0
    t = _read(tmp_path / "o").to_pandas().sort_values("ra")
    expected = region_split_of(sky_cell(t["ra"], t["dec"]), fracs)
    assert list(t["region_split"].astype(str)) == list(expected)
    assert (t["is_control"] == 0).all()


def test_fits_catalogue_with_integer_ids_and_bad_rows(sky, tmp_path):
    cat, images, rows, _ = sky
    t = Table({c: np.asarray(cat.column(c).to_pylist()) for c in cat.column_names})
    t["objid"] = np.arange(100, 100 + len(t), dtype=np.int64)
    t["grade"] = np.array(["A", "B"] * (len(t) // 2))
    t["psfdepth_z"][1] = 0.0  # no z coverage in the catalogue: not fetched
    t["dec"][2] = np.nan
    path = tmp_path / "cat.fits"
    t.write(path)
    with FakeCutoutService(images) as svc:
        assert main(["cutouts", "--catalog", str(path), "--out_dir", str(tmp_path / "o"), "--base_url",
                     svc.base_url, "--id_column", "objid", *FAST]) == 0
        assert len(svc.requests) == len(t) - 2
    out = _read(tmp_path / "o").sort_by("task_id")
    assert out.schema.field("task_id").type == pa.int64()
    assert out.column("task_id").to_pylist() == list(range(100, 100 + len(t)))
    assert out.column("grade").to_pylist() == list(t["grade"])  # other columns carried through
    reasons = out.column("cutout_reason").to_pylist()
    assert reasons[1] == "no_conditions:psfdepth_z" and reasons[2] == "bad_position"
    assert out.column("cutout_ok").to_pylist() == [1, 0, 0] + [1] * (len(t) - 3)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["psfsize_r"]), "lacks column(s) psfsize_r"),
    (lambda t: t.set_column(0, "objid", pa.array(["a"] * t.num_rows)), "repeats values"),
])
def test_bad_catalogue_is_one_line_error(sky, tmp_path, capsys, change, message):
    cat, *_ = sky
    path = tmp_path / "cat.parquet"
    pq.write_table(change(cat), path)
    rc = main(["cutouts", "--catalog", str(path), "--out_dir", str(tmp_path / "o"), "--base_url",
               "http://127.0.0.1:9", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dhs cutouts: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_service_down_writes_nothing_and_keeps_the_cache(sky, tmp_path, capsys):
    cat, images, rows, _ = sky
    path = tmp_path / "cat.parquet"
    pq.write_table(cat, path)
    persistent = {(r, d): "500" for r, d in list(zip(rows["ra"], rows["dec"]))[4:]}
    with FakeCutoutService(images, persistent=persistent) as svc:
        rc = main(["cutouts", "--catalog", str(path), "--out_dir", str(tmp_path / "o"), "--base_url", svc.base_url,
                   "--retries", "1", *FAST[:2], *FAST[4:]])
    err = capsys.readouterr().err
    assert rc == 2 and "10 of 14 cutouts failed transiently (fetch_failed:http_500)" in err
    assert not (tmp_path / "o").exists()
    cached = [cache_path(tmp_path / "o.cache", r, d).exists() for r, d in zip(rows["ra"], rows["dec"])]
    assert cached == [True] * 4 + [False] * 10


def test_resume_after_kill_fetches_only_what_is_missing(sky, tmp_path):
    cat, images, rows, _ = sky
    path = tmp_path / "cat.parquet"
    pq.write_table(cat, path)
    cache = tmp_path / "cache"
    positions = list(zip(rows["ra"], rows["dec"]))
    with FakeCutoutService(images, delay_s=0.15) as svc:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"),
                                                                        os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "darkhaloscope", "cutouts", "--catalog", str(path), "--out_dir",
               str(tmp_path / "o"), "--cache_dir", str(cache), "--base_url", svc.base_url, "--concurrency", "2",
               *FAST]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while sum(cache_path(cache, *q).exists() for q in positions) < 4:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not (tmp_path / "o").exists()  # killed: no output that looks finished
        done = [q for q in positions if cache_path(cache, *q).exists()]
        assert 4 <= len(done) < len(positions)
        before = len(svc.requests)
        assert main(["cutouts", "--catalog", str(path), "--out_dir", str(tmp_path / "o"), "--cache_dir",
                     str(cache), "--base_url", svc.base_url, *FAST]) == 0
        asked = [r[0] for r in svc.requests[before:]]
    assert sorted(asked) == sorted(key_of(*q) for q in positions if q not in done)
    assert sum(_read(tmp_path / "o").column("cutout_ok").to_pylist()) == len(positions)


def test_retry_after_seconds_and_http_date():
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone

    from darkhaloscope.sky.cutouts import _retry_after

    assert _retry_after("7") == 7.0 and _retry_after(None) is None and _retry_after("soon") is None
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= _retry_after(when) <= 30


def test_catalogue_from_s3(sky, tmp_path, moto_s3):
    """The catalogue read from a local moto S3 server (a real S3 stand-in, 127.0.0.1)."""
    from darkhaloscope.sky.cutouts import load_catalog

    cat, *_ = sky
    pq.write_table(cat, tmp_path / "cat.parquet")
    moto_s3.client.upload_file(str(tmp_path / "cat.parquet"), "dhs", "cats/lrg.parquet")
    got = load_catalog(f"s3://dhs/cats/lrg.parquet?endpoint_override=127.0.0.1:{moto_s3.port}&scheme=http"
                       "&region=us-east-1", "objid")
    assert got.task_id.to_pylist() == cat.column("objid").to_pylist()
    np.testing.assert_array_equal(got.ra, cat.column("ra").to_numpy())
