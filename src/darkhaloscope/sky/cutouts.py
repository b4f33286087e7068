"""Phase 3 on the real sky (``dhs cutouts``): grz cutouts of a catalogue from the Legacy Surveys viewer,
written as a Phase 4c-contract dataset that ``dhs infer``, ``dhs recall`` and host injection read.

Input: a catalogue (parquet, CSV or FITS table; a local path or an ``s3://`` / other pyarrow URI) with
``ra``, ``dec`` (deg), ``psfsize_g/r/z`` (PSF FWHM, arcsec) and ``psfdepth_g/r/z`` as in the DR10
Tractor and sweep files: an inverse variance of the point-source flux, 1/nanomaggy^2. It is converted
to the project's 5-sigma AB depth with ``contract.depth_from_tractor_ivar`` (the input values are kept as
``psfdepth_ivar_*``). Optional ``brickname``; an id column of any type (``--id_column``) becomes
``task_id``, unchanged. Every other column of the catalogue is carried through (e.g. a lens ``grade``,
the Tractor ``shape_e1``/``shape_e2``).

Fetching: ``<base>/viewer/cutout.fits?ra=..&dec=..&size=64&layer=ls-dr10&pixscale=0.262&bands=grz``
(a FITS cube (3, 64, 64), nanomaggies, g, r, z). At most ``--concurrency`` requests at a time; timeouts,
dropped connections, truncated bodies, HTTP 429 and 5xx are retried with exponential backoff and jitter
(a 429's or 503's ``Retry-After`` is honoured, up to ``--max_retry_after`` s). Every FITS answer that
parses is cached, one file per position, written to a temporary name and renamed (a killed job leaves no
half file), so a rerun fetches only what is missing; answers that failed are not cached and are tried again
on the next run.

Output (``--out_dir``): ``region_split=<split>/part-00000.parquet`` for train, val and test, one row per
catalogue row, in catalogue order: a row is never dropped. A cutout that could not be fetched, or that has
the wrong shape, non-finite pixels or a band that is entirely zero (outside the DR10 footprint in that
band), has ``cutout_ok = 0``, a null ``stamp_npz`` and a ``cutout_reason``; so do rows whose position or
observing conditions are unusable (they are not fetched; a row without a position has a null
``region_id`` and the split that ``region_split_of`` gives region -1). ``region_id`` is the equal-area sky cell of the
position and ``region_split`` is derived from it exactly as ``dhs manifest`` does
(``draws.sky_cell`` + ``draws.region_split_of``), so a host and a simulated task in the same patch
of sky land in the same split. ``_failures.csv`` (ignored by parquet readers: leading underscore) lists
every row with ``cutout_ok = 0`` and its reason. The run stops with an error, writing nothing, when more
than ``--max_fetch_fail_frac`` of the rows could not be fetched at all (service down): rerun to resume.
"""

from __future__ import annotations

import argparse
import email.utils
import io
import json
import os
import random
import shutil
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from darkhaloscope.stamps.contract import (BANDS, CONDITION_COLUMNS, PIXEL_SCALE_ARCSEC, SPLITS, STAMP_SIZE,
                                           depth_from_tractor_ivar, encode_stamp)
from darkhaloscope.errors import DHSError

DEFAULT_BASE_URL = "https://www.legacysurvey.org"
LAYER = "ls-dr10"
ID_CANDIDATES = ("task_id", "id", "objid", "name")
USER_AGENT = "darkhaloscope-dhs-cutouts/0.1 (bounded concurrency, honours Retry-After)"
ROW_GROUP = 256
# Reasons of rows whose cutout could not be fetched at all (as opposed to a fetched cutout judged unusable).
FETCH_FAILURE_PREFIX = "fetch_failed"


# ----------------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------------

def _open_bytes(path: str) -> bytes:
    from darkhaloscope.stamps.dataset import filesystem as _filesystem

    fs, p = _filesystem(path)
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
        if values.dtype.kind == "S":  # FITS strings are bytes, right-padded
            cols[name] = pa.array([v.decode().rstrip() for v in values], pa.string())
        elif values.dtype.kind == "U":
            cols[name] = pa.array([v.rstrip() for v in values], pa.string())
        else:
            mask = np.ma.getmaskarray(col) if hasattr(col, "mask") else None
            cols[name] = pa.array(values.astype(values.dtype.newbyteorder("=")), mask=mask)
    return pa.table(cols)


def read_catalog(path: str) -> pa.Table:
    """Parquet, CSV or FITS table (by the file name's ending), local or a pyarrow URI such as s3://."""
    name = str(path).split("?")[0].lower()
    if "://" not in str(path) and not Path(path).exists():
        raise DHSError(f"catalogue {path} does not exist")
    blob = _open_bytes(str(path))
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(pa.BufferReader(blob))
        if name.endswith((".csv", ".csv.gz")):
            import pyarrow.csv as pcsv

            stream = pa.BufferReader(blob)
            if name.endswith(".gz"):
                stream = pa.CompressedInputStream(stream, "gzip")
            return pcsv.read_csv(stream)
    except DHSError:
        raise
    except Exception as exc:
        raise DHSError(f"catalogue {path} is not readable ({type(exc).__name__}: {exc})") from None
    if name.endswith((".fits", ".fit", ".fits.gz", ".fit.gz")):
        if name.endswith(".gz"):
            import gzip

            blob = gzip.decompress(blob)
        return _fits_table(blob, path)
    raise DHSError(f"catalogue {path}: unknown format (expected .parquet, .csv or .fits)")


def _floats(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise DHSError(f"catalogue column {name} is {col.type}, expected numbers")
    return col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def resolve_id_column(table: pa.Table, id_column: str | None) -> str | None:
    """The id column (``--id_column`` or the first of ID_CANDIDATES present); None: the row number."""
    if id_column is not None:
        if id_column not in table.column_names:
            raise DHSError(f"catalogue has no column '{id_column}' (--id_column); columns: "
                           f"{', '.join(table.column_names)}")
        return id_column
    return next((c for c in ID_CANDIDATES if c in table.column_names), None)


@dataclass
class Catalog:
    table: pa.Table          # the catalogue as read (every column)
    task_id: pa.Array        # ids of any type, unique, non-null
    ra: np.ndarray
    dec: np.ndarray
    psfsize: np.ndarray      # (N, 3) FWHM arcsec
    psfdepth_ivar: np.ndarray  # (N, 3) 1/nmgy^2 as in the catalogue
    psfdepth: np.ndarray     # (N, 3) 5-sigma AB mag (NaN where the ivar is not > 0)
    brickname: np.ndarray    # (N,) str
    skip_reason: np.ndarray  # (N,) object: None, or why the row is not fetched


def load_catalog(path: str, id_column: str | None = None) -> Catalog:
    table = read_catalog(path)
    missing = [c for c in ("ra", "dec", *CONDITION_COLUMNS) if c not in table.column_names]
    if missing:
        raise DHSError(f"catalogue {path} lacks column(s) {', '.join(missing)} (psfdepth_* as Tractor inverse "
                       "variances, 1/nanomaggy^2)")
    if table.num_rows == 0:
        raise DHSError(f"catalogue {path} has no rows")
    id_col = resolve_id_column(table, id_column)
    if id_col is None:
        ids = pa.array(np.arange(table.num_rows, dtype=np.int64))
    else:
        ids = table.column(id_col).combine_chunks()
        if ids.null_count:
            raise DHSError(f"catalogue id column '{id_col}' has {ids.null_count} null value(s)")
        if pa.types.is_dictionary(ids.type):
            ids = ids.dictionary_decode()
        if len(pc.unique(ids)) != len(ids):
            raise DHSError(f"catalogue id column '{id_col}' repeats values; ids must be unique")
    ra, dec = _floats(table, "ra"), _floats(table, "dec")
    psfsize = np.stack([_floats(table, f"psfsize_{b}") for b in BANDS], axis=1)
    ivar = np.stack([_floats(table, f"psfdepth_{b}") for b in BANDS], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(ivar > 0, depth_from_tractor_ivar(np.where(ivar > 0, ivar, 1.0)), np.nan)
    if "brickname" in table.column_names:
        brick = np.array([str(b) if b is not None else "" for b in table.column("brickname").to_pylist()], object)
    else:
        from darkhaloscope.simulation.draws import brickname_of

        ok = np.isfinite(ra) & np.isfinite(dec)
        brick = np.full(len(ra), "", object)
        if ok.any():
            brick[ok] = brickname_of(ra[ok], dec[ok])
    reason = np.full(len(ra), None, object)
    for i in range(len(ra)):
        if not (np.isfinite(ra[i]) and np.isfinite(dec[i]) and -90.0 <= dec[i] <= 90.0):
            reason[i] = "bad_position"
            continue
        bad = [f"psfsize_{b}" for j, b in enumerate(BANDS) if not (np.isfinite(psfsize[i, j]) and psfsize[i, j] > 0)]
        bad += [f"psfdepth_{b}" for j, b in enumerate(BANDS) if not np.isfinite(depth[i, j])]
        if bad:
            reason[i] = "no_conditions:" + ",".join(bad)
    return Catalog(table, ids, np.mod(ra, 360.0), dec, psfsize, ivar, depth, brick, reason)


# ----------------------------------------------------------------------------------------------------
# Fetching, with retries and a cache
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FetchPolicy:
    base_url: str = DEFAULT_BASE_URL
    concurrency: int = 4
    timeout: float = 30.0          # seconds, connect and read
    retries: int = 6               # attempts after the first
    backoff: float = 1.0           # first wait (s); doubles per attempt, +-50% jitter
    max_backoff: float = 120.0
    max_retry_after: float = 600.0

    def check(self) -> FetchPolicy:
        if not str(self.base_url).startswith(("http://", "https://")):
            raise DHSError(f"--base_url must start with http:// or https://, got '{self.base_url}'")
        if self.concurrency < 1:
            raise DHSError(f"--concurrency must be >= 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise DHSError(f"--timeout must be > 0 s, got {self.timeout}")
        if self.retries < 0:
            raise DHSError(f"--retries must be >= 0, got {self.retries}")
        if self.backoff < 0:
            raise DHSError(f"--backoff must be >= 0 s, got {self.backoff}")
        return self


def cutout_url(base_url: str) -> str:
    return base_url.rstrip("/") + "/viewer/cutout.fits"


def cutout_params(ra: float, dec: float) -> dict:
    return {"ra": f"{ra:.7f}", "dec": f"{dec:.7f}", "size": STAMP_SIZE, "layer": LAYER,
            "pixscale": PIXEL_SCALE_ARCSEC, "bands": "".join(BANDS)}


def cache_path(cache_dir: Path, ra: float, dec: float) -> Path:
    """One file per position (7 decimals, ~0.4 mas), under a directory per integer degree of RA."""
    sub = f"{LAYER}_{STAMP_SIZE}_{PIXEL_SCALE_ARCSEC}_{''.join(BANDS)}"
    return Path(cache_dir) / sub / f"{int(ra) % 360:03d}" / f"{ra:.7f}{dec:+.7f}.fits"


def parse_fits(body: bytes) -> np.ndarray:
    """FITS bytes -> the primary image as float32; raises ValueError for a truncated or corrupt file
    (astropy only warns about those, so its warnings are made errors here)."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fits.open(io.BytesIO(body), memmap=False) as hdul:
            data = hdul[0].data
            if data is None and len(hdul) > 1:
                data = hdul[1].data
            if data is None:
                raise ValueError("FITS file has no image data")
            return np.array(data, dtype=np.float32)


def judge(image: np.ndarray) -> str | None:
    """None if the cutout is usable, else why not."""
    if image.shape != (len(BANDS), STAMP_SIZE, STAMP_SIZE):
        return f"wrong_shape:{'x'.join(map(str, image.shape))}"
    if not np.isfinite(image).all():
        return "non_finite_pixels"
    zero = [b for j, b in enumerate(BANDS) if not np.any(image[j])]
    if len(zero) == len(BANDS):
        return "all_zero (outside the footprint)"
    if zero:
        return "no_data_in_band:" + ",".join(zero)
    return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class Fetcher:
    """Fetches cutouts into the cache. Thread-safe; one requests.Session per thread."""

    def __init__(self, policy: FetchPolicy, cache_dir: Path, seed: int = 0):
        import requests

        self.requests = requests
        self.policy = policy
        self.cache_dir = Path(cache_dir)
        self.url = cutout_url(policy.base_url)
        self._local = threading.local()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.n_requests = 0

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self.requests.Session()
            s.headers["User-Agent"] = USER_AGENT
        return s

    def _wait(self, attempt: int, retry_after: float | None) -> float:
        p = self.policy
        if retry_after is not None:
            return min(retry_after, p.max_retry_after)
        with self._lock:
            jitter = 0.5 + self._rng.random()
        return min(p.backoff * 2.0**attempt * jitter, p.max_backoff)

    def fetch(self, ra: float, dec: float) -> str | None:
        """Make sure the cutout of (ra, dec) is in the cache; None on success (or already cached), else
        the reason of the last failure after all retries."""
        path = cache_path(self.cache_dir, ra, dec)
        if path.exists():
            return None
        req = self.requests
        last = "unknown"
        for attempt in range(self.policy.retries + 1):
            retry_after = None
            try:
                with self._lock:
                    self.n_requests += 1
                resp = self._session().get(self.url, params=cutout_params(ra, dec), timeout=self.policy.timeout)
                status = resp.status_code
                if status == 200:
                    body = resp.content
                    try:
                        parse_fits(body)
                    except Exception as exc:  # truncated or corrupt body: transient, fetch again
                        last = f"bad_fits ({type(exc).__name__})"
                    else:
                        _write_atomic(path, body)
                        return None
                elif status == 429 or status >= 500:
                    last = f"http_{status}"
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                else:  # 4xx other than 429: asking again will not help
                    return f"{FETCH_FAILURE_PREFIX}:http_{status}"
            except req.exceptions.Timeout:
                last = "timeout"
            except (req.exceptions.ConnectionError, req.exceptions.ChunkedEncodingError) as exc:
                last = f"connection ({type(exc).__name__})"
            if attempt < self.policy.retries:
                time.sleep(self._wait(attempt, retry_after))
        return f"{FETCH_FAILURE_PREFIX}:{last} after {self.policy.retries + 1} tries"


def _write_atomic(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_all(cat: Catalog, fetcher: Fetcher, progress: bool = True) -> np.ndarray:
    """Fetch every usable row's cutout (bounded concurrency); (N,) object array of fetch failure reasons."""
    from tqdm import tqdm

    reasons = np.full(len(cat.ra), None, object)
    todo = [i for i in range(len(cat.ra)) if cat.skip_reason[i] is None]
    cached = sum(cache_path(fetcher.cache_dir, cat.ra[i], cat.dec[i]).exists() for i in todo)
    bar = tqdm(total=len(todo), initial=0, unit="cutout", desc="dhs cutouts", disable=not progress, file=sys.stderr)
    bar.set_postfix(cached=cached, failed=0)
    n_failed = 0
    with ThreadPoolExecutor(max_workers=fetcher.policy.concurrency, thread_name_prefix="dhs-cutouts") as pool:
        futures = {pool.submit(fetcher.fetch, cat.ra[i], cat.dec[i]): i for i in todo}
        try:
            for fut in as_completed(futures):
                reason = fut.result()
                reasons[futures[fut]] = reason
                n_failed += reason is not None
                bar.update(1)
                if reason is not None:
                    bar.set_postfix(cached=cached, failed=n_failed)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        finally:
            bar.close()
    return reasons


# ----------------------------------------------------------------------------------------------------
# The output dataset
# ----------------------------------------------------------------------------------------------------

def _extra_columns(table: pa.Table, id_col: str | None) -> list[str]:
    own = {"ra", "dec", "brickname", "region_id", "region_split", "is_control", "cutout_ok", "cutout_reason",
           "stamp_npz", "task_id", *CONDITION_COLUMNS}
    return [c for c in table.column_names if c not in own and c != id_col]


def assemble(cat: Catalog, fetch_reasons: np.ndarray, cache_dir: Path, out_dir: Path, split_fracs,
             is_control: int, id_col: str | None, chunk: int = 1024) -> dict:
    """Write the dataset (to a temporary sibling directory, renamed at the end); returns a summary."""
    from darkhaloscope.simulation.draws import region_split_of, sky_cell

    out_dir = Path(out_dir)
    n = len(cat.ra)
    good = np.isfinite(cat.ra) & np.isfinite(cat.dec) & (np.abs(cat.dec) <= 90.0)
    region_id = np.full(n, -1, np.int64)  # -1 (written as null): a row without a usable position
    region_id[good] = sky_cell(cat.ra[good], cat.dec[good])
    split = region_split_of(region_id, split_fracs).astype(str)
    extras = _extra_columns(cat.table, id_col)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    reasons = np.full(n, None, object)
    try:
        writers = {}
        for s in SPLITS:
            (tmp_dir / f"region_split={s}").mkdir(parents=True)
        schema = None
        for lo in range(0, n, chunk):
            sel = np.arange(lo, min(lo + chunk, n))
            blobs = []
            for i in sel:
                reason = cat.skip_reason[i] or fetch_reasons[i]
                blob = None
                if reason is None:
                    try:
                        image = parse_fits(cache_path(cache_dir, cat.ra[i], cat.dec[i]).read_bytes())
                    except Exception as exc:  # a cache file damaged after it was written
                        reason = f"bad_cache_file ({type(exc).__name__})"
                    else:
                        reason = judge(image)
                        if reason is None:
                            blob = encode_stamp(image)
                reasons[i] = reason
                blobs.append(blob)
            ok = np.array([r is None for r in reasons[sel]])
            cols = {
                "task_id": cat.task_id.take(pa.array(sel)),
                "ra": pa.array(cat.ra[sel]), "dec": pa.array(cat.dec[sel]),
                "brickname": pa.array(list(cat.brickname[sel]), pa.string()),
                "region_id": pa.array(region_id[sel], pa.int64(), mask=region_id[sel] < 0),
                "is_control": pa.array(np.full(len(sel), is_control, np.int32)),
                "cutout_ok": pa.array(ok.astype(np.int32)),
                "cutout_reason": pa.array(list(reasons[sel]), pa.string()),
                "stamp_npz": pa.array(blobs, pa.binary()),
            }
            for j, b in enumerate(BANDS):
                cols[f"psfsize_{b}"] = pa.array(cat.psfsize[sel, j], from_pandas=True)
            for j, b in enumerate(BANDS):
                cols[f"psfdepth_{b}"] = pa.array(cat.psfdepth[sel, j], from_pandas=True)
            for j, b in enumerate(BANDS):
                cols[f"psfdepth_ivar_{b}"] = pa.array(cat.psfdepth_ivar[sel, j], from_pandas=True)
            for c in extras:
                cols[c] = cat.table.column(c).take(pa.array(sel))
            table = pa.table(cols)
            if schema is None:
                schema = table.schema
                for s in SPLITS:
                    writers[s] = pq.ParquetWriter(tmp_dir / f"region_split={s}" / "part-00000.parquet", schema,
                                                  compression="zstd")
            table = table.cast(schema)
            for s in SPLITS:
                keep = np.flatnonzero(split[sel] == s)
                if len(keep):
                    writers[s].write_table(table.take(pa.array(keep)), row_group_size=ROW_GROUP)
        for w in writers.values():
            w.close()
        _write_failures(tmp_dir / "_failures.csv", cat, reasons)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            key = r.split(" after ")[0]
            counts[key] = counts.get(key, 0) + 1
    return {"n_rows": n, "n_ok": int(sum(r is None for r in reasons)),
            "splits": {s: int((split == s).sum()) for s in SPLITS}, "failed_by_reason": counts}


def _write_failures(path: Path, cat: Catalog, reasons: np.ndarray) -> None:
    import pyarrow.csv as pcsv

    bad = np.array([i for i, r in enumerate(reasons) if r is not None], np.int64)
    table = pa.table({"task_id": cat.task_id.take(pa.array(bad, pa.int64())),
                      "ra": pa.array(cat.ra[bad]), "dec": pa.array(cat.dec[bad]),
                      "cutout_reason": pa.array(list(reasons[bad]), pa.string())})
    pcsv.write_csv(table, path)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = FetchPolicy()
    parser.add_argument("--catalog", required=True, help="catalogue: .parquet, .csv or .fits; local or s3://")
    parser.add_argument("--out_dir", required=True, help="output dataset directory (region_split=<split>/...)")
    parser.add_argument("--base_url", default=d.base_url, help="cutout service root (…/viewer/cutout.fits is added)")
    parser.add_argument("--id_column", default=None,
                        help=f"catalogue id column, any type (default: the first of {', '.join(ID_CANDIDATES)}; "
                             "else the row number)")
    parser.add_argument("--cache_dir", default=None, help="FITS cache (default: <out_dir>.cache, beside the output)")
    parser.add_argument("--label", choices=("control", "lens"), default="control",
                        help="is_control of every row: 1 for 'control' (hosts, parent sample), 0 for 'lens' "
                             "(known lenses)")
    parser.add_argument("--split_fracs", default="0.7,0.15,0.15",
                        help="train,val,test fractions of sky regions (as dhs manifest)")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight at most")
    parser.add_argument("--timeout", type=float, default=d.timeout, help="seconds per request")
    parser.add_argument("--retries", type=int, default=d.retries, help="retries per cutout after the first try")
    parser.add_argument("--backoff", type=float, default=d.backoff, help="first retry wait (s), doubling")
    parser.add_argument("--max_retry_after", type=float, default=d.max_retry_after,
                        help="cap (s) on a server's Retry-After")
    parser.add_argument("--max_fetch_fail_frac", type=float, default=0.01,
                        help="stop with an error (writing nothing; rerun resumes from the cache) when more "
                             "than this fraction of rows could not be fetched")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from darkhaloscope.simulation.manifest import parse_split_fracs

    policy = FetchPolicy(args.base_url, args.concurrency, args.timeout, args.retries, args.backoff,
                         max_retry_after=args.max_retry_after).check()
    if not 0.0 <= args.max_fetch_fail_frac <= 1.0:
        raise DHSError(f"--max_fetch_fail_frac must be in [0, 1], got {args.max_fetch_fail_frac}")
    split_fracs = parse_split_fracs(args.split_fracs)
    if "://" in str(args.out_dir):
        raise DHSError(f"--out_dir must be a local directory, got {args.out_dir}")
    out_dir = Path(args.out_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_dir.with_name(out_dir.name + ".cache")
    cat = load_catalog(args.catalog, args.id_column)
    id_col = resolve_id_column(cat.table, args.id_column)
    fetcher = Fetcher(policy, cache_dir)
    reasons = fetch_all(cat, fetcher, progress=not args.no_progress)
    failed = [r for r in reasons if r is not None]
    n = len(cat.ra)
    if len(failed) > args.max_fetch_fail_frac * n:
        kinds = sorted({r.split(" after ")[0] for r in failed})
        raise DHSError(f"{len(failed)} of {n} cutouts could not be fetched ({', '.join(kinds)}), above "
                       f"--max_fetch_fail_frac {args.max_fetch_fail_frac}; nothing written, the "
                       f"{n - len(failed)} fetched are cached in {cache_dir}: rerun to fetch the rest")
    summary = assemble(cat, reasons, cache_dir, out_dir, split_fracs, 0 if args.label == "lens" else 1, id_col)
    summary["n_requests"] = fetcher.n_requests
    print(f"cutouts: {summary['n_ok']} of {summary['n_rows']} usable ({fetcher.n_requests} requests), "
          f"train/val/test = {'/'.join(str(summary['splits'][s]) for s in SPLITS)} -> {out_dir}")
    if summary["failed_by_reason"]:
        print("cutout_ok = 0: " + json.dumps(summary["failed_by_reason"], sort_keys=True)
              + f" (listed in {out_dir / '_failures.csv'})")
    return 0
