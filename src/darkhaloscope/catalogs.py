"""Catalogues as the project reads them, whichever stage reads them: tables (parquet, CSV or FITS; local or a
pyarrow URI such as s3://) with their column names in lower case, and the known-lens catalogues (lenscat by
default) with a nearest-neighbour index on the sky. Below every stage: the simulator (real hosts), mining and the
real-sky commands read catalogues through here."""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.io import filesystem

log = logging.getLogger(__name__)

# the id columns a catalogue may carry, in order of preference (``resolve_id_column`` takes the first)
ID_CANDIDATES = ("task_id", "id", "objid", "name")


def _open_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    try:
        with fs.open_input_file(p) as fh:
            return fh.read()
    except Exception as exc:
        raise DHSError(f"cannot read catalogue {path}: {type(exc).__name__}: {exc}") from None


def _fits_table(blob: bytes, path: str) -> pa.Table:
    from astropy.table import Table

    try:
        table = Table.read(io.BytesIO(blob), format="fits")
    except Exception as exc:
        raise DHSError(f"catalogue {path} is not a readable FITS table ({type(exc).__name__}: {exc})") from None
    cols = {}
    for name in table.colnames:
        col = table[name]
        if col.ndim != 1:  # e.g. a (N, k) array column: not a scalar per row, not carried through
            continue
        values = np.asarray(col)
        if values.dtype.kind == "S":  # FITS strings are bytes, right-padded (ASCII by the standard)
            try:
                cols[name] = pa.array([v.decode("ascii").rstrip() for v in values], pa.string())
            except UnicodeDecodeError:
                raise DHSError(f"catalogue {path}: column {name} holds non-ASCII bytes, which FITS strings "
                               "cannot") from None
        elif values.dtype.kind == "U":
            cols[name] = pa.array([v.rstrip() for v in values], pa.string())
        else:
            mask = np.ma.getmaskarray(col) if hasattr(col, "mask") else None
            cols[name] = pa.array(values.astype(values.dtype.newbyteorder("=")), mask=mask)
    return pa.table(cols)


def normalise_columns(table: pa.Table, path) -> pa.Table:
    """Column names in lower case, as the rest of the project spells them: DR10 sweep and Tractor files (and
    catalogues derived from them) spell them in upper case (RA, DEC, PSFSIZE_G, ...). Every catalogue reader
    goes through here. Two columns that differ only in case are refused (which one is meant is unknowable)."""
    lower = [c.lower() for c in table.column_names]
    dup = sorted({c for c in lower if lower.count(c) > 1})
    if dup:
        raise DHSError(f"catalogue {path} has columns that differ only in case: {', '.join(dup)}")
    return table.rename_columns(lower)


_CANONICAL_INT = re.compile(r"^-?(0|[1-9][0-9]*)$")


def _csv_table(stream_of, path, id_column: str | None) -> pa.Table:
    """A CSV catalogue; id-like columns (``ID_CANDIDATES``, ``--id_column``, brickname) are read as text, so
    that "0001" stays "0001", and become integers only when every value is written as a plain integer."""
    import pyarrow.csv as pcsv

    names = pcsv.read_csv(stream_of(), read_options=pcsv.ReadOptions(block_size=1 << 16)).column_names
    idlike = [c for c in names if c.lower() in (*ID_CANDIDATES, "brickname")
              or (id_column is not None and c.lower() == id_column.lower())]
    table = pcsv.read_csv(stream_of(), convert_options=pcsv.ConvertOptions(
        column_types={c: pa.string() for c in idlike}, strings_can_be_null=False))
    for c in idlike:
        col = table.column(c)
        if c.lower() != "brickname" and col.null_count == 0 and all(
                _CANONICAL_INT.match(v) for v in col.to_pylist()) and table.num_rows:
            table = table.set_column(table.column_names.index(c), c, pc.cast(col, pa.int64()))
    return table


def read_catalog(path: str, id_column: str | None = None) -> pa.Table:
    """Parquet, CSV or FITS table (by the file name's ending), local or a pyarrow URI such as s3://; column
    names in lower case (``normalise_columns``)."""
    name = str(path).split("?")[0].lower()
    if "://" not in str(path) and not Path(path).exists():
        raise DHSError(f"catalogue {path} does not exist")
    if "://" not in str(path) and Path(path).is_dir():
        raise DHSError(f"catalogue {path} is a directory; give a table file")
    blob = _open_bytes(str(path))
    table = None
    try:
        if name.endswith((".parquet", ".pq")):
            table = pq.read_table(pa.BufferReader(blob))
        elif name.endswith((".csv", ".csv.gz")):
            def stream_of():
                stream = pa.BufferReader(blob)
                return pa.CompressedInputStream(stream, "gzip") if name.endswith(".gz") else stream

            table = _csv_table(stream_of, path, id_column)
    except DHSError:
        raise
    except Exception as exc:
        raise DHSError(f"catalogue {path} is not readable ({type(exc).__name__}: {exc})") from None
    if table is None and name.endswith((".fits", ".fit", ".fits.gz", ".fit.gz")):
        if name.endswith(".gz"):
            import gzip

            blob = gzip.decompress(blob)
        table = _fits_table(blob, path)
    if table is None:
        raise DHSError(f"catalogue {path}: unknown format (expected .parquet, .csv or .fits)")
    return normalise_columns(table, path)


ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0


def _find_column(names, wanted: str):
    """The column called ``wanted`` case-insensitively, optionally with a unit suffix ('RA [deg]')."""
    for name in names:
        base = name.split("[")[0].strip().lower()
        if base == wanted:
            return name
    return None


def lenscat_catalogue() -> tuple[Path, str]:
    """Path and version of the catalogue CSV that the installed lenscat wheel ships (every entry, all
    gradings). Found through the distribution's metadata, without importing lenscat: its ``__init__``
    imports ligo.skymap for GW-skymap crossmatching, which is why lenscat is installed with --no-deps."""
    from importlib import metadata

    try:
        dist = metadata.distribution("lenscat")
    except metadata.PackageNotFoundError:
        raise DHSError("lenscat is not installed (pip install --no-deps lenscat==1.1.3), or pass --known_lenses "
                       "FILE") from None
    path = Path(dist.locate_file("lenscat/data/catalog.csv"))
    if not path.is_file():
        raise DHSError(f"lenscat {dist.version} ships no catalogue at {path}")
    return path, dist.version


def read_known_lenses(path=None):
    """Known lenses as a DataFrame with ``ra``, ``dec`` (degrees, finite rows only) and, where the catalogue has
    them, ``name`` and ``grading``: the ``lenscat`` catalogue by default (~33k lenses and candidates,
    ``RA [deg]``/``DEC [deg]``), else a CSV or parquet file with ra/dec columns in degrees."""
    import pandas as pd

    if path is None:
        path, version = lenscat_catalogue()
        source = f"lenscat {version}"
    else:
        path = Path(path)
        if not path.exists():
            raise DHSError(f"known-lens catalogue {path} does not exist")
        source = str(path)
    try:
        df = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as exc:
        raise DHSError(f"known-lens catalogue {path} cannot be read ({exc.__class__.__name__})") from None
    ra_col, dec_col = _find_column(df.columns, "ra"), _find_column(df.columns, "dec")
    if ra_col is None or dec_col is None:
        raise DHSError(f"known-lens catalogue {path} has no ra/dec columns (has: {','.join(map(str, df.columns))})")
    try:
        ra, dec = df[ra_col].to_numpy(np.float64), df[dec_col].to_numpy(np.float64)
    except (TypeError, ValueError):
        raise DHSError(f"known-lens catalogue {path}: ra/dec are not numbers in degrees") from None
    good = np.isfinite(ra) & np.isfinite(dec)
    if good.any() and (np.abs(dec[good]).max() > 90 or ra[good].min() < -360 or ra[good].max() > 360):
        raise DHSError(f"known-lens catalogue {source}: ra/dec out of range for degrees")
    if not good.all():
        log.warning("known-lens catalogue %s: %d rows without ra/dec ignored", source, int((~good).sum()))
    log.info("known lenses: %d positions from %s", int(good.sum()), source)
    out = pd.DataFrame({"ra": ra[good], "dec": dec[good]})
    for want in ("name", "grading"):
        col = _find_column(df.columns, want)
        if col is not None:
            out[want] = df[col].to_numpy()[good]
    return out


def load_known_lenses(path=None) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of known lenses (``read_known_lenses``)."""
    df = read_known_lenses(path)
    return df["ra"].to_numpy(np.float64), df["dec"].to_numpy(np.float64)


class KnownLensIndex:
    """Nearest-neighbour search on the sphere (sklearn BallTree, haversine metric, radians)."""

    def __init__(self, ra_deg, dec_deg):
        from sklearn.neighbors import BallTree

        self.size = int(np.size(ra_deg))
        self.tree = BallTree(_latlon(ra_deg, dec_deg), metric="haversine") if self.size else None

    def near(self, ra_deg, dec_deg, radius_arcsec: float) -> np.ndarray:
        """Boolean mask: within ``radius_arcsec`` (inclusive) of any known lens."""
        ra_deg = np.asarray(ra_deg, np.float64)
        if self.tree is None or radius_arcsec <= 0 or ra_deg.size == 0:
            return np.zeros(ra_deg.shape, bool)
        dist, _ = self.tree.query(_latlon(ra_deg, dec_deg), k=1)
        return dist[:, 0] * ARCSEC_PER_RAD <= radius_arcsec


def _latlon(ra_deg, dec_deg) -> np.ndarray:
    return np.radians(np.column_stack([np.asarray(dec_deg, np.float64), np.asarray(ra_deg, np.float64)]))
