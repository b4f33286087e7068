"""PSF kernels (Gaussian, Moffat) and zero-padded FFT convolution.

Kernel definition: the PSF profile *point-sampled* at pixel centres (offsets -r..r pixels from the
centre pixel), then divided by its sum. This is what GalSim draws with ``method='no_pixel'``. It is the
right kernel for images that are already pixel-averaged (the arc renderer averages 4x4 or more
sub-pixels per pixel): the pixel response enters once, through that average, not twice.

Size rule: K = 2 r + 1 with r = ceil(radius enclosing 1 - WING_TOL of the flux, in pixels), capped at
MAX_RADIUS_PX = 63 (K <= 127). The cap loses nothing inside a 64x64 stamp: no two pixels of the stamp
are more than 63 pixels apart along an axis, so wider kernel wings would only move flux outside it.
Gaussian: r = sigma sqrt(-2 ln WING_TOL); Moffat: r = alpha sqrt(WING_TOL^(1/(1-beta)) - 1).
A batch of kernels shares the largest K of the batch.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft

from darkhaloscope.errors import DHSError
from darkhaloscope.stamps.contract import PIXEL_SCALE_ARCSEC, STAMP_SIZE

WING_TOL = 5e-4
MAX_RADIUS_PX = STAMP_SIZE - 1
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))
PSF_MODELS = ("gaussian", "moffat")


def _check_fwhm(fwhm_arcsec) -> np.ndarray:
    fwhm = np.atleast_1d(np.asarray(fwhm_arcsec, dtype=np.float64))
    if fwhm.ndim != 1:
        raise DHSError(f"PSF FWHM must be a scalar or a 1-d array, got shape {fwhm.shape}")
    if not np.all(np.isfinite(fwhm)) or np.any(fwhm <= 0):
        raise DHSError("PSF FWHM must be finite and positive")
    return fwhm


def moffat_alpha(fwhm_arcsec, beta):
    """Moffat core radius alpha = FWHM / (2 sqrt(2^(1/beta) - 1)) for I(r) ~ (1 + (r/alpha)^2)^-beta."""
    return np.asarray(fwhm_arcsec, dtype=np.float64) / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _radius_px(radius_arcsec, size, scale) -> int:
    if size is not None:
        if int(size) != size or size < 1 or size % 2 == 0:
            raise DHSError(f"PSF kernel size must be a positive odd integer, got {size}")
        return int(size) // 2
    if np.size(radius_arcsec) == 0:
        return 1
    r = int(np.ceil(np.max(radius_arcsec) / scale))
    return max(1, min(r, MAX_RADIUS_PX))


def _quadrant_d2(radius_px: int, scale: float) -> np.ndarray:
    d = np.arange(radius_px + 1) * scale
    return d[:, None] ** 2 + d[None, :] ** 2  # (r+1, r+1) squared offsets (arcsec^2) of one quadrant


def _normalise_quadrants(quadrants: np.ndarray) -> np.ndarray:
    """Scale quadrants so that the full mirrored kernels sum to 1: in the full kernel, offset 0 on an
    axis appears once and every other offset twice (weight 1 or 2 per axis)."""
    w = np.full(quadrants.shape[-1], 2.0)
    w[0] = 1.0
    total = np.einsum("...ij,i,j->...", quadrants, w, w)
    return quadrants / total[..., None, None]


def _mirror(quadrants: np.ndarray) -> np.ndarray:
    """(..., r+1, r+1) quadrant (offsets 0..r) -> (..., 2r+1, 2r+1) kernel symmetric about its centre."""
    half = np.concatenate([quadrants[..., :0:-1, :], quadrants], axis=-2)
    return np.concatenate([half[..., :, :0:-1], half], axis=-1)


def kernel_quadrants(fwhm_arcsec, model: str, beta: float = 3.5, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Upper-right quadrants (offsets 0..r on both axes) of the unit-sum kernels, (B, r+1, r+1) for
    (B,) FWHMs: the kernels are symmetric, so this is all that convolve_psf needs."""
    fwhm = _check_fwhm(fwhm_arcsec)
    if model == "gaussian":
        sigma = fwhm * FWHM_TO_SIGMA
        r = _radius_px(sigma * np.sqrt(-2.0 * np.log(WING_TOL)), size, scale)
        quadrants = np.exp(-0.5 * _quadrant_d2(r, scale)[None] / sigma[:, None, None] ** 2)
    elif model == "moffat":
        beta = float(beta)
        if not np.isfinite(beta) or beta <= 1.0:
            raise DHSError(f"Moffat beta must be > 1 (finite total flux), got {beta}")
        alpha = moffat_alpha(fwhm, beta)
        # enclosed flux of a Moffat: 1 - (1 + (r/alpha)^2)^(1 - beta)
        r = _radius_px(alpha * np.sqrt(WING_TOL ** (1.0 / (1.0 - beta)) - 1.0), size, scale)
        # (1 + d^2 / alpha^2)^-beta as exp(-beta log1p(.)): same values to 1e-14, 3x cheaper than a power
        quadrants = np.exp(-beta * np.log1p(_quadrant_d2(r, scale)[None] / alpha[:, None, None] ** 2))
    else:
        raise DHSError(f"unknown PSF model '{model}' (expected one of {', '.join(PSF_MODELS)})")
    return _normalise_quadrants(quadrants)


def make_kernels(fwhm_arcsec, model: str, beta: float = 3.5, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Kernels of the named model ("gaussian" or "moffat") for each FWHM: scalar -> (K, K),
    (B,) -> (B, K, K)."""
    kernels = _mirror(kernel_quadrants(fwhm_arcsec, model, beta, size, scale))
    return kernels[0] if np.ndim(fwhm_arcsec) == 0 else kernels


def gaussian_kernel(fwhm_arcsec, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Point-sampled, unit-sum, centred Gaussian kernel(s): scalar FWHM -> (K, K), (B,) -> (B, K, K)."""
    return make_kernels(fwhm_arcsec, "gaussian", size=size, scale=scale)


def moffat_kernel(fwhm_arcsec, beta=3.5, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Point-sampled, unit-sum, centred Moffat kernel(s) (1 + (r/alpha)^2)^-beta with the given FWHM."""
    return make_kernels(fwhm_arcsec, "moffat", beta=beta, size=size, scale=scale)


def sum_sq(kernels) -> np.ndarray:
    """sum(PSF^2) of unit-sum kernels: the point-source noise-equivalent-area factor (1 / NEA in pixels)."""
    return np.sum(np.asarray(kernels, dtype=np.float64) ** 2, axis=(-2, -1))


def _fft_len(n: int) -> int:
    """Smallest even fast FFT length >= n (even: the symmetric-kernel path needs it)."""
    m = scipy.fft.next_fast_len(n, real=True)
    while m % 2:
        m = scipy.fft.next_fast_len(m + 1, real=True)
    return m


def _wrapped_kernels(kernels, nh, nw, dtype):
    """Kernels zero-padded to (nh, nw) with their centre moved to element (0, 0) (wrapped), so that
    their FFT carries no phase shift."""
    k = kernels.shape[-1]
    c = k // 2
    out = np.zeros(kernels.shape[:-2] + (nh, nw), dtype=dtype)
    for rows_out, rows_in in ((slice(0, c + 1), slice(c, k)), (slice(nh - c, nh), slice(0, c))):
        for cols_out, cols_in in ((slice(0, c + 1), slice(c, k)), (slice(nw - c, nw), slice(0, c))):
            out[..., rows_out, cols_out] = kernels[..., rows_in, cols_in]
    return out


@functools.lru_cache(maxsize=64)
def _cosines(n: int, radius: int, dtype) -> np.ndarray:
    """(n, radius + 1) matrix w_j cos(2 pi k j / n), w_0 = 1 and w_j = 2 otherwise: the length-n DFT of
    a sequence that is even (x[-j] = x[j]) and zero beyond offset ``radius`` is this matrix times its
    offsets 0..radius (real: the sine terms cancel)."""
    k, j = np.arange(n)[:, None], np.arange(radius + 1)[None, :]
    out = (np.where(j == 0, 1.0, 2.0) * np.cos(2.0 * np.pi * ((k * j) % n) / n)).astype(dtype)
    out.flags.writeable = False  # shared by every caller through the cache
    return out


def _symmetric_spectrum(quadrants, nh, nw, dtype):
    """rfft2 (nh, nw) of the wrapped kernels that are even in both axes, from their quadrants (offsets
    0..r): two small matrix products with the cosine matrices, a few times cheaper than FFTs of the
    padded kernels and needing only the quadrants."""
    r = quadrants.shape[-1] - 1
    # one small product per kernel (not one large one): BLAS keeps those single-threaded
    along_x = np.asarray(quadrants, dtype) @ np.ascontiguousarray(_cosines(nw, r, dtype)[: nw // 2 + 1].T)
    return _cosines(nh, r, dtype) @ along_x


def _convolve_spectrum(images, kernel_spectrum_fn, c, dtype):
    h, w = images.shape[-2:]
    nh, nw = _fft_len(h + c), _fft_len(w + c)
    # the padded rows are zero: transform the H image rows along x, then all columns along y
    spectrum = scipy.fft.fft(scipy.fft.rfft(images.astype(dtype, copy=False), n=nw, axis=-1), n=nh, axis=-2)
    spectrum = spectrum * kernel_spectrum_fn(nh, nw)
    # only the first H rows of the result are kept: inverse along y, crop, then inverse along x
    return scipy.fft.irfft(scipy.fft.ifft(spectrum, axis=-2)[..., :h, :], n=nw, axis=-1)[..., :w].astype(dtype, copy=False)


def convolve(images, kernels):
    """Zero-padded FFT convolution in "same" mode (no wrap-around).

    images (..., H, W) and kernels (..., K, K) with leading shapes that broadcast, e.g. images
    (B, H, W) with kernels (B, K, K), images (B, C, H, W) with kernels (B, C, K, K), or one image per
    stamp (B, 1, H, W) convolved with C kernels (B, C, K, K) (its FFT is then taken once). Output:
    the broadcast leading shape + (H, W). K must be odd; the kernel centre is element (K//2, K//2).
    The FFT size N >= H + K // 2 is the smallest that keeps the circular convolution from aliasing
    into the H x W output (flux leaving the stamp is dropped, never wrapped around). Runs in the
    precision of ``images`` (float32 stays float32). Kernels symmetric about their centre (ours) take
    a faster path (see _symmetric_spectrum).
    """
    images = np.asarray(images)
    kernels = np.asarray(kernels)
    if images.ndim < 2 or kernels.ndim < 2:
        raise DHSError("convolve needs images (..., H, W) and kernels (..., K, K)")
    kh, kw = kernels.shape[-2:]
    if kh != kw or kh % 2 == 0:
        raise DHSError(f"PSF kernels must be square with odd size, got {kernels.shape[-2:]}")
    dtype = np.float32 if images.dtype == np.float32 else np.float64
    c = kh // 2
    if np.array_equal(kernels, kernels[..., ::-1, :]) and np.array_equal(kernels, kernels[..., :, ::-1]):
        quadrants = kernels[..., c:, c:]
        return _convolve_spectrum(images, lambda nh, nw: _symmetric_spectrum(quadrants, nh, nw, dtype), c, dtype)
    return _convolve_spectrum(
        images, lambda nh, nw: scipy.fft.rfft2(_wrapped_kernels(kernels, nh, nw, dtype)), c, dtype)


def convolve_psf(images, fwhm_arcsec, model: str, beta: float = 3.5, scale=PIXEL_SCALE_ARCSEC):
    """Convolve images (..., H, W) with the model PSF of the given FWHMs, whose shape must broadcast
    with images.shape[:-2] (e.g. images (B, 3, H, W) or (B, 1, H, W) with fwhm (B, 3)). Same result as
    convolve(images, make_kernels(...)) without building the full kernels."""
    images = np.asarray(images)
    fwhm = np.asarray(fwhm_arcsec, dtype=np.float64)
    dtype = np.float32 if images.dtype == np.float32 else np.float64
    quadrants = kernel_quadrants(fwhm.ravel(), model, beta, scale=scale).astype(dtype)
    return convolve_quadrants(images, quadrants.reshape(fwhm.shape + quadrants.shape[-2:]))


def convolve_quadrants(images, quadrants):
    """Convolve images (..., H, W) with the symmetric kernels whose quadrants (offsets 0..r, as from
    ``kernel_quadrants``) are given, (..., r+1, r+1) broadcasting with images.shape[:-2]."""
    images = np.asarray(images)
    dtype = np.float32 if images.dtype == np.float32 else np.float64
    quadrants = np.asarray(quadrants, dtype)
    c = quadrants.shape[-1] - 1
    return _convolve_spectrum(images, lambda nh, nw: _symmetric_spectrum(quadrants, nh, nw, dtype), c, dtype)
