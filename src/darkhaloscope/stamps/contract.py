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
import pyarrow as pa

from darkhaloscope.errors import DHSError
from darkhaloscope.stamps.codec import decode_stored_npz, read_npz_members, write_npz  # np.savez's, ~10x cheaper
from darkhaloscope.stamps.robust import MAD_TO_SIGMA, normalize_annulus

BANDS = ("g", "r", "z")
STAMP_SIZE = 64
PIXEL_SCALE_ARCSEC = 0.262
AB_ZEROPOINT = 22.5
STAMP_KEYS = tuple(f"image_{b}" for b in BANDS)

# Columns every reader of a Phase 4c table relies on (is_control: 1 = control, 0 = injected lens).
READ_COLUMNS = ("task_id", "is_control", "cutout_ok", "stamp_npz")
SPLITS = ("train", "val", "test")

# Model inputs must be observing conditions: the same physical meaning for both classes and never
# derived from the injection. This is an allow-list on purpose (a deny-list let leaks through before).
# The per-band observing conditions every stamp carries (drawn by the manifest, balanced by the audit).
CONDITION_COLUMNS = tuple(f"psfsize_{b}" for b in BANDS) + tuple(f"psfdepth_{b}" for b in BANDS)
# schemas/config.schema.yaml repeats this list as the enum of meta_cols (a test checks that they agree).
ALLOWED_META_COLUMNS = frozenset([*CONDITION_COLUMNS, "ebv", "nexp_g", "nexp_r", "nexp_z"])

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
    return write_npz({key: image[i] for i, key in enumerate(STAMP_KEYS)})


def decode_stamp(blob: bytes) -> np.ndarray | None:
    """Bytes of an .npz -> (3, 64, 64) float32, or None if it does not decode, is not floating point,
    has the wrong shape or is not finite (the caller counts such rows as skipped)."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            members = [np.asarray(npz[key]) for key in STAMP_KEYS]
    except Exception:  # any corrupt blob is a skipped row, never a crash
        return None
    if not all(m.dtype.kind == "f" for m in members):  # integer pixels are not nanomaggies: a bad stamp
        return None
    try:
        image = np.stack(members).astype(np.float32)
    except ValueError:
        return None
    if image.shape != (len(BANDS), STAMP_SIZE, STAMP_SIZE) or not np.isfinite(image).all():
        return None
    return image


def decode_stamps(blobs) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch of blobs (a pyarrow binary column or a sequence of bytes/None) -> (images
    (N_ok, 3, 64, 64) float32, ok mask (N,) bool).

    Same result as ``decode_stamp`` per blob. Stored float32 npz blobs (``np.savez`` / ``encode_stamp``)
    take the compiled batch path (``codec.decode_stored_npz``, CRC-checked); the rest go through
    the per-row parser and then ``np.load``."""
    arrow = isinstance(blobs, (pa.Array, pa.ChunkedArray))
    blobs = blobs if arrow else list(blobs)
    out, status = decode_stored_npz(blobs, STAMP_KEYS, (STAMP_SIZE, STAMP_SIZE))
    ok = status == 1
    retry = np.flatnonzero(status == 0)
    if retry.size:
        rows = [blobs[int(i)].as_py() if arrow else blobs[i] for i in retry]
        shape = (STAMP_SIZE, STAMP_SIZE)
        for i, blob in zip(retry, rows):
            if blob is None:
                continue
            members = read_npz_members(blob, STAMP_KEYS)
            if members is not None and not all(m.dtype.kind == "f" for m in members):
                continue  # integer (or other non-float) pixels are not nanomaggies: a bad stamp
            if members is not None and all(m.shape == shape for m in members):
                image = np.stack(members).astype(np.float32, copy=False)
                image = image if np.isfinite(image).all() else None
            else:
                image = decode_stamp(blob)
            if image is not None:
                out[i] = image
                ok[i] = True
    return (out if ok.all() else out[ok]), ok


_yy, _xx = np.mgrid[:STAMP_SIZE, :STAMP_SIZE]
_centre = (STAMP_SIZE - 1) / 2.0
OUTER_ANNULUS = np.hypot(_xx - _centre, _yy - _centre) > 16.0
NORM_CLIP = 10.0
_OUTER_INDEX = np.flatnonzero(OUTER_ANNULUS)


def annulus_sky(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and noise of each band from the outer annulus, (..., B, 64, 64) -> two (..., B) arrays:
    the median and MAD_TO_SIGMA x MAD, the statistics ``normalize_stamps`` divides by (there compiled,
    with a floor of 1e-8). For displays of a few stamps (the report's colour composites)."""
    outer = np.asarray(images)[..., OUTER_ANNULUS]
    sky = np.median(outer, axis=-1)
    return sky, MAD_TO_SIGMA * np.median(np.abs(outer - sky[..., None]), axis=-1)


def normalize_stamps(images: np.ndarray, symmetries: np.ndarray | None = None, out: np.ndarray | None = None,
                     clip: float | None = NORM_CLIP) -> np.ndarray:
    """Per stamp and band: subtract the median and divide by 1.4826*MAD of the outer annulus (r > 16 px),
    then clip to +-``clip`` (None: no clip). The one normalisation used by training, inference and the audit;
    (..., 3, 64, 64) float -> float32 of the same shape. The data stream keeps the values unclipped and the
    network applies its own input stretch (``learning.model.stretch``: the +-10 clip by default, the same
    values as here). The values are those of the numpy formulation with np.median
    (tests check bit equality); ``robust.normalize_annulus`` computes them ~3x cheaper.

    ``symmetries`` (one code per stamp, k + 4 * flip: np.rot90 k times, then a left-right flip) writes
    each stamp transformed, for augmentation at no extra cost; ``out`` may be ``images`` (in place)."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-2:] != (STAMP_SIZE, STAMP_SIZE):
        raise DHSError(f"stamps have shape {images.shape}, expected (..., {STAMP_SIZE}, {STAMP_SIZE})")
    lead = images.shape[:-2]
    flat = np.ascontiguousarray(images).reshape(-1, lead[-1] if lead else 1, STAMP_SIZE, STAMP_SIZE)
    if symmetries is None:
        codes = np.zeros(len(flat), np.int64)
    else:
        codes = np.asarray(symmetries, dtype=np.int64).reshape(-1)
        if codes.shape != (len(flat),) or ((codes < 0) | (codes > 7)).any():
            raise DHSError(f"symmetries must be {len(flat)} codes in 0..7")
    if out is not None and not (out.dtype == np.float32 and out.flags.c_contiguous and out.shape == images.shape):
        raise DHSError(f"out must be a C-contiguous float32 array of shape {images.shape}")
    target = np.empty_like(flat) if out is None else out.reshape(flat.shape)
    normalize_annulus(flat, _OUTER_INDEX, np.inf if clip is None else float(clip), codes, target)
    return target.reshape(images.shape)


def resolution_psf(psf_fwhm_used_r, psfsize_r) -> np.ndarray:
    """PSF FWHM (arcsec) that theta_E is compared to: the injection's psf_fwhm_used_r, falling back to
    the brick's psfsize_r where the former is null (controls, real data)."""
    used = np.asarray(psf_fwhm_used_r, dtype=np.float64)
    size = np.asarray(psfsize_r, dtype=np.float64)
    return np.where(np.isfinite(used) & (used > 0), used, size)
