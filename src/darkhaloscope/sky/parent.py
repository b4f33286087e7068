"""`dhs parent`: Phase 3, the LRG parent sample, from DR10 sweep files.

Input: sweep catalogues as the Legacy Surveys publish them (FITS binary tables, upper-case columns:
``RA``/``DEC`` float64, ``BRICKNAME`` and ``TYPE`` strings, ``FLUX_G/R/Z/W1`` float32 nanomaggies,
``SHAPE_E1/E2``, ``PSFSIZE_G/R/Z`` (FWHM, arcsec), ``PSFDEPTH_G/R/Z`` (point-source flux inverse variance,
1/nanomaggy^2), ``MASKBITS``), as local paths or globs, ``s3://`` URIs (a glob in the last path part is
allowed) or https URLs. Column names are matched case-insensitively. Remote files are copied to a temporary
file one at a time, read and deleted.

Selections: the original pipeline's five LRG cuts on raw (not extinction-corrected) AB magnitudes
``m = 22.5 - 2.5 log10(flux)`` (NaN for flux <= 0, which fails every cut), with strict inequalities
``z < z_max``, ``r - z > rz_min``, ``z - W1 > zw1_min``. The thresholds are the user's repository's
``LRG_VARIANTS`` (dark_halo_scope/emr/spark_phase3_pipeline.py and deprecated_phase3_core.py, commit
51655e4); the flags reproduce the user's Phase 3 parquet exactly (tests/test_parent.py). Those flags never
looked at ``TYPE``; ``--exclude_psf`` additionally drops point sources (``TYPE = PSF``), as the later Spark
pipeline did.

Output (``--out``, parquet, lower-case columns): ``id`` (``<brickname>-<objid>``: OBJID is unique within a brick
only; ``dhs cutouts`` takes it as the task id), ``ra, dec, brickname, objid, type, flux_g/r/z/w1,
mag_g/r/z/w1, r_minus_z, z_minus_w1, shape_e1, shape_e2, psfsize_g/r/z, psfdepth_g/r/z, maskbits``, the
optional ``release, shape_r, ebv`` when the sweep has them, ``is_lrg_v1`` .. ``is_lrg_v5`` and ``sweep``
(the file's name). It keeps the rows of ``--selection`` (default v3_color_relaxed). The psfdepth columns
stay Tractor inverse variances, which is what ``dhs cutouts`` expects. Memory is bounded by one chunk of
one file (the FITS table is memory-mapped and read ``--chunk_rows`` rows at a time); rows are appended to
a ``ParquetWriter`` on a temporary name that is renamed only when every file is done.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output, filesystem

log = logging.getLogger("dhs.parent")

# name -> (z_max, rz_min, zw1_min), in the order of the flags is_lrg_v1 .. is_lrg_v5
SELECTIONS: dict[str, tuple[float, float, float]] = {
    "v1_pure_massive": (20.0, 0.5, 1.6),
    "v2_baseline_dr10": (20.4, 0.4, 1.6),
    "v3_color_relaxed": (20.4, 0.4, 0.8),
    "v4_mag_relaxed": (21.0, 0.4, 0.8),
    "v5_very_relaxed": (21.5, 0.3, 0.8),
}
FLAG_OF = {name: f"is_lrg_v{i}" for i, name in enumerate(SELECTIONS, start=1)}
DEFAULT_SELECTION = "v3_color_relaxed"
FLUX_BANDS = ("g", "r", "z", "w1")
REQUIRED = ("ra", "dec", "brickname", "objid", "type", *(f"flux_{b}" for b in FLUX_BANDS), "shape_e1", "shape_e2",
            "psfsize_g", "psfsize_r", "psfsize_z", "psfdepth_g", "psfdepth_r", "psfdepth_z", "maskbits")
OPTIONAL = ("release", "shape_r", "ebv")


def selection_name(name: str) -> str:
    """Full selection name from the full name or its ``vN`` prefix."""
    for full in SELECTIONS:
        if name in (full, full.split("_")[0]):
            return full
    raise DHSError(f"--selection '{name}' is not one of {', '.join(SELECTIONS)} (or v1..v5)")


def ab_mag(flux) -> np.ndarray:
    """AB magnitude of a flux in nanomaggies (zero point 22.5); NaN where flux <= 0 or not finite."""
    flux = np.asarray(flux, np.float64)
    out = np.full(flux.shape, np.nan)
    good = np.isfinite(flux) & (flux > 0)
    out[good] = 22.5 - 2.5 * np.log10(flux[good])
    return out


def lrg_flags(flux_r, flux_z, flux_w1) -> dict[str, np.ndarray]:
    """{is_lrg_vN: bool array} for the five selections (NaN magnitudes fail every comparison)."""
    mag_r, mag_z, mag_w1 = ab_mag(flux_r), ab_mag(flux_z), ab_mag(flux_w1)
    rz, zw1 = mag_r - mag_z, mag_z - mag_w1
    with np.errstate(invalid="ignore"):
        return {FLAG_OF[name]: (mag_z < z_max) & (rz > rz_min) & (zw1 > zw1_min)
                for name, (z_max, rz_min, zw1_min) in SELECTIONS.items()}


# ----------------------------------------------------------------------------------------------------
# Inputs: local paths and globs, s3:// (pyarrow), https
# ----------------------------------------------------------------------------------------------------

def expand_inputs(patterns) -> list[str]:
    """Every file the patterns name, in sorted order per pattern, each once. A pattern that names nothing
    is an error (a typo must not silently shrink the parent sample)."""
    out: list[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        if pattern.startswith(("http://", "https://")):
            found = [pattern]
        elif "://" in pattern:
            found = _expand_uri(pattern)
        elif glob.has_magic(pattern):
            found = sorted(glob.glob(pattern))
        else:
            if not Path(pattern).is_file():
                raise DHSError(f"--sweeps: {pattern} does not exist")
            found = [pattern]
        if not found:
            raise DHSError(f"--sweeps: {pattern} matches no file")
        out.extend(f for f in found if f not in out)
    return out


def _expand_uri(pattern: str) -> list[str]:
    """An s3:// (or other pyarrow) URI, with a glob allowed in its last path part; a ``?query`` (e.g. an
    ``endpoint_override``) is kept on every file's URI."""
    import pyarrow.fs as pafs

    base, _, query = pattern.partition("?")
    query = f"?{query}" if query else ""
    scheme = base.split("://", 1)[0]
    if not glob.has_magic(base):
        fs, path = filesystem(pattern)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise DHSError(f"--sweeps: {pattern} does not exist")
        return [pattern]
    folder, name_glob = base.rsplit("/", 1)
    fs, path = filesystem(folder + query)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    except Exception as exc:
        raise DHSError(f"--sweeps: cannot list {folder}: {exc}") from None
    return sorted(f"{scheme}://{i.path}{query}" for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, name_glob))


@contextlib.contextmanager
def local_copy(source: str, tmp_dir: str | None = None):
    """Yield a local path of ``source``; a remote file is streamed to a temporary file that is deleted."""
    if "://" not in source:
        yield source
        return
    suffix = ".fits.gz" if source.lower().partition("?")[0].endswith(".gz") else ".fits"
    fd, tmp = tempfile.mkstemp(prefix="dhs-sweep-", suffix=suffix, dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            if source.startswith(("http://", "https://")):
                req = urllib.request.Request(source, headers={"User-Agent": "darkhaloscope-dhs-parent/0.1"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as resp:
                        shutil.copyfileobj(resp, out, length=16 << 20)
                except OSError as exc:
                    raise DHSError(f"cannot download {source}: {exc}") from None
            else:
                fs, path = filesystem(source)
                try:
                    with fs.open_input_stream(path) as fh:
                        shutil.copyfileobj(fh, out, length=16 << 20)
                except Exception as exc:
                    raise DHSError(f"cannot read {source}: {exc}") from None
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------------
# One sweep file -> parent rows, chunk by chunk
# ----------------------------------------------------------------------------------------------------

def _strings(values) -> pa.Array:
    values = np.asarray(values)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "ascii")
    return pa.array(np.char.strip(values.astype(str)), pa.string())


def _native(values) -> np.ndarray:
    values = np.asarray(values)
    return values.astype(values.dtype.newbyteorder("="), copy=False)


def sweep_chunks(path: str, name: str, selection: str, exclude_psf: bool = False, chunk_rows: int = 500_000):
    """Yield (pyarrow Table of the selected rows, rows read) per chunk of one local sweep file."""
    from astropy.io import fits

    flag = FLAG_OF[selection]
    try:
        hdul = fits.open(path, memmap=True)
    except Exception as exc:
        raise DHSError(f"sweep {name} is not a readable FITS file ({type(exc).__name__}: {exc})") from None
    with hdul:
        if len(hdul) < 2 or not isinstance(hdul[1], fits.BinTableHDU):
            raise DHSError(f"sweep {name} has no binary table in HDU 1")
        data = hdul[1].data
        names = {c.lower(): c for c in hdul[1].columns.names}
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise DHSError(f"sweep {name} lacks column(s) {', '.join(c.upper() for c in missing)}")
        columns = [*REQUIRED, *(c for c in OPTIONAL if c in names)]
        n = 0 if data is None else len(data)
        for start in range(0, n, chunk_rows):
            chunk = data[start:start + chunk_rows]
            fluxes = {b: np.asarray(chunk[names[f"flux_{b}"]], np.float64) for b in FLUX_BANDS}
            flags = lrg_flags(fluxes["r"], fluxes["z"], fluxes["w1"])
            keep = flags[flag].copy()
            types = np.char.strip(np.asarray(chunk[names["type"]]).astype(str))
            if exclude_psf:
                keep &= types != "PSF"
            idx = np.flatnonzero(keep)
            if idx.size == 0:
                yield None, len(chunk)
                continue
            cols: dict[str, pa.Array] = {}
            bricks = _strings(np.asarray(chunk[names["brickname"]])[idx])
            objids = np.asarray(chunk[names["objid"]])[idx]
            # OBJID is unique within a brick only: the Legacy Surveys' <brickname>-<objid> names the object
            cols["id"] = pa.array([f"{b}-{int(o)}" for b, o in zip(bricks.to_pylist(), objids)], pa.string())
            for c in columns:
                values = np.asarray(chunk[names[c]])[idx]
                if c in ("brickname", "type"):
                    cols[c] = _strings(values)
                else:
                    cols[c] = pa.array(_native(values))
                if c == "flux_w1":  # magnitudes and colours follow the fluxes
                    mags = {b: ab_mag(fluxes[b][idx]) for b in FLUX_BANDS}
                    for b in FLUX_BANDS:
                        cols[f"mag_{b}"] = pa.array(mags[b])
                    cols["r_minus_z"] = pa.array(mags["r"] - mags["z"])
                    cols["z_minus_w1"] = pa.array(mags["z"] - mags["w1"])
            for f in FLAG_OF.values():
                cols[f] = pa.array(flags[f][idx])
            cols["sweep"] = pa.array([name] * idx.size, pa.string())
            yield pa.table(cols), len(chunk)


def build_parent(sweeps, out, selection: str = DEFAULT_SELECTION, exclude_psf: bool = False,
                 chunk_rows: int = 500_000, tmp_dir: str | None = None) -> tuple[int, int]:
    """Write the parent parquet; returns (rows read, rows kept)."""
    from tqdm import tqdm

    selection = selection_name(selection)
    files = expand_inputs(sweeps)
    n_read = n_kept = 0
    schema = None
    with atomic_output(out) as tmp:
        writer = None
        try:
            for source in tqdm(files, unit="sweep", desc="dhs parent"):
                name = source.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
                with local_copy(source, tmp_dir) as local:
                    for table, n in sweep_chunks(local, name, selection, exclude_psf, chunk_rows):
                        n_read += n
                        if table is None:
                            continue
                        if writer is None:
                            schema = table.schema
                            writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                        elif table.schema != schema:
                            try:
                                table = table.cast(schema)
                            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                                raise DHSError(f"sweep {name} has other columns or types than the files "
                                               f"before it ({table.schema} vs {schema})") from None
                        writer.write_table(table)
                        n_kept += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise DHSError(f"no row of the {len(files)} sweep file(s) ({n_read} rows) passes {selection}")
    return n_read, n_kept


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweeps", nargs="+", required=True,
                        help="DR10 sweep FITS files: paths, globs, s3:// URIs (glob in the file name) or https URLs")
    parser.add_argument("--out", required=True, help="parent catalogue parquet to write")
    parser.add_argument("--selection", default=DEFAULT_SELECTION,
                        help=f"which rows to keep: {', '.join(SELECTIONS)} (or v1..v5)")
    parser.add_argument("--exclude_psf", action="store_true", help="also drop TYPE = PSF (point sources)")
    parser.add_argument("--chunk_rows", type=int, default=500_000, help="rows read at a time per file")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.chunk_rows < 1:
        raise DHSError(f"--chunk_rows must be >= 1, got {args.chunk_rows}")
    n_read, n_kept = build_parent(args.sweeps, args.out, args.selection, args.exclude_psf, args.chunk_rows)
    print(f"parent: {n_kept} of {n_read} sweep rows pass {selection_name(args.selection)}"
          f"{' (TYPE PSF excluded)' if args.exclude_psf else ''} -> {args.out}")
    return 0
