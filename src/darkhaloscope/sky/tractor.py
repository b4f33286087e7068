"""Observing conditions of a catalogue that has none (lenscat, the seed's Phase 3 parent file), from the release's
own Tractor catalogues: ``<tractor_url>/<AAA>/tractor-<brick>.fits`` (DR10:
https://portal.nersc.gov/cfs/cosmo/data/legacysurvey/dr10/south/tractor), one file per brick, fetched once into
the cutout cache (``<cache>/tractor/<AAA>/tractor-<brick>.fits``). Each row takes ``psfsize_g/r/z`` and
``psfdepth_g/r/z`` of the nearest Tractor source within ``match_arcsec``; a row without one has NaN conditions
(``no_conditions`` in the output, not fetched).

Why Tractor rather than the cutout service's inverse-variance layer (``&invvar``): the invvar layer gives the
per-pixel noise only, and the PSF-weighted depth needs the PSF size too, which no cutout layer carries; the
Tractor row has both, measured by the pipeline at the source itself (the same numbers the sweep files hold).
The brick is the catalogue's ``brickname`` where it has one, else ``manifest.brickname_of`` of the position.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from darkhaloscope.catalogs import KnownLensIndex
from darkhaloscope.errors import DHSError
from darkhaloscope.stamps.contract import BANDS

COLUMNS = tuple(f"psfsize_{b}" for b in BANDS) + tuple(f"psfdepth_{b}" for b in BANDS)


def tractor_path(cache_dir, brick: str) -> Path:
    return Path(cache_dir) / "tractor" / brick[:3] / f"tractor-{brick}.fits"


def read_tractor(blob: bytes) -> dict:
    """ra, dec and the condition columns of a Tractor FITS table (any case), as float64 arrays."""
    from astropy.table import Table

    t = Table.read(io.BytesIO(blob), format="fits")
    names = {c.lower(): c for c in t.colnames}
    missing = [c for c in ("ra", "dec", *COLUMNS) if c not in names]
    if missing:
        raise ValueError(f"Tractor table lacks {', '.join(missing)}")
    return {c: np.asarray(t[names[c]], np.float64) for c in ("ra", "dec", *COLUMNS)}


class TractorConditions:
    """Callable (ra, dec, bricks) -> (psfsize (N, 3), psfdepth ivar (N, 3)) for ``cutouts.load_catalog``."""

    def __init__(self, fetcher, tractor_url: str, match_arcsec: float = 1.0, timeout: float = 600.0):
        if not str(tractor_url).startswith(("http://", "https://")):
            raise DHSError(f"--tractor_url must start with http:// or https://, got '{tractor_url}'")
        if not match_arcsec > 0:
            raise DHSError(f"--tractor_match_arcsec must be > 0, got {match_arcsec}")
        self.fetcher, self.url, self.radius, self.timeout = fetcher, str(tractor_url).rstrip("/"), match_arcsec, timeout
        self.n_matched = 0

    def __call__(self, ra: np.ndarray, dec: np.ndarray, bricks: np.ndarray):
        n = len(ra)
        size = np.full((n, len(BANDS)), np.nan)
        ivar = np.full((n, len(BANDS)), np.nan)
        failed = []
        for brick in sorted({b for b in bricks if b}):
            path = tractor_path(self.fetcher.cache_dir, brick)
            reason = self.fetcher.fetch_url(f"{self.url}/{brick[:3]}/tractor-{brick}.fits", None, path, read_tractor,
                                            self.timeout)
            if reason is not None:
                if reason.startswith("fetch_failed"):
                    failed.append(f"{brick} ({reason})")
                continue  # no Tractor file for the brick (404): its rows keep no conditions
            t = read_tractor(path.read_bytes())
            rows = np.flatnonzero(bricks == brick)
            if not len(t["ra"]):
                continue
            index = KnownLensIndex(t["ra"], t["dec"])
            near = index.near(ra[rows], dec[rows], self.radius)
            if not near.any():
                continue
            _, j = index.tree.query(np.radians(np.column_stack([dec[rows][near], ra[rows][near]])), k=1)
            j = j[:, 0]
            hit = rows[near]
            for k, b in enumerate(BANDS):
                size[hit, k] = t[f"psfsize_{b}"][j]
                ivar[hit, k] = t[f"psfdepth_{b}"][j]
            self.n_matched += len(hit)
        if failed:
            raise DHSError(f"{len(failed)} Tractor file(s) could not be fetched (transient: "
                           f"{'; '.join(failed[:3])}); nothing written, those fetched are cached: a rerun fetches "
                           "only the rest")
        return size, ivar
