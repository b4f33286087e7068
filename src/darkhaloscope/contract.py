"""The Phase 4c data contract: column names, stamp encoding, normalisation and the metadata guard.

Everything that both the simulator and the readers (training, inference, audit, evaluation) must agree
on lives here, so that real Phase 4c parquet and simulated parquet are read by the same code.

Units: images are float32 nanomaggies (AB zero point 22.5), 0.262 arcsec/pixel, bands g, r, z.
``psfsize_*`` is a PSF FWHM in arcsec; ``psfdepth_*`` is a 5-sigma point-source depth in AB mag (the
DR10 bricks-table convention; Tractor catalogues store an inverse variance instead, see
``depth_from_tractor_ivar``). ``psf_fwhm_used_*`` is the FWHM of the PSF used to render an injected arc
and is null for controls, which is why it must never be a model input.
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from importlib import resources

import numpy as np

from darkhaloscope.errors import DHSError

BANDS = ("g", "r", "z")
STAMP_SIZE = 64
PIXEL_SCALE_ARCSEC = 0.262
AB_ZEROPOINT = 22.5
STAMP_KEYS = tuple(f"image_{b}" for b in BANDS)

# Columns every reader of a Phase 4c table relies on.
ID_COLUMNS = ("task_id", "ra", "dec", "brickname", "region_id", "region_split")
LABEL_COLUMN = "is_control"  # int: 1 = control (negative), 0 = injected lens (positive)
READ_COLUMNS = ("task_id", "is_control", "cutout_ok", "stamp_npz")
SPLITS = ("train", "val", "test")

# Model inputs must be observing conditions: the same physical meaning for both classes and never
# derived from the injection. This is an allow-list on purpose (a deny-list let leaks through before).
ALLOWED_META_COLUMNS = frozenset(
    [f"psfsize_{b}" for b in BANDS] + [f"psfdepth_{b}" for b in BANDS] + ["ebv", "nexp_g", "nexp_r", "nexp_z"]
)

_LEAK_REASONS = (
    ("psf_fwhm_used_", "is set only for injected positives (null for controls), so it encodes the label"),
    ("src_", "is injection truth of the lensed source"),
    ("lens_", "is injection truth of the lens model"),
    ("arc_", "is measured on the injected arc, which controls do not have"),
    ("theta_e", "is the injected Einstein radius (truth)"),
    ("magnification", "is injection truth"),
    ("shear", "is injection truth"),
    ("is_control", "is the label itself"),
    ("control_kind", "differs between classes by construction"),
)


def check_meta_columns(columns: list[str] | tuple[str, ...]) -> list[str]:
    """Return ``columns`` if every one is an allowed observing-condition column, else raise DHSError."""
    cols = [c.strip() for c in columns if c and c.strip()]
    for col in cols:
        if col in ALLOWED_META_COLUMNS:
            continue
        reason = next((why for prefix, why in _LEAK_REASONS if col.startswith(prefix) or col == prefix), None)
        if reason is None:
            reason = "is not an observing-condition column on the allow-list " + ",".join(sorted(ALLOWED_META_COLUMNS))
        raise DHSError(f"meta column '{col}' refused: it {reason}")
    if len(set(cols)) != len(cols):
        raise DHSError(f"meta columns repeat a name: {','.join(cols)}")
    return cols


def parse_meta_columns(text: str | None) -> list[str]:
    """Parse the seed's ``--meta_cols psfsize_r,psfdepth_r`` form and check it against the allow-list."""
    if not text:
        return []
    return check_meta_columns(text.split(","))


@lru_cache(maxsize=1)
def load_conditions() -> dict:
    """DR10 brick and host-stamp statistics (observing conditions, LRG cuts, injection grids)."""
    with resources.files("darkhaloscope.data").joinpath("dr10_conditions.json").open() as fh:
        return json.load(fh)


def mag_to_nanomaggy(mag):
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - AB_ZEROPOINT))


def depth_from_tractor_ivar(psfdepth_ivar):
    """Tractor ``psfdepth`` (inverse variance, nanomaggy^-2) -> 5-sigma AB magnitude."""
    return AB_ZEROPOINT - 2.5 * np.log10(5.0 / np.sqrt(np.asarray(psfdepth_ivar, dtype=np.float64)))


# ----------------------------------------------------------------------------------------------------
# Stamps
# ----------------------------------------------------------------------------------------------------

def encode_stamp(image: np.ndarray) -> bytes:
    """(3, 64, 64) float image in nanomaggies -> bytes of an .npz with keys image_g, image_r, image_z."""
    image = np.asarray(image, dtype=np.float32)
    if image.shape != (len(BANDS), STAMP_SIZE, STAMP_SIZE):
        raise DHSError(f"stamp has shape {image.shape}, expected (3, {STAMP_SIZE}, {STAMP_SIZE})")
    from darkhaloscope.stampcodec import write_npz  # same archive as np.savez, ~10x cheaper, deterministic

    return write_npz({key: image[i] for i, key in enumerate(STAMP_KEYS)})


def decode_stamp(blob: bytes) -> np.ndarray | None:
    """Bytes of an .npz -> (3, 64, 64) float32, or None if it does not decode, has the wrong shape or is
    not finite (the caller counts such rows as skipped)."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            image = np.stack([np.asarray(npz[key], dtype=np.float32) for key in STAMP_KEYS])
    except Exception:  # any corrupt blob is a skipped row, never a crash
        return None
    if image.shape != (len(BANDS), STAMP_SIZE, STAMP_SIZE) or not np.isfinite(image).all():
        return None
    return image


def decode_stamps(blobs) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch of blobs -> (images (N_ok, 3, 64, 64) float32, ok mask (N,) bool).

    Same result as ``decode_stamp`` per blob; plain ``np.savez`` blobs take a fast parser
    (``stampcodec.read_npz_members``, CRC-checked) and anything else goes through ``np.load``."""
    from darkhaloscope.stampcodec import read_npz_members

    n = len(blobs)
    out = np.empty((n, len(BANDS), STAMP_SIZE, STAMP_SIZE), np.float32)
    ok = np.zeros(n, dtype=bool)
    shape = (STAMP_SIZE, STAMP_SIZE)
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        members = read_npz_members(blob, STAMP_KEYS)
        if members is not None and all(m.shape == shape for m in members):
            for b, m in enumerate(members):
                out[i, b] = m
            ok[i] = True
        else:
            image = decode_stamp(blob)
            if image is not None:
                out[i] = image
                ok[i] = True
    finite = np.isfinite(out.reshape(n, -1)).all(axis=1) if n else ok
    ok &= finite
    return out[ok], ok


_yy, _xx = np.mgrid[:STAMP_SIZE, :STAMP_SIZE]
_centre = (STAMP_SIZE - 1) / 2.0
OUTER_ANNULUS = np.hypot(_xx - _centre, _yy - _centre) > 16.0
NORM_CLIP = 10.0
_NORM_CHUNK = 32
_OUTER_INDEX = np.flatnonzero(OUTER_ANNULUS)


def normalize_stamps(images: np.ndarray) -> np.ndarray:
    """Per stamp and band: subtract the median and divide by 1.4826*MAD of the outer annulus (r > 16 px),
    then clip to +-10. The one normalisation used by training, inference and the audit. Values are
    those of np.median (tests check equality); ``_median_last`` only computes them more cheaply."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and len(images) > _NORM_CHUNK:  # cache-sized chunks: ~2x faster than one pass
        return np.concatenate([normalize_stamps(images[i:i + _NORM_CHUNK])
                               for i in range(0, len(images), _NORM_CHUNK)])
    # (..., 3, K); take() with flat indices gathers ~5x faster than boolean-mask indexing
    outer = images.reshape(*images.shape[:-2], STAMP_SIZE * STAMP_SIZE).take(_OUTER_INDEX, axis=-1)
    med = _median_last(outer)
    mad = _median_last(np.abs(outer - med[..., None])) * np.float32(1.4826)
    mad = np.maximum(mad, np.float32(1e-8))
    out = (images - med[..., None, None]) / mad[..., None, None]
    return np.clip(out, -NORM_CLIP, NORM_CLIP, out=out).astype(np.float32, copy=False)


def _median_last(x: np.ndarray) -> np.ndarray:
    """np.median(x, axis=-1) for float32 (the same values), about 2x cheaper: one partition at the
    upper middle index, and the lower middle value of an even count is the max of the left part."""
    k = x.shape[-1]
    if k == 0 or x.size == 0:
        return np.median(x, axis=-1)
    h = k // 2
    part = np.partition(x, h, axis=-1)
    mid = part[..., h] if k % 2 else (part[..., :h].max(axis=-1) + part[..., h]) / np.float32(2)
    nan = np.isnan(x).any(axis=-1)
    return np.where(nan, np.float32(np.nan), mid).astype(np.float32) if nan.any() else mid.astype(np.float32)


def resolution_psf(psf_fwhm_used_r, psfsize_r) -> np.ndarray:
    """PSF FWHM (arcsec) that theta_E is compared to: the injection's psf_fwhm_used_r, falling back to
    the brick's psfsize_r where the former is null (controls, real data)."""
    used = np.asarray(psf_fwhm_used_r, dtype=np.float64)
    size = np.asarray(psfsize_r, dtype=np.float64)
    return np.where(np.isfinite(used) & (used > 0), used, size)
