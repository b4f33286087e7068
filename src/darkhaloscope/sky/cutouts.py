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
every row with ``cutout_ok = 0`` and its reason. Reasons are permanent (``no_coverage:http_404`` and
``no_coverage:all_zero``: outside the footprint, the 404 remembered in the cache; ``partial_coverage``,
``no_data_in_band``, ``wrong_shape``, ``bad_position``, ``no_conditions``) or transient (``fetch_failed:...``).
The run stops with an error, writing nothing, when more than ``--max_fetch_fail_frac`` of the rows failed
transiently (a rerun fetches only those), when no row is usable (a rerun will not help), or after
``--max_consecutive_unreachable`` cutouts in a row could not reach the service. ``--timeout`` bounds each whole
request. Positions outside [0, 360) x [-90, 90], PSF sizes and depths outside ``PSFSIZE_RANGE``/``DEPTH_RANGE``
and depths given as magnitudes are refused, not wrapped. Column names are read in any case (DR10 files spell
them in upper case); a catalogue without conditions takes them from the Tractor files (``--tractor_url``,
sky.tractor).

The output directory is written as a temporary sibling (``.<name>.tmp-<pid>``) holding the marker file
``.dhs-cutouts`` and renamed into place at the end. An existing ``--out_dir`` is replaced only when it is empty
or holds that marker (this command's own earlier output); a non-empty foreign directory, the working directory
or one above it, and an output that holds the catalogue or the cache (or lies inside the cache) are refused
before any fetch. Temporaries of killed runs (marker inside, writer dead) are removed. docs/promises.md.
"""

from __future__ import annotations

import argparse
import email.utils
import io
import json
import os
import queue
import random
import shutil
import sys
import threading
import time
import warnings
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
from darkhaloscope.catalogs import ID_CANDIDATES, read_catalog
from darkhaloscope.io import check_writable_dir, dead_temporaries
from darkhaloscope.simulation.draws import brickname_of, region_split_of, sky_cell
from darkhaloscope.stamps.dataset import MARKER, parts_sha256

DEFAULT_BASE_URL = "https://www.legacysurvey.org"
LAYER = "ls-dr10"
USER_AGENT = "darkhaloscope-dhs-cutouts/0.1 (bounded concurrency, honours Retry-After)"
ROW_GROUP = 256
# Reasons of rows whose cutout could not be fetched (transient: a rerun asks again), as opposed to a permanent
# answer: no coverage (a 404 or an all-zero cutout, outside the footprint) or a fetched cutout judged unusable.
FETCH_FAILURE_PREFIX = "fetch_failed"
NO_COVERAGE_PREFIX = "no_coverage"
# A band with more than this fraction of exactly-zero pixels only partly overlaps the coadds (real sky pixels are
# never exactly zero): the cutout is not usable.
MAX_ZERO_FRAC = 0.01
# Plausible values of the conditions: PSF FWHM (arcsec) and the 5-sigma point-source depth converted from the
# Tractor inverse variance (AB mag). DR10's own span is ~0.6-3 arcsec and ~21-26 mag.
PSFSIZE_RANGE = (0.2, 6.0)
DEPTH_RANGE = (18.0, 28.0)
# Consecutive cutouts that could not reach the service (connection errors, timeouts) after which the run stops.
MAX_CONSECUTIVE_UNREACHABLE = 10


# ----------------------------------------------------------------------------------------------------
# The catalogue (read by darkhaloscope.catalogs.read_catalog)
# ----------------------------------------------------------------------------------------------------

def _floats(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise DHSError(f"catalogue column {name} is {col.type}, expected numbers")
    return col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def resolve_id_column(table: pa.Table, id_column: str | None) -> str | None:
    """The id column (``--id_column`` or the first of ID_CANDIDATES present); None: the row number."""
    if id_column is not None:
        if id_column.lower() not in table.column_names:
            raise DHSError(f"catalogue has no column '{id_column}' (--id_column); columns: "
                           f"{', '.join(table.column_names)}")
        return id_column.lower()
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


def _refuse_outside(values: np.ndarray, ok_range, name: str, path, unit: str, closed_top=True) -> None:
    """One line naming the column, the accepted range and the first offending row; NaN is not checked here."""
    lo, hi = ok_range
    with np.errstate(invalid="ignore"):
        bad = np.isfinite(values) & ((values < lo) | ((values > hi) if closed_top else (values >= hi)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        top = "]" if closed_top else ")"
        raise DHSError(f"catalogue {path}: {name} outside [{lo:g}, {hi:g}{top} {unit} in {int(bad.sum())} row(s) "
                       f"(first: row {i}, {name} = {values[i]:g}); values are refused, not wrapped or clipped")


def check_conditions(psfsize: np.ndarray, ivar: np.ndarray, path) -> None:
    """Refuse conditions in the wrong units: psfdepth given as AB magnitudes instead of Tractor inverse variances
    (then every band's values sit in 15-30, while a real g/r ivar is ~300-3000), and PSF FWHMs or depths outside
    ``PSFSIZE_RANGE``/``DEPTH_RANGE``. Zero, negative and missing values are no coverage (rows not fetched)."""
    with np.errstate(invalid="ignore"):
        pos = np.where(ivar > 0, ivar, np.nan)
    med = np.nanmedian(pos, axis=0) if np.isfinite(pos).any() else np.full(len(BANDS), np.nan)
    if np.isfinite(med[:2]).all() and (15.0 <= med[:2]).all() and (med[:2] <= 30.0).all():
        raise DHSError(f"catalogue {path}: psfdepth_* look like AB magnitudes (median "
                       + ", ".join(f"{b} {m:.2f}" for b, m in zip(BANDS, med))
                       + "); give them as in the Tractor and sweep files: the inverse variance of the point-source "
                       "flux, 1/nanomaggy^2 (DR10 g is ~300-3000)")
    for j, b in enumerate(BANDS):
        size = np.where(psfsize[:, j] > 0, psfsize[:, j], np.nan)
        _refuse_outside(size, PSFSIZE_RANGE, f"psfsize_{b}", path, "arcsec (PSF FWHM)")
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(ivar[:, j] > 0, depth_from_tractor_ivar(np.where(ivar[:, j] > 0, ivar[:, j], 1.0)), np.nan)
        _refuse_outside(depth, DEPTH_RANGE, f"psfdepth_{b} (as a 5-sigma depth)", path, "AB mag")


def load_catalog(path: str, id_column: str | None = None, conditions=None) -> Catalog:
    """The catalogue, checked. ``conditions``: a callable (ra, dec, brickname) -> (psfsize, psfdepth ivar), each
    (N, 3) with NaN where unknown, that supplies the observing conditions when the catalogue has none of the
    ``CONDITION_COLUMNS`` columns (sky.tractor: the release's own Tractor catalogues)."""
    table = read_catalog(path, id_column)
    have = [c for c in CONDITION_COLUMNS if c in table.column_names]
    if conditions is not None and not have and "ra" in table.column_names and "dec" in table.column_names \
            and table.num_rows:
        ra0, dec0 = _floats(table, "ra"), _floats(table, "dec")
        _refuse_outside(ra0, (0.0, 360.0), "ra", path, "deg", closed_top=False)
        _refuse_outside(dec0, (-90.0, 90.0), "dec", path, "deg")
        ok = np.isfinite(ra0) & np.isfinite(dec0)
        bricks = np.full(len(ra0), "", object)
        if "brickname" in table.column_names:
            bricks[:] = [str(b) if b is not None else "" for b in table.column("brickname").to_pylist()]
        need = ok & (bricks == "")
        if need.any():
            bricks[need] = brickname_of(ra0[need], dec0[need])
        size, ivar = conditions(ra0, dec0, bricks)
        for j, b in enumerate(BANDS):
            table = table.append_column(f"psfsize_{b}", pa.array(size[:, j], from_pandas=True))
        for j, b in enumerate(BANDS):
            table = table.append_column(f"psfdepth_{b}", pa.array(ivar[:, j], from_pandas=True))
    missing = [c for c in ("ra", "dec", *CONDITION_COLUMNS) if c not in table.column_names]
    if missing:
        raise DHSError(f"catalogue {path} lacks column(s) {', '.join(missing)} (psfdepth_* as Tractor inverse "
                       "variances, 1/nanomaggy^2; with none of psfsize_*/psfdepth_*, --tractor_url fills them "
                       "from the release's Tractor catalogues)")
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
    _refuse_outside(ra, (0.0, 360.0), "ra", path, "deg", closed_top=False)
    _refuse_outside(dec, (-90.0, 90.0), "dec", path, "deg")
    psfsize = np.stack([_floats(table, f"psfsize_{b}") for b in BANDS], axis=1)
    ivar = np.stack([_floats(table, f"psfdepth_{b}") for b in BANDS], axis=1)
    check_conditions(psfsize, ivar, path)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(ivar > 0, depth_from_tractor_ivar(np.where(ivar > 0, ivar, 1.0)), np.nan)
    if "brickname" in table.column_names:
        brick = np.array([str(b) if b is not None else "" for b in table.column("brickname").to_pylist()], object)
    else:
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
    return Catalog(table, ids, ra, dec, psfsize, ivar, depth, brick, reason)


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
        return f"{NO_COVERAGE_PREFIX}:all_zero"
    if zero:
        return "no_data_in_band:" + ",".join(zero)
    frac = [(b, float(np.mean(image[j] == 0))) for j, b in enumerate(BANDS)]
    if any(f > MAX_ZERO_FRAC for _, f in frac):
        return "partial_coverage:" + ",".join(f"{b}={f:.2f}" for b, f in frac)
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
        self.stop = threading.Event()  # set on Ctrl-C or an unreachable service: no further request starts

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

    def _get(self, url: str, params, timeout: float) -> tuple[int, bytes, str | None]:
        """(status, body, Retry-After) of one request; ``timeout`` bounds the whole request, not each read:
        the body is read in chunks against one deadline (a server dribbling bytes is a timeout)."""
        deadline = time.monotonic() + timeout
        resp = self._session().get(url, params=params, timeout=timeout, stream=True)
        with resp:
            chunks = []
            if resp.status_code == 200:
                # read1: whatever one read of the socket gives (iter_content would wait for a full chunk), so the
                # deadline is checked between the bytes of a dribbling server
                while chunk := resp.raw.read1(1 << 16, decode_content=True):
                    chunks.append(chunk)
                    if time.monotonic() > deadline or self.stop.is_set():
                        raise self.requests.exceptions.Timeout("the whole request took longer than --timeout")
            return resp.status_code, b"".join(chunks), resp.headers.get("Retry-After")

    def fetch(self, ra: float, dec: float) -> str | None:
        """Make sure the cutout of (ra, dec) is in the cache; None on success (or already cached), a
        ``no_coverage`` reason for a 404 (remembered in the cache: permanent), else the reason of the last
        failure after all retries."""
        return self.fetch_url(self.url, cutout_params(ra, dec), cache_path(self.cache_dir, ra, dec), parse_fits)

    def fetch_url(self, url: str, params, path: Path, validate, timeout: float | None = None) -> str | None:
        """``fetch`` of any file: the answer (checked by ``validate``, which raises on a corrupt body) cached at
        ``path``, a 404 remembered beside it as no coverage."""
        if path.exists():
            return None
        if no_coverage_path(path).exists():
            return f"{NO_COVERAGE_PREFIX}:http_404"
        import urllib3

        req = self.requests
        last = "unknown"
        for attempt in range(self.policy.retries + 1):
            if self.stop.is_set():
                return f"{FETCH_FAILURE_PREFIX}:stopped"
            retry_after = None
            try:
                with self._lock:
                    self.n_requests += 1
                status, body, retry_after_header = self._get(url, params, timeout or self.policy.timeout)
                if status == 200:
                    try:
                        validate(body)
                    except Exception as exc:  # truncated or corrupt body: transient, fetch again
                        last = f"bad_fits ({type(exc).__name__})"
                    else:
                        _write_atomic(path, body)
                        return None
                elif status == 429 or status >= 500:
                    last = f"http_{status}"
                    retry_after = _retry_after(retry_after_header)
                elif status == 404:  # no coadd brick overlaps the position: outside the footprint, permanent
                    _write_atomic(no_coverage_path(path), b"404\n")
                    return f"{NO_COVERAGE_PREFIX}:http_404"
                else:  # 4xx other than 404/429: asking again will not help
                    return f"{FETCH_FAILURE_PREFIX}:http_{status}"
            except (req.exceptions.Timeout, urllib3.exceptions.TimeoutError):
                last = "timeout"
            except (req.exceptions.ConnectionError, req.exceptions.ChunkedEncodingError,
                    urllib3.exceptions.HTTPError) as exc:  # urllib3's own: raised by the body reads
                last = f"connection ({type(exc).__name__})"
            if attempt < self.policy.retries:
                self.stop.wait(self._wait(attempt, retry_after))  # returns at once on stop
        return f"{FETCH_FAILURE_PREFIX}:{last} after {self.policy.retries + 1} tries"


def no_coverage_path(path: Path) -> Path:
    """Beside a cutout's cache file: the service answered 404 (no coverage) for that position."""
    return path.with_name(path.stem + ".nocoverage")


def is_transient(reason: str | None) -> bool:
    """A fetch failure that a rerun asks again (timeouts, connections, 429, 5xx); not a permanent answer."""
    return reason is not None and reason.startswith(FETCH_FAILURE_PREFIX)


def _unreachable(reason: str | None) -> bool:
    return is_transient(reason) and any(k in reason for k in ("connection", "timeout"))


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


def fetch_all(cat: Catalog, fetcher: Fetcher, progress: bool = True,
              max_consecutive_unreachable: int = MAX_CONSECUTIVE_UNREACHABLE) -> np.ndarray:
    """Fetch every usable row's cutout (bounded concurrency); (N,) object array of fetch reasons (None: cached).

    The workers are daemon threads fed from a queue (not a ThreadPoolExecutor, whose threads are joined at exit):
    on Ctrl-C the main thread returns at once and a request hanging on the service cannot hold the process. When
    ``max_consecutive_unreachable`` cutouts in a row could not reach the service, the run stops (DHSError)."""
    from tqdm import tqdm

    reasons = np.full(len(cat.ra), None, object)
    todo = [i for i in range(len(cat.ra)) if cat.skip_reason[i] is None]
    cached = sum(cache_path(fetcher.cache_dir, cat.ra[i], cat.dec[i]).exists() for i in todo)
    work: queue.Queue = queue.Queue()
    for i in todo:
        work.put(i)
    done: queue.Queue = queue.Queue()

    def worker():
        while not fetcher.stop.is_set():
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, fetcher.fetch(cat.ra[i], cat.dec[i]), None))
            except BaseException as exc:  # surfaced in the main thread
                done.put((i, None, exc))

    bar = tqdm(total=len(todo), initial=0, unit="cutout", desc="dhs cutouts", disable=not progress, file=sys.stderr)
    bar.set_postfix(cached=cached, failed=0)
    n_failed = streak = 0
    for k in range(min(fetcher.policy.concurrency, len(todo))):
        threading.Thread(target=worker, name=f"dhs-cutouts-{k}", daemon=True).start()
    try:
        for _ in range(len(todo)):
            while True:
                try:
                    i, reason, exc = done.get(timeout=0.2)
                    break
                except queue.Empty:
                    continue
            if exc is not None:
                raise exc
            reasons[i] = reason
            bar.update(1)
            if is_transient(reason):
                n_failed += 1
                bar.set_postfix(cached=cached, failed=n_failed)
            streak = streak + 1 if _unreachable(reason) else 0
            if streak >= max_consecutive_unreachable:
                raise DHSError(f"the cutout service {fetcher.url} could not be reached for {streak} consecutive "
                               f"cutouts (transient: {reason.split(':', 1)[1]}); stopped early, nothing written, the "
                               f"answers so far are cached in {fetcher.cache_dir}: rerun when the service is up")
    finally:
        fetcher.stop.set()
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
             is_control: int, id_col: str | None, chunk: int = 1024, refuse_if_none_usable: bool = False) -> dict:
    """Write the dataset (to a temporary sibling directory, renamed at the end); returns a summary."""
    out_dir = Path(out_dir)
    n = len(cat.ra)
    good = np.isfinite(cat.ra) & np.isfinite(cat.dec) & (np.abs(cat.dec) <= 90.0)
    region_id = np.full(n, -1, np.int64)  # -1 (written as null): a row without a usable position
    region_id[good] = sky_cell(cat.ra[good], cat.dec[good])
    split = region_split_of(region_id, split_fracs).astype(str)
    extras = _extra_columns(cat.table, id_col)
    tmp_dir = _tmp_dir(out_dir)
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    reasons = np.full(n, None, object)
    try:
        writers = {}
        tmp_dir.mkdir(parents=True)
        (tmp_dir / MARKER).write_text(json.dumps({"command": "dhs cutouts", "n_rows": n}) + "\n")
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
        if refuse_if_none_usable and all(r is not None for r in reasons):
            counts = _count_reasons(reasons)
            raise DHSError(f"no usable cutout: {n} of {n} rows unusable ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
                           f"nothing written; {explain(counts)}: check the positions against the DR10 footprint")
        _write_failures(tmp_dir / "_failures.csv", cat, reasons)
        (tmp_dir / MARKER).write_text(json.dumps({"command": "dhs cutouts", "n_rows": n,
                                                  "sha256": parts_sha256(tmp_dir)}) + "\n")
        _replace_output(tmp_dir, out_dir)
    except OSError as exc:  # a full or failing disk: one line, the temporary is removed below
        raise DHSError(f"--out_dir {out_dir} could not be written: {exc.strerror or type(exc).__name__}") from None
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    counts = _count_reasons(reasons)
    return {"n_rows": n, "n_ok": int(sum(r is None for r in reasons)),
            "splits": {s: int((split == s).sum()) for s in SPLITS}, "failed_by_reason": counts}


# ----------------------------------------------------------------------------------------------------
# The output directory: replaced as a whole, and only when it is this command's own
# ----------------------------------------------------------------------------------------------------

def _tmp_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")


def _trash_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.old.tmp-{os.getpid()}")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _is_own(path: Path) -> bool:
    return (path / MARKER).is_file()


def remove_stale_output_temporaries(out_dir: Path) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` (being written) and ``.<name>.old.tmp-<pid>`` (being replaced)
    directories beside ``out_dir`` that a killed run of this command left: the writer is dead and the directory
    holds the marker. Anything else of that name is left alone."""
    removed = []
    for p in dead_temporaries(out_dir, (out_dir.name, out_dir.name + ".old")):
        if p.is_dir() and _is_own(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_output_dir(out_arg: str, catalog: str, cache_dir: Path) -> Path:
    """The absolute output directory, or a one-line DHSError before any fetch: the directory is replaced as a
    whole at the end, so it must not be (or hold) the working directory, the catalogue or the cache, and an
    existing non-empty directory is replaced only if it is this command's own earlier output (``MARKER``)."""
    if "://" in str(out_arg):
        raise DHSError(f"--out_dir must be a local directory, got {out_arg}")
    out = Path(out_arg).resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, out):
        raise DHSError(f"--out_dir {out_arg} is the working directory or holds it ({out}); the output directory is "
                       "replaced as a whole: name a new subdirectory")
    if out.exists() and not out.is_dir():
        raise DHSError(f"--out_dir {out_arg} exists and is not a directory")
    if "://" not in str(catalog) and _inside(Path(catalog).resolve(), out):
        raise DHSError(f"--out_dir {out_arg} holds the input catalogue {catalog}: refusing to replace it")
    cache = Path(cache_dir).resolve()
    if _inside(cache, out) or _inside(out, cache):
        raise DHSError(f"--out_dir {out_arg} and --cache_dir {cache_dir} overlap; the output directory is replaced "
                       "as a whole, which would delete the cache: keep them apart")
    if out.is_dir() and not _is_own(out) and any(out.iterdir()):
        raise DHSError(f"--out_dir {out_arg} is a non-empty directory that dhs cutouts did not write (no {MARKER} "
                       "in it): refusing to replace it; name a new or empty directory")
    remove_stale_output_temporaries(out)
    probe = _tmp_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir(exist_ok=True)
        (probe / MARKER).write_text("{}\n")
    except OSError as exc:
        raise DHSError(f"--out_dir {out_arg} cannot be written: {exc.strerror or type(exc).__name__}") from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    check_writable_dir(cache, "--cache_dir")
    return out


def _replace_output(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp_dir`` onto ``out_dir``. An existing ``out_dir`` is renamed aside first (and
    then deleted) only when it is empty or this command's own output; a foreign one that appeared during the
    run is refused."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not _is_own(out_dir):
            raise DHSError(f"--out_dir {out_dir} was filled by something else during the run (no {MARKER}): "
                           "refusing to replace it")
        trash = _trash_dir(out_dir)
        os.replace(out_dir, trash)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return
    if out_dir.is_dir():
        out_dir.rmdir()
    os.replace(tmp_dir, out_dir)


def _count_reasons(reasons) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            key = r.split(" after ")[0].split(":")[0] if r.startswith("partial_coverage") else r.split(" after ")[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


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
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds per request, the whole request (connect, headers and body)")
    parser.add_argument("--retries", type=int, default=d.retries, help="retries per cutout after the first try")
    parser.add_argument("--backoff", type=float, default=d.backoff, help="first retry wait (s), doubling")
    parser.add_argument("--max_retry_after", type=float, default=d.max_retry_after,
                        help="cap (s) on a server's Retry-After")
    parser.add_argument("--max_fetch_fail_frac", type=float, default=0.01,
                        help="stop with an error (writing nothing; rerun resumes from the cache) when more "
                             "than this fraction of rows failed transiently (no_coverage rows do not count)")
    parser.add_argument("--max_consecutive_unreachable", type=int, default=MAX_CONSECUTIVE_UNREACHABLE,
                        help="stop early when this many cutouts in a row could not reach the service")
    parser.add_argument("--tractor_url", default=None,
                        help="when the catalogue has no psfsize_*/psfdepth_* columns: the release's Tractor catalogue "
                             "directory (<url>/<AAA>/tractor-<brick>.fits; DR10: "
                             "https://portal.nersc.gov/cfs/cosmo/data/legacysurvey/dr10/south/tractor); each row "
                             "takes the conditions of the Tractor source nearest to it (sky.tractor)")
    parser.add_argument("--tractor_match_arcsec", type=float, default=1.0,
                        help="largest distance of the matched Tractor source")
    parser.add_argument("--tractor_timeout", type=float, default=600.0,
                        help="seconds per Tractor file request (the whole request; files are tens of MB)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from darkhaloscope.simulation.manifest import parse_split_fracs

    policy = FetchPolicy(args.base_url, args.concurrency, args.timeout, args.retries, args.backoff,
                         max_retry_after=args.max_retry_after).check()
    if not 0.0 <= args.max_fetch_fail_frac <= 1.0:
        raise DHSError(f"--max_fetch_fail_frac must be in [0, 1], got {args.max_fetch_fail_frac}")
    if args.max_consecutive_unreachable < 1:
        raise DHSError(f"--max_consecutive_unreachable must be >= 1, got {args.max_consecutive_unreachable}")
    split_fracs = parse_split_fracs(args.split_fracs)
    if "://" in str(args.out_dir):
        raise DHSError(f"--out_dir must be a local directory, got {args.out_dir}")
    out_abs = Path(args.out_dir).resolve()
    cache_dir = Path(args.cache_dir) if args.cache_dir else out_abs.with_name(out_abs.name + ".cache")
    fetcher = Fetcher(policy, cache_dir)
    conditions = None
    if args.tractor_url:  # the Tractor files are fetched into the cache: the output checks come first
        from darkhaloscope.sky.tractor import TractorConditions

        out_dir = check_output_dir(args.out_dir, args.catalog, cache_dir)
        conditions = TractorConditions(fetcher, args.tractor_url, args.tractor_match_arcsec, args.tractor_timeout)
    cat = load_catalog(args.catalog, args.id_column, conditions)
    if not args.tractor_url:  # a bad catalogue creates nothing
        out_dir = check_output_dir(args.out_dir, args.catalog, cache_dir)
    id_col = resolve_id_column(cat.table, args.id_column)
    reasons = fetch_all(cat, fetcher, progress=not args.no_progress,
                        max_consecutive_unreachable=args.max_consecutive_unreachable)
    failed = [r for r in reasons if is_transient(r)]
    n = len(cat.ra)
    if len(failed) > args.max_fetch_fail_frac * n:
        kinds = sorted({r.split(" after ")[0] for r in failed})
        raise DHSError(f"{len(failed)} of {n} cutouts failed transiently ({', '.join(kinds)}), above "
                       f"--max_fetch_fail_frac {args.max_fetch_fail_frac}; nothing written, every answer so far is "
                       f"cached in {cache_dir}: a rerun fetches only the {len(failed)} that failed")
    summary = assemble(cat, reasons, cache_dir, out_dir, split_fracs, 0 if args.label == "lens" else 1, id_col,
                       refuse_if_none_usable=True)
    summary["n_requests"] = fetcher.n_requests
    print(f"cutouts: {summary['n_ok']} of {summary['n_rows']} usable ({fetcher.n_requests} requests), "
          f"train/val/test = {'/'.join(str(summary['splits'][s]) for s in SPLITS)} -> {out_dir}")
    if summary["failed_by_reason"]:
        print("cutout_ok = 0: " + json.dumps(summary["failed_by_reason"], sort_keys=True)
              + f" (listed in {out_dir / '_failures.csv'}); " + explain(summary["failed_by_reason"]))
    return 0


def explain(counts: dict) -> str:
    """What a rerun will do about each kind of unusable row."""
    transient = sum(v for k, v in counts.items() if k.startswith(FETCH_FAILURE_PREFIX))
    permanent = sum(counts.values()) - transient
    parts = []
    if permanent:
        parts.append(f"{permanent} permanent (no_coverage: outside the footprint; unusable cutouts or conditions): "
                     "a rerun will not change them")
    if transient:
        parts.append(f"{transient} transient fetch failure(s): a rerun asks for these again")
    return "; ".join(parts)
