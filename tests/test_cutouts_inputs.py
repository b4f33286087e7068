"""`dhs cutouts`: values it must refuse or keep exactly, coverage, and time limits (issue 29's minor list and
issue 27 section 4), against the local fake cutout service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from darkhaloscope.cli import main
from fake_cutouts import FakeCutoutService, simulated_sky

FAST = ["--timeout", "2", "--retries", "1", "--backoff", "0.01", "--no_progress"]


def plain_catalogue(n: int, ra0: float = 150.0) -> pa.Table:
    """n positions with DR10-like conditions (ivar 1/nmgy^2: g ~ 24.5, r ~ 23.9, z ~ 22.9 mag)."""
    cols = {"objid": pa.array(np.arange(n, dtype=np.int64)), "ra": ra0 + 0.01 * np.arange(n), "dec": np.full(n, 2.0)}
    for b in "grz":
        cols[f"psfsize_{b}"] = np.full(n, 1.3)
    for b, ivar in zip("grz", (1500.0, 500.0, 60.0)):
        cols[f"psfdepth_{b}"] = np.full(n, ivar)
    return pa.table(cols)


def _run(tmp_path, table_or_path, base_url="http://127.0.0.1:9", *extra):
    path = table_or_path
    if isinstance(table_or_path, pa.Table):
        path = tmp_path / "cat.parquet"
        pq.write_table(table_or_path, path)
    return main(["cutouts", "--catalog", str(path), "--out_dir", str(tmp_path / "o"), "--base_url", base_url,
                 *FAST, *extra])


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and all(w in err for w in words), err
    return err


@pytest.mark.parametrize("column, value, words", [
    ("ra", -10.0, ("ra", "[0, 360)", "-10")),
    ("ra", 725.0, ("ra", "[0, 360)", "725")),
    ("dec", 95.0, ("dec", "[-90, 90]", "95")),
    ("psfsize_r", 50.0, ("psfsize_r", "arcsec", "50")),
    ("psfsize_g", 1e-4, ("psfsize_g", "arcsec", "0.0001")),
])
def test_out_of_range_values_are_refused_not_wrapped(tmp_path, capsys, column, value, words):
    t = plain_catalogue(5)
    v = t.column(column).to_numpy().copy()
    v[3] = value
    t = t.set_column(t.column_names.index(column), column, pa.array(v))
    assert _run(tmp_path, t) == 2
    _one_line(capsys, *words)
    assert not (tmp_path / "o").exists()


def test_psfdepth_in_magnitudes_is_refused(tmp_path, capsys):
    t = plain_catalogue(5)
    for b, mag in zip("grz", (24.5, 23.9, 22.9)):
        t = t.set_column(t.column_names.index(f"psfdepth_{b}"), f"psfdepth_{b}", pa.array(np.full(5, mag)))
    assert _run(tmp_path, t) == 2
    _one_line(capsys, "psfdepth", "magnitudes", "inverse variance")


def test_csv_string_ids_keep_leading_zeros(tmp_path):
    cat, images, _, _ = simulated_sky(4, seed=2)
    df = cat.to_pandas()
    df["objid"] = ["0001", "0002", "0010", "7"]
    path = tmp_path / "cat.csv"
    df.to_csv(path, index=False)
    with FakeCutoutService(images) as svc:
        assert _run(tmp_path, path, svc.base_url, "--id_column", "objid") == 0
    out = pads.dataset(tmp_path / "o", partitioning="hive").to_table()
    assert out.schema.field("task_id").type == pa.string()
    assert sorted(out.column("task_id").to_pylist()) == ["0001", "0002", "0010", "7"]
    df["objid"] = [3, 1, 2, 10]  # integer ids stay integers
    df.to_csv(path, index=False)
    with FakeCutoutService(images) as svc:
        assert _run(tmp_path, path, svc.base_url, "--id_column", "objid") == 0
    out = pads.dataset(tmp_path / "o", partitioning="hive").to_table()
    assert out.schema.field("task_id").type == pa.int64()


def test_partial_and_missing_coverage_are_permanent_rows(tmp_path, capsys):
    """A cutout with half of every band zero is not usable; a 404 (no overlap with any brick) and an all-zero
    cutout are no_coverage rows, not fetch failures: they do not count against --max_fetch_fail_frac, are not
    asked again on a rerun, and the messages say so."""
    cat, images, rows, _ = simulated_sky(8, seed=6)
    p = lambda i: (rows["ra"][i], rows["dec"][i])  # noqa: E731
    persistent = {p(0): "half_zero", p(1): "404", p(2): "all_zero"}
    with FakeCutoutService(images, persistent=persistent) as svc:
        assert _run(tmp_path, cat, svc.base_url, "--id_column", "objid", "--max_fetch_fail_frac", "0") == 0
        first = len(svc.requests)
        out = capsys.readouterr().out
        assert _run(tmp_path, cat, svc.base_url, "--id_column", "objid", "--max_fetch_fail_frac", "0") == 0
        assert len(svc.requests) == first  # nothing asked again: a 404 is cached as no coverage
    assert "no_coverage" in out and "a rerun will not change" in out
    t = pads.dataset(tmp_path / "o", partitioning="hive").to_table().to_pandas().set_index("task_id")
    names = cat.column("objid").to_pylist()
    assert t.loc[names[0], "cutout_ok"] == 0 and t.loc[names[0], "cutout_reason"].startswith("partial_coverage")
    assert t.loc[names[1], "cutout_reason"] == "no_coverage:http_404"
    assert t.loc[names[2], "cutout_reason"] == "no_coverage:all_zero"
    assert t["cutout_ok"].sum() == 5


def test_nothing_covered_is_an_error_that_says_a_rerun_will_not_help(tmp_path, capsys):
    with FakeCutoutService({}) as svc:  # every position unknown: all-zero cubes
        assert _run(tmp_path, plain_catalogue(12), svc.base_url) == 2
    err = _one_line(capsys, "12 of 12", "no_coverage")
    assert "rerun to fetch" not in err and "a rerun will not" in err
    assert not (tmp_path / "o").exists()


def test_transient_failures_say_a_rerun_resumes(tmp_path, capsys):
    cat, images, rows, _ = simulated_sky(6, seed=8)
    persistent = {(r, d): "500" for r, d in zip(rows["ra"][:3], rows["dec"][:3])}
    with FakeCutoutService(images, persistent=persistent) as svc:
        assert _run(tmp_path, cat, svc.base_url, "--max_fetch_fail_frac", "0.1") == 2
    _one_line(capsys, "3 of 6", "transient", "http_500", "a rerun fetches only")


def test_timeout_limits_the_whole_request(tmp_path, capsys):
    cat, images, rows, _ = simulated_sky(2, seed=9)
    persistent = {(rows["ra"][0], rows["dec"][0]): "dribble"}
    with FakeCutoutService(images, persistent=persistent) as svc:
        t0 = time.monotonic()
        rc = _run(tmp_path, cat, svc.base_url, "--retries", "0", "--max_fetch_fail_frac", "1")
        took = time.monotonic() - t0
    assert rc == 0 and took < 8, took
    t = pads.dataset(tmp_path / "o", partitioning="hive").to_table()
    assert sorted(r for r in t.column("cutout_reason").to_pylist() if r) == ["fetch_failed:timeout after 1 tries"]


def test_a_down_service_stops_early(tmp_path, capsys):
    t = plain_catalogue(60)
    persistent = {(r, d): "drop" for r, d in zip(t.column("ra").to_numpy(), t.column("dec").to_numpy())}
    with FakeCutoutService({}, persistent=persistent) as svc:
        assert _run(tmp_path, t, svc.base_url, "--retries", "2", "--concurrency", "2") == 2
        n = len(svc.requests)
    assert n <= 3 * (10 + 2), n  # 10 consecutive unreachable cutouts stop the run (+ those in flight)
    _one_line(capsys, "consecutive", "connection", "rerun")


def test_ctrl_c_against_a_hung_service_is_quick(tmp_path):
    t = plain_catalogue(4)
    pq.write_table(t, tmp_path / "cat.parquet")
    persistent = {(r, d): "hang" for r, d in zip(t.column("ra").to_numpy(), t.column("dec").to_numpy())}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"),
                                                                    os.environ.get("PYTHONPATH", "")) if p)}
    with FakeCutoutService({}, persistent=persistent) as svc:
        proc = subprocess.Popen([sys.executable, "-m", "darkhaloscope", "cutouts", "--catalog",
                                 str(tmp_path / "cat.parquet"), "--out_dir", str(tmp_path / "o"), "--base_url",
                                 svc.base_url, "--timeout", "30", "--no_progress"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                # as a shell gives it: pytest-xdist workers may ignore SIGINT, and a child inherits
                                # that (tests/test_hostile_inputs.py has the same)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while len(svc.requests) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
        took = time.monotonic() - t0
    assert proc.returncode == 130 and took < 3, (took, err)
    assert "interrupted" in err and "Traceback" not in err


def test_conditions_from_the_releases_tractor_catalogues(tmp_path):
    """A catalogue with upper-case columns and no conditions (as the seed's Phase 3 file and lenscat): each row
    takes psfsize/psfdepth of the nearest Tractor source of its brick (the file's BRICKNAME, else computed),
    fetched once per brick and cached; a row whose brick has no Tractor file has no conditions."""
    import io as _io

    from astropy.table import Table

    from darkhaloscope.simulation.manifest import brickname_of

    cat, images, rows, _ = simulated_sky(6, seed=13)
    ra, dec = rows["ra"], rows["dec"]
    bricks = brickname_of(ra, dec)
    files = {}
    for brick in sorted(set(bricks[:5])):  # row 5's brick has no Tractor file
        sel = [i for i in range(5) if bricks[i] == brick]
        t = Table()
        t["RA"] = np.r_[ra[sel], ra[sel]]
        t["DEC"] = np.r_[dec[sel] + 0.2 / 3600, dec[sel] + 5.0 / 3600]  # the source, and a neighbour 5" away
        for c in ("psfsize", "psfdepth"):
            for b in "grz":
                v = cat.column(f"{c}_{b}").to_numpy()[sel]
                t[f"{c.upper()}_{b.upper()}"] = np.r_[v, v * 1.5].astype(np.float32)
        buf = _io.BytesIO()
        t.write(buf, format="fits")
        files[f"/tractor/{brick[:3]}/tractor-{brick}.fits"] = buf.getvalue()
    upper = pa.table({"OBJID": cat.column("objid"), "RA": cat.column("ra"), "DEC": cat.column("dec"),
                      "BRICKNAME": pa.array([bricks[0], bricks[1], "", "", "", ""])})
    with FakeCutoutService(images, files=files) as svc:
        for _ in range(2):
            assert _run(tmp_path, upper, svc.base_url, "--tractor_url", svc.base_url + "/tractor") == 0
        asked = list(svc.file_requests)
    assert sorted(asked) == sorted({f"/tractor/{b[:3]}/tractor-{b}.fits" for b in bricks})  # once per brick
    out = pads.dataset(tmp_path / "o", partitioning="hive").to_table().to_pandas().set_index("task_id")
    for i, name in enumerate(cat.column("objid").to_pylist()):
        r = out.loc[name]
        if i == 5:
            assert r["cutout_ok"] == 0 and r["cutout_reason"].startswith("no_conditions")
            continue
        assert r["cutout_ok"] == 1
        for b in "grz":  # float32 in the Tractor file, as in the real ones
            assert r[f"psfsize_{b}"] == pytest.approx(rows[f"psfsize_{b}"][i], rel=1e-6)
            assert r[f"psfdepth_{b}"] == pytest.approx(rows[f"psfdepth_{b}"][i], abs=1e-5)
