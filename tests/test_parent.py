"""`dhs parent`: the user's Phase 3 flags reproduced exactly from a sweep-format file, streaming over several
files, the cut's edges, and bad input."""

import functools
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from darkhaloscope.cli import main
from darkhaloscope.sky import parent

DATA = Path(__file__).parent / "data"
SWEEP = DATA / "phase3_sweep_v3.fits"


def oracle_flags() -> pd.DataFrame:
    codes = pd.read_csv(DATA / "phase3_flags.csv", dtype={"flags_v1_to_v5": str})["flags_v1_to_v5"]
    return pd.DataFrame({f"is_lrg_v{i + 1}": codes.str[i] == "1" for i in range(5)})


def test_flags_reproduce_the_users_phase3_exactly(tmp_path):
    out = tmp_path / "parent.parquet"
    assert main(["parent", "--sweeps", str(SWEEP), "--out", str(out)]) == 0
    got = pd.read_parquet(out)
    want = oracle_flags()
    assert len(got) == len(want) == 1509
    for col in want:
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy(), err_msg=col)
    assert [int(got[f"is_lrg_v{i}"].sum()) for i in range(1, 6)] == [486, 738, 1509, 1509, 1509]
    # what later steps read, lower case, with the sweep's values
    with fits.open(SWEEP) as hdul:
        src = hdul[1].data
        np.testing.assert_array_equal(got["ra"], src["RA"])
        np.testing.assert_array_equal(got["flux_z"], src["FLUX_Z"])
        assert list(got["type"][:3]) == [t.strip() for t in src["TYPE"][:3]]
    for c in parent.REQUIRED:
        assert c in got.columns, c
    assert got["id"].iloc[5] == f"{got['brickname'].iloc[5]}-5" and got["id"].is_unique
    assert got["mag_z"].to_numpy() == pytest.approx(22.5 - 2.5 * np.log10(got["flux_z"].to_numpy(np.float64)))


def test_selection_v1_keeps_only_its_rows_and_streams_many_files(tmp_path):
    # the fixture split into three files, read 100 rows at a time through a glob
    with fits.open(SWEEP) as hdul:
        table = hdul[1].data
        for k, (a, b) in enumerate([(0, 600), (600, 1200), (1200, len(table))]):
            fits.BinTableHDU(table[a:b]).writeto(tmp_path / f"sweep-{k}.fits")
    out = tmp_path / "v1.parquet"
    n_read, n_kept = parent.build_parent([str(tmp_path / "sweep-*.fits")], out, "v1", chunk_rows=100)
    assert (n_read, n_kept) == (1509, 486)
    got = pd.read_parquet(out)
    assert got["is_lrg_v1"].all()
    want_rows = np.flatnonzero(oracle_flags()["is_lrg_v1"].to_numpy())
    np.testing.assert_array_equal(got["objid"].to_numpy(), want_rows)  # OBJID = row number in the fixture
    assert sorted(got["sweep"].unique()) == ["sweep-0.fits", "sweep-1.fits", "sweep-2.fits"]


def _sweep(path, flux_r, flux_z, flux_w1, types):
    n = len(flux_r)
    cols = [fits.Column("ra", "D", array=np.linspace(10, 11, n)), fits.Column("Dec", "D", array=np.zeros(n)),
            fits.Column("BRICKNAME", "8A", array=["0100p000"] * n), fits.Column("OBJID", "J", array=np.arange(n)),
            fits.Column("TYPE", "3A", array=types), fits.Column("FLUX_G", "E", array=np.ones(n)),
            fits.Column("FLUX_R", "E", array=flux_r), fits.Column("FLUX_Z", "E", array=flux_z),
            fits.Column("FLUX_W1", "E", array=flux_w1),
            *[fits.Column(c, "E", array=np.ones(n)) for c in ("SHAPE_E1", "SHAPE_E2", "PSFSIZE_G", "PSFSIZE_R",
                                                             "PSFSIZE_Z", "PSFDEPTH_G", "PSFDEPTH_R", "PSFDEPTH_Z")],
            fits.Column("MASKBITS", "I", array=np.zeros(n, np.int16))]
    fits.BinTableHDU.from_columns(cols).writeto(path)


def test_cut_edges_nonpositive_flux_psf_and_mixed_case(tmp_path):
    fz = 10 ** (-0.4 * (19.0 - 22.5))  # z = 19
    rz_ok, zw1_ok = fz * 10 ** (-0.4 * 1.0), fz * 10 ** (0.4 * 2.0)  # r - z = 1, z - W1 = 2
    flux_r = [rz_ok, rz_ok, 0.0, rz_ok, -1.0]
    flux_w1 = [zw1_ok, zw1_ok, zw1_ok, np.nan, zw1_ok]
    _sweep(tmp_path / "s.fits", flux_r, [fz] * 5, flux_w1, ["SER", "PSF", "DEV", "EXP", "REX"])
    flags = parent.lrg_flags(np.float32(flux_r), np.float32([fz] * 5), np.float32(flux_w1))
    assert list(flags["is_lrg_v3"]) == [True, True, False, False, False]
    # z = 20.7: fainter than v3's 20.4, inside v4's 21.0
    faint = fz * 10 ** (-0.4 * 1.7)
    f = parent.lrg_flags([faint * 10 ** (-0.4 * 1.0)], [faint], [faint * 10 ** (0.4 * 2.0)])
    assert [bool(f[f"is_lrg_v{i}"][0]) for i in range(1, 6)] == [False, False, False, True, True]
    mag = parent.ab_mag([1.0, 0.0, -2.0, np.nan])
    assert mag[0] == 22.5 and np.isnan(mag[1:]).all()
    out = tmp_path / "p.parquet"
    assert main(["parent", "--sweeps", str(tmp_path / "s.fits"), "--out", str(out)]) == 0
    assert list(pd.read_parquet(out)["type"]) == ["SER", "PSF"]
    out2 = tmp_path / "p2.parquet"
    assert main(["parent", "--sweeps", str(tmp_path / "s.fits"), "--out", str(out2), "--exclude_psf"]) == 0
    assert list(pd.read_parquet(out2)["type"]) == ["SER"]


def test_https_source(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(SWEEP, served / "sweep-000p000-010p005.fits")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/sweep-000p000-010p005.fits"
        out = tmp_path / "p.parquet"
        assert parent.build_parent([url], out) == (1509, 1509)
        assert pd.read_parquet(out)["sweep"].iloc[0] == "sweep-000p000-010p005.fits"
    finally:
        server.shutdown()


@pytest.mark.s3
def test_s3_glob_like_local(tmp_path, moto_s3):
    local = tmp_path / "sweeps"
    local.mkdir()
    with fits.open(SWEEP) as hdul:
        fits.BinTableHDU(hdul[1].data[:700]).writeto(local / "sweep-a.fits")
        fits.BinTableHDU(hdul[1].data[700:]).writeto(local / "sweep-b.fits")
    (local / "notes.txt").write_text("not a sweep")
    uri = moto_s3.upload_dir(local, "dr10")
    base, query = uri.split("?")
    out = tmp_path / "p.parquet"
    assert parent.build_parent([f"{base}/sweep-*.fits?{query}"], out, "v2") == (1509, 738)
    got = pd.read_parquet(out)
    np.testing.assert_array_equal(got["objid"], np.flatnonzero(oracle_flags()["is_lrg_v2"].to_numpy()))
    assert sorted(got["sweep"].unique()) == ["sweep-a.fits", "sweep-b.fits"]


@pytest.mark.parametrize("case,needle", [
    ("missing_column", "lacks column(s) MASKBITS"),
    ("no_match", "matches no file"),
    ("bad_selection", "is not one of"),
    ("not_fits", "not a readable FITS file"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, needle):
    src = tmp_path / "s.fits"
    args = ["--selection", "v3"]
    if case == "missing_column":
        with fits.open(SWEEP) as hdul:
            cols = [c for c in hdul[1].columns if c.name != "MASKBITS"]
            fits.BinTableHDU.from_columns(cols).writeto(src)
    elif case == "no_match":
        src = tmp_path / "nothing-*.fits"
    elif case == "bad_selection":
        shutil.copy(SWEEP, src)
        args = ["--selection", "v9_everything"]
    else:
        src.write_text("not a FITS file")
    out = tmp_path / "p.parquet"
    assert main(["parent", "--sweeps", str(src), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and needle in err[-1], err
    assert not out.exists()
    assert not list(tmp_path.glob(".p.parquet.tmp-*"))
