"""Full DR10-like scenes for a batch of manifest rows: host LRG, neighbours, stars, confusers, the
injected arc (positives only) and pixel noise, all in nanomaggies per 0.262-arcsec pixel.

- Host, neighbours, stars and confusers are rendered as surface brightness integrated over pixels and
  convolved with the band's "true sky" PSF: a Moffat with beta = ``SKY_MOFFAT_BETA`` and the band's
  ``psfsize_*`` FWHM, the same for every data variant.
- The arc is rendered by the physics layer (``physics.render``) with the variant's PSF model (Gaussian
  or Moffat of the same FWHM) and added to the noiseless scene.
- Noise is added to the whole scene the same way for both classes: per-pixel variance
  ``sky_sigma^2 + max(scene, 0) / GAIN_E_PER_NMGY`` (Gaussian approximation of sky plus source Poisson
  noise), with ``sky_sigma = 10^(-0.4 (m5 - 22.5)) / 5 * sqrt(sum PSF^2)`` from the 5-sigma depth m5.

Sampling: hosts are point-sampled on the pixel grid except the central 8x8 pixels, which are averaged
over 4x4 sub-pixels, and the central 2x2 pixels (which hold the host centre), averaged over 32x32
sub-pixels, with the flux inside an elliptical radius of 0.25 pixel exact (the cusp; see
``host_light``); confusers are averaged over 2x2 sub-pixels; neighbours (faint,
off-centre) are point-sampled; stars are split bilinearly over the 4 pixels around their position.
Positions and angles follow the manifest's conventions (see ``darkhaloscope.simulation.manifest``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from darkhaloscope.simulation.draws import CLUMP_COLUMNS
from darkhaloscope.simulation import realism
from darkhaloscope.simulation.physics import light, psf, render
from darkhaloscope.stamps.contract import BANDS, PIXEL_SCALE_ARCSEC, STAMP_SIZE, mag_to_nanomaggy

SKY_MOFFAT_BETA = 3.5
# Effective gain of a DR10 coadd (electrons per nanomaggy), for the Gaussian approximation of source
# Poisson noise. A 22.5-mag source gives ~1e3-1e4 e- in a 90-s DECam exposure; 3000 e-/nmgy keeps the
# Poisson term of a bright host core comparable to, not larger than, the sky term, as in real cutouts.
GAIN_E_PER_NMGY = 3000.0
PIX_AREA = PIXEL_SCALE_ARCSEC**2
CORE_BOX = 8          # central pixels (per axis) of the host that are sub-sampled
CORE_SUPERSAMPLE = 4
CUSP_BOX = 2          # innermost pixels (per axis; the host centre is within 0.3 px of their corner) ...
CUSP_SUPERSAMPLE = 32  # ... sub-sampled finely enough for the steep profile just outside the hole ...
CUSP_HOLE_PIX = 0.25  # ... inside which (elliptical radius, pixels) the enclosed flux is exact
CONFUSER_SUPERSAMPLE = 2
# Stamps per background chunk (profiles + FFT convolution); 16 keeps the temporaries in the CPU cache.
# PSF kernels of one convolution call share the call's largest kernel size, so a stamp's pixels depend
# (below 5e-4 of its flux) on its chunk/batch; chunks are fixed within a batch, and batches are fixed
# blocks of task ids (see inject), which keeps stamps byte-identical across shard counts.
# The FFT convolution of a chunk runs on FFT_CHUNK stamps at a time (its complex spectra then fit in
# L2: 2x faster than whole chunks); the kernels and FFT size are the chunk's, so the output is the same.
# Both sizes are the renderer's (render.CHUNK, render.FFT_CHUNK): one setting for arcs and backgrounds.
CHUNK, FFT_CHUNK = render.CHUNK, render.FFT_CHUNK

_X1, _Y1 = light.pixel_grid(STAMP_SIZE, 1)
_lo = STAMP_SIZE // 2 - CORE_BOX // 2
_CORE = slice(_lo, _lo + CORE_BOX)
_XC, _YC = (g[_CORE.start * CORE_SUPERSAMPLE:_CORE.stop * CORE_SUPERSAMPLE,
              _CORE.start * CORE_SUPERSAMPLE:_CORE.stop * CORE_SUPERSAMPLE]
            for g in light.pixel_grid(STAMP_SIZE, CORE_SUPERSAMPLE))
_XS, _YS = (g.astype(np.float32) for g in light.pixel_grid(STAMP_SIZE, CONFUSER_SUPERSAMPLE))
_AX1, _AXC = _X1[0], _XC[0]  # 1-D axes of the pixel and core sub-pixel grids (x and y are the same)
_lo = STAMP_SIZE // 2 - CUSP_BOX // 2
_CUSP = slice(_lo, _lo + CUSP_BOX)
_AXK = light.pixel_grid(STAMP_SIZE, CUSP_SUPERSAMPLE)[0][0, _CUSP.start * CUSP_SUPERSAMPLE:_CUSP.stop * CUSP_SUPERSAMPLE]


def column_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Manifest table -> dict of numpy arrays (fixed-size list columns become (N, K) arrays; nulls NaN)."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            k = col.type.list_size
            if col.null_count:  # a null list (the clumps of a control) -> K NaN
                col = pc.fill_null(col, pa.scalar([np.nan] * k, col.type))
            out[name] = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, k)
        elif pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def band_fluxes(mag_r, g_minus_r, r_minus_z) -> np.ndarray:
    """AB r magnitude and colours -> fluxes (nmgy) in g, r, z stacked on a new last axis."""
    mag_r = np.asarray(mag_r, np.float64)
    mags = (mag_r + g_minus_r, mag_r, mag_r - r_minus_z)
    return np.stack([np.nan_to_num(mag_to_nanomaggy(m), nan=0.0) for m in mags], axis=-1)


# ----------------------------------------------------------------------------------------------------
# Components (pre-PSF, flux per pixel)
# ----------------------------------------------------------------------------------------------------

def _col(v):
    return np.asarray(v, np.float64)[:, None, None]


def host_light(rows: dict) -> np.ndarray:
    """(B, 64, 64) float32 unit-flux host image (flux per pixel), cusp integrated: outside an elliptical
    radius of ``CUSP_HOLE_PIX`` pixels, point samples, the central 8x8 pixels averaged over 4x4
    sub-pixels and the central 2x2 over ``CUSP_SUPERSAMPLE``^2; inside it, the exact enclosed flux
    (``light.sersic_inner_pixels``). Against a converged lenstronomy render, wherever the centre falls
    (tests/test_hosts.py, n = 0.5-6, r_eff 0.15-1.2 arcsec), every pixel is within ~1% of the peak and
    the flux within ~0.7%. Point samples alone fail for steep cusps: a 4x4 sub-pixel that lands near
    the centre of a compact n = 4-6 host made its central pixel up to ~45% of the peak too bright."""
    args = [rows[k] for k in ("host_reff", "host_n", "host_q", "host_phi", "host_x", "host_y")]
    flux = np.full(len(args[0]), PIX_AREA)
    hole = np.full(len(args[0]), CUSP_HOLE_PIX * PIXEL_SCALE_ARCSEC)
    img = light.sersic_on_grid(_AX1, _AX1, flux, *args, hole=hole)
    core = light.sersic_on_grid(_AXC, _AXC, flux, *args, hole=hole)
    img[:, _CORE, _CORE] = light.bin_image(core, CORE_SUPERSAMPLE)
    cusp = light.sersic_on_grid(_AXK, _AXK, flux, *args, hole=hole)
    img[:, _CUSP, _CUSP] = light.bin_image(cusp, CUSP_SUPERSAMPLE)
    img += light.sersic_inner_pixels(*args, hole).astype(np.float32)
    return img


def _output(rows: dict, out, dtype) -> np.ndarray:
    """The (B, 3, 64, 64) array a component adds into: ``out`` if given, else new zeros."""
    if out is None:
        out = np.zeros((len(rows["task_id"]), len(BANDS), STAMP_SIZE, STAMP_SIZE), dtype)
    return out


def neighbour_light(rows: dict, out=None) -> np.ndarray:
    """(B, 3, 64, 64) float32 neighbour galaxies in g, r, z (only occupied slots are evaluated), added
    into ``out`` when given."""
    return _sersic_slots(rows, "nb", out, 1)


def companion_light(rows: dict, out=None) -> np.ndarray:
    """(B, 3, 64, 64) float32 close companions (``comp_*`` slots, realism.draw_companions; none when the
    manifest has no such columns), averaged over COMPANION_SUPERSAMPLE^2 sub-pixels (they are compact and can
    be bright: point samples of a 0.1-0.3" Sersic miss its flux by tens of percent), added into ``out``."""
    if "comp_mag_r" not in rows:
        return _output(rows, out, np.float32)
    return _sersic_slots(rows, "comp", out, COMPANION_SUPERSAMPLE)


COMPANION_SUPERSAMPLE = 4
_AXS = {1: _AX1, COMPANION_SUPERSAMPLE: light.pixel_grid(STAMP_SIZE, COMPANION_SUPERSAMPLE)[0][0]}


def _sersic_slots(rows: dict, prefix: str, out, supersample: int) -> np.ndarray:
    """Adds the occupied Sersic slots ``<prefix>_x, _y, _mag_r, _g_minus_r, _r_minus_z, _reff, _n, _q, _phi``,
    each averaged over supersample^2 sub-pixels per pixel (1: point samples)."""
    out = _output(rows, out, np.float32)
    stamp, slot = np.nonzero(np.isfinite(rows[f"{prefix}_mag_r"]))
    if len(stamp) == 0:
        return out
    get = {k: rows[f"{prefix}_{k}"][stamp, slot] for k in ("x", "y", "mag_r", "g_minus_r", "r_minus_z",
                                                           "reff", "n", "q", "phi")}
    ax = _AXS[supersample]
    shape = light.sersic_on_grid(ax, ax, np.full(len(stamp), PIX_AREA), get["reff"], get["n"],
                                 get["q"], get["phi"], get["x"], get["y"])
    if supersample > 1:
        shape = light.bin_image(shape, supersample)
    flux = band_fluxes(get["mag_r"], get["g_minus_r"], get["r_minus_z"]).astype(np.float32)
    _add_profiles(out, stamp, shape, flux)  # each stamp's objects in slot order, as np.nonzero lists them
    return out


@numba.njit(cache=True)
def _add_profiles(out, stamp, shape, flux):
    """out[stamp[i], band] += shape[i] * flux[i, band] for each profile i, in order (a stamp may repeat).
    Compiled: numpy needs an (M, 3, H, W) product temporary and one fancy-indexed add per repeat."""
    for i in range(shape.shape[0]):
        for band in range(flux.shape[1]):
            target, f = out[stamp[i], band], flux[i, band]
            for y in range(shape.shape[1]):
                for x in range(shape.shape[2]):
                    target[y, x] += shape[i, y, x] * f


def star_light(rows: dict, out=None) -> np.ndarray:
    """(B, 3, 64, 64) point sources, each split bilinearly over the four pixels around it (float64, or
    added into ``out`` when given)."""
    out = _output(rows, out, np.float64)
    stamp, slot = np.nonzero(np.isfinite(rows["star_mag_r"]))
    if len(stamp) == 0:
        return out
    centre = (STAMP_SIZE - 1) / 2.0
    px = rows["star_x"][stamp, slot] / PIXEL_SCALE_ARCSEC + centre
    py = rows["star_y"][stamp, slot] / PIXEL_SCALE_ARCSEC + centre
    flux = band_fluxes(rows["star_mag_r"][stamp, slot], rows["star_g_minus_r"][stamp, slot],
                       rows["star_r_minus_z"][stamp, slot])
    i0, j0 = np.floor(py).astype(np.int64), np.floor(px).astype(np.int64)
    _add_bilinear(out, stamp, i0, j0, py - i0, px - j0, flux)
    return out


@numba.njit(cache=True)
def _add_bilinear(out, stamp, i0, j0, fy, fx, flux):
    """Adds flux[k, band] of each point source k to the four pixels (i0 + 0/1, j0 + 0/1) of its stamp with
    bilinear weights (pixels off the stamp are dropped), corner by corner, band by band, source by source.
    Compiled: numpy needs twelve np.add.at calls (slow per element) plus masks for this."""
    for corner in range(4):
        di, dj = corner // 2, corner % 2
        for band in range(flux.shape[1]):
            for k in range(stamp.size):
                i, j = i0[k] + di, j0[k] + dj
                if 0 <= i < out.shape[2] and 0 <= j < out.shape[3]:
                    wy = fy[k] if di else 1.0 - fy[k]
                    wx = fx[k] if dj else 1.0 - fx[k]
                    out[stamp[k], band, i, j] += wy * wx * flux[k, band]


def confuser_shape(kind: str, x, y, p: dict) -> np.ndarray:
    """Unnormalised surface brightness of one confuser kind on grids x, y (parameters (M, 1, 1)),
    about the host centre. Geometry: radius ``conf_r``, central angle ``conf_phi``, angular
    half-extent ``conf_span``, radial Gaussian sigma ``conf_width``, spiral growth ``conf_pitch``."""
    dx, dy = x - p["host_x"], y - p["host_y"]
    r = np.sqrt(dx * dx + dy * dy)  # (np.hypot is a scalar loop for float32, 6x slower)
    # angle from conf_phi in (-pi, pi]: arctan2 of the coordinates rotated by -conf_phi (no wrapping needed)
    c, s = np.cos(p["conf_phi"]), np.sin(p["conf_phi"])
    dt = np.arctan2(c * dy - s * dx, c * dx + s * dy)
    w, r0 = p["conf_width"], p["conf_r"]
    if kind == "tidal_arc":  # a tangential streak of debris, tapered in angle
        return np.exp(-0.5 * ((r - r0) / w) ** 2 - 0.5 * (dt / p["conf_span"]) ** 2)
    if kind == "ring":  # a complete, lopsided star-forming ring
        return np.exp(-0.5 * ((r - r0) / w) ** 2) * (1.0 + 0.5 * np.cos(dt))
    if kind == "spiral_arm":  # a logarithmic arm r = r0 exp(pitch * angle)
        r_arm = r0 * np.exp(p["conf_pitch"] * dt)
        return np.exp(-0.5 * ((r - r_arm) / w) ** 2 - 0.5 * (dt / (2 * p["conf_span"])) ** 2)
    if kind == "blue_companion":  # a compact exponential blob at radius r0
        cx, cy = r0 * np.cos(p["conf_phi"]), r0 * np.sin(p["conf_phi"])
        return np.exp(-np.sqrt((dx - cx) ** 2 + (dy - cy) ** 2) / (0.6 * w))
    raise ValueError(f"unknown confuser kind {kind}")


def confuser_light(rows: dict, out=None) -> np.ndarray:
    """(B, 3, 64, 64) float32 lens-like confusers, each normalised to its total flux inside the stamp,
    added into ``out`` when given."""
    out = _output(rows, out, np.float32)
    kinds = np.asarray(rows["confuser_kind"]).astype(str)
    for kind in np.unique(kinds):
        if kind in ("none", "", "None"):
            continue
        idx = np.nonzero(kinds == kind)[0]
        p = {k: _col(rows[k][idx]).astype(np.float32) for k in ("host_x", "host_y", "conf_r", "conf_phi",
                                                                  "conf_span", "conf_width", "conf_pitch")}
        shape = light.bin_image(confuser_shape(kind, _XS, _YS, p), CONFUSER_SUPERSAMPLE)
        shape /= np.maximum(shape.sum(axis=(-2, -1), keepdims=True), 1e-30)
        flux = band_fluxes(rows["conf_mag_r"][idx], rows["conf_g_minus_r"][idx],
                           rows["conf_r_minus_z"][idx]).astype(np.float32)
        out[idx] += shape[:, None] * flux[:, :, None, None]
    return out


# ----------------------------------------------------------------------------------------------------
# PSF and noise
# ----------------------------------------------------------------------------------------------------

def psf_fwhm(rows: dict) -> np.ndarray:
    """(B, 3) PSF FWHM (arcsec) per band from psfsize_g/r/z."""
    return np.stack([np.asarray(rows[f"psfsize_{b}"], np.float64) for b in BANDS], axis=-1)


def sky_psf_sum_sq(fwhm: np.ndarray) -> np.ndarray:
    """(B, 3) sum(PSF^2) of the unit-sum true-sky kernels, from their quadrants (offsets 0..r): in the
    full symmetric kernel an offset of 0 on an axis appears once, any other offset twice."""
    return quadrant_sum_sq(psf.kernel_quadrants(fwhm.ravel(), "moffat", beta=SKY_MOFFAT_BETA)).reshape(fwhm.shape)


def quadrant_sum_sq(quad: np.ndarray) -> np.ndarray:
    """(M,) sum(PSF^2) of full symmetric kernels from their (M, r+1, r+1) quadrants."""
    w = np.full(quad.shape[-1], 2.0)
    w[0] = 1.0
    return np.einsum("bij,i,j->b", quad**2, w, w)


def sky_sigma(psfdepth, psf_sum_sq) -> np.ndarray:
    """Per-pixel sky sigma (nmgy) from the 5-sigma point-source depth (AB mag) and sum(PSF^2) of the
    unit-sum PSF kernel: sigma_pix = 10^(-0.4 (m5 - 22.5)) / 5 * sqrt(sum PSF^2)."""
    return mag_to_nanomaggy(psfdepth) / 5.0 * np.sqrt(psf_sum_sq)


def add_noise(noiseless: np.ndarray, sigma_sky: np.ndarray, noise_seeds, correlated=None) -> np.ndarray:
    """Sky + source noise, drawn from one generator per task seeded by its frozen ``noise_seed``.
    ``correlated`` (B,) bool: those stamps' unit normals get the DR10 coadd pixel correlation
    (``realism.correlate_normals``: the same per-pixel variance, correlated neighbours)."""
    noiseless = np.ascontiguousarray(noiseless, np.float32)
    # (B, 3) sky variance per stamp and band (sigma_sky may broadcast, e.g. one row for all stamps)
    sky_var = (np.asarray(sigma_sky, np.float64) ** 2).astype(np.float32)
    sky_var = np.ascontiguousarray(np.broadcast_to(sky_var, noiseless.shape[:2]))
    out = np.empty(noiseless.shape, np.float32)
    seeds = np.asarray(noise_seeds, np.int64)
    corr = np.zeros(len(seeds), bool) if correlated is None else np.asarray(correlated, bool)
    if corr.any():
        pad = realism.noise_kernel().shape[0] - 1
        idx = np.nonzero(corr)[0]
        raw = np.empty((len(idx), out.shape[1], out.shape[2] + pad, out.shape[3] + pad), np.float32)
        for j, i in enumerate(idx):
            np.random.default_rng(int(seeds[i])).standard_normal(dtype=np.float32, out=raw[j])
        out[idx] = realism.correlate_normals(raw)
    for i, seed in enumerate(seeds):
        if not corr[i]:
            np.random.default_rng(int(seed)).standard_normal(dtype=np.float32, out=out[i])
        _scale_noise(out[i], noiseless[i], sky_var[i])  # while the stamp's normals are in cache
    return out


@numba.njit(cache=True)
def _scale_noise(normals, noiseless, sky_var):
    """In place normals -> noiseless + normals * sqrt(sky_var[band] + max(noiseless, 0) / gain) for one
    (3, H, W) stamp, in float32. Compiled: numpy needs six full-size passes and a variance array."""
    inv_gain = np.float32(1.0 / GAIN_E_PER_NMGY)
    for band in range(normals.shape[0]):
        z, x = normals[band].ravel(), noiseless[band].ravel()
        for i in range(z.size):
            source = np.float32(0.0) if x[i] < 0 else x[i]  # NaN stays NaN, as with np.maximum
            z[i] = z[i] * math.sqrt(source * inv_gain + sky_var[band]) + x[i]


# ----------------------------------------------------------------------------------------------------
# Arcs (thin layer over the physics renderer)
# ----------------------------------------------------------------------------------------------------

ARC_SUPERSAMPLE = 4
# Pixels count towards the integrated S/N where the noiseless r-band arc exceeds this many sky sigmas.
SNR_THRESHOLD_SIGMA = 1.0


def arc_inputs(rows: dict) -> tuple[dict, dict]:
    """Manifest/output truth columns -> (lens, source) mappings of ``physics.render.render_arcs``.
    Both use the same convention: source position relative to the lens centre, in arcsec."""
    lens_map = {"theta_e": "theta_e_arcsec", "q": "lens_q", "phi": "lens_phi", "gamma1": "shear_g1",
                "gamma2": "shear_g2", "x0": "lens_x0", "y0": "lens_y0"}
    src_map = {"x": "src_x", "y": "src_y", "r_eff": "src_reff", "n": "src_n", "q": "src_q", "phi": "src_phi",
               **{f"flux_{b}": f"src_flux_{b}" for b in BANDS}}
    lens_p = {k: np.asarray(rows[c], np.float64) for k, c in lens_map.items()}
    src_p = {k: np.asarray(rows[c], np.float64) for k, c in src_map.items()}
    return lens_p, src_p


def arc_clumps(rows: dict) -> dict | None:
    """The source clumps of ``physics.render.render_arcs`` ((B, K) arrays x, y, sigma, frac) from the
    ``src_clump_*`` columns, or None when the rows have none (a manifest built without clumps)."""
    if CLUMP_COLUMNS[0] not in rows:
        return None
    return {k: _slots(rows[c]) for k, c in zip(render.CLUMP_KEYS, CLUMP_COLUMNS)}


def _slots(values) -> np.ndarray:
    """(B, K) float64 from an (B, K) array or, as pandas gives list columns, B lists (None -> NaN)."""
    values = np.asarray(values)
    if values.dtype != object:
        return values.astype(np.float64)
    k = max((len(v) for v in values if v is not None), default=0)
    return np.array([np.full(k, np.nan) if v is None else np.asarray(v, np.float64) for v in values]).reshape(-1, k)


def render_arcs(rows: dict, psf_model: str, beta: float) -> dict:
    """Noiseless arcs of positive rows: {'arc': (B, 3, 64, 64) float32 nmgy, 'magnification': (B,)}.

    Delegates to ``physics.render.render_arcs`` (SIE + shear, Sersic source of fixed unlensed flux with
    its optional ``src_clump_*`` Gaussian clumps, 4x4 sub-pixel sampling wherever the source is not
    negligible, the variant's PSF of each band's FWHM). Magnification = lensed flux inside the stamp
    before the PSF / unlensed flux."""
    lens_p, src_p = arc_inputs(rows)
    res = render.render_arcs(lens_p, src_p, psf_fwhm(rows), psf_model, moffat_beta=beta,
                             supersample=ARC_SUPERSAMPLE, clumps=arc_clumps(rows))
    return {"arc": res.images, "magnification": res.magnification}


def arc_snr(arc: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(integrated, peak) S/N of noiseless arcs in the r band, sky-limited.

    integrated: sum(arc_r) / sqrt(sum(sigma_sky_r^2)) over the pixels where arc_r > 1 sigma_sky_r
    (0 if none); peak: max(arc_r) / sigma_sky_r (the original pipeline's definition)."""
    r = BANDS.index("r")
    a = np.asarray(arc)[:, r]
    s = np.asarray(sigma, np.float64)[:, r]
    return (render.arc_snr(a, s, threshold=SNR_THRESHOLD_SIGMA), render.arc_snr_peak(a, s))


# ----------------------------------------------------------------------------------------------------
# A full batch
# ----------------------------------------------------------------------------------------------------

@dataclass
class SceneBatch:
    image: np.ndarray          # (B, 3, 64, 64) float32 noisy stamps, nmgy
    arc: np.ndarray            # (B, 3, 64, 64) float32 noiseless PSF-convolved arcs (zero for controls)
    sky_sigma: np.ndarray      # (B, 3) per-pixel sky sigma, nmgy
    arc_fwhm: np.ndarray       # (B, 3) FWHM of the arc PSF (NaN for controls)
    arc_snr: np.ndarray        # (B,) integrated S/N (NaN for controls)
    arc_snr_peak: np.ndarray   # (B,) peak-pixel S/N (NaN for controls)
    magnification: np.ndarray  # (B,) lensed / unlensed source flux (NaN for controls)


def background_light(rows: dict) -> np.ndarray:
    """(B, 3, 64, 64) float32 pre-PSF host + neighbours + stars + confuser, flux per pixel."""
    host_flux = band_fluxes(rows["host_mag_r"], rows["host_g_minus_r"], rows["host_r_minus_z"]).astype(np.float32)
    pre = host_light(rows)[:, None] * host_flux[:, :, None, None]
    neighbour_light(rows, out=pre)
    companion_light(rows, out=pre)
    star_light(rows, out=pre)
    confuser_light(rows, out=pre)
    return pre


def noiseless_background(rows: dict) -> tuple[np.ndarray, np.ndarray]:
    """Everything but the arc, convolved with the true-sky PSF: ((B, 3, 64, 64) nmgy, (B, 3) sum of
    the squared unit-sum sky kernels, the point-source noise factor of ``sky_sigma``).

    Rendered in chunks of CHUNK stamps: the temporaries of the profile evaluation and of the FFTs
    then stay in the CPU cache (about 2x faster than whole batches)."""
    fwhm = psf_fwhm(rows)
    b = len(fwhm)
    out = np.empty((b, len(BANDS), STAMP_SIZE, STAMP_SIZE), np.float32)
    sum_sq = np.empty(fwhm.shape)
    for lo in range(0, b, CHUNK):
        part = slice(lo, lo + CHUNK)
        pre = background_light({k: v[part] for k, v in rows.items()})
        quad = psf.kernel_quadrants(fwhm[part].ravel(), "moffat", beta=SKY_MOFFAT_BETA)
        sum_sq[part] = quadrant_sum_sq(quad).reshape(fwhm[part].shape)
        quad = quad.astype(np.float32).reshape(pre.shape[:2] + quad.shape[-2:])
        for lo_fft in range(0, len(pre), FFT_CHUNK):  # same kernels and FFT size, smaller temporaries
            sub = slice(lo_fft, lo_fft + FFT_CHUNK)
            out[lo + lo_fft:lo + lo_fft + len(pre[sub])] = psf.convolve_quadrants(pre[sub], quad[sub])
    return out, sum_sq


def render_scenes(rows: dict, psf_model: str, beta: float) -> SceneBatch:
    """Render a batch of manifest rows (dict of arrays, see ``column_arrays``): background, the arcs of
    the positive rows with the variant's PSF (``psf_model``, ``beta``), and noise."""
    b = len(rows["task_id"])
    background, psf_sum_sq = noiseless_background(rows)
    sigma = sky_sigma(np.stack([rows[f"psfdepth_{x}"] for x in BANDS], axis=-1), psf_sum_sq)
    positive = np.asarray(rows["is_control"]) == 0
    arc = np.zeros((b, len(BANDS), STAMP_SIZE, STAMP_SIZE), np.float32)
    nan = np.full(b, np.nan)
    fwhm_used = np.full((b, len(BANDS)), np.nan)
    snr, snr_peak, magnification = nan.copy(), nan.copy(), nan.copy()
    if positive.any():
        idx = np.nonzero(positive)[0]
        sub = {k: v[idx] for k, v in rows.items()}
        res = render_arcs(sub, psf_model, beta)
        arc[idx] = res["arc"]
        fwhm_used[idx] = psf_fwhm(sub)
        magnification[idx] = res["magnification"]
        snr[idx], snr_peak[idx] = arc_snr(res["arc"], sigma[idx])
        background[idx] += res["arc"]  # the noiseless scene
    if realism.PSF_SHAPE_COLUMNS[0] in rows:  # PSF shape beyond the round Moffat, on the whole scene
        background = realism.psf_shape(background, rows, SKY_MOFFAT_BETA)
    corr = np.asarray(rows[realism.NOISE_CORR_COLUMN], bool) if realism.NOISE_CORR_COLUMN in rows else None
    image = add_noise(background, sigma, rows["noise_seed"], corr)
    if realism.BAD_PIXEL_COLUMNS[0] in rows:
        realism.bad_pixels(image, rows, sigma)
    return SceneBatch(image, arc, sigma, fwhm_used, snr, snr_peak, magnification)
