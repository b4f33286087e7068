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

import numpy as np
import scipy.fft

from darkhaloscope.contract import PIXEL_SCALE_ARCSEC, STAMP_SIZE
from darkhaloscope.errors import DHSError

WING_TOL = 2e-4
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
    r = int(np.ceil(np.max(radius_arcsec) / scale))
    return max(1, min(r, MAX_RADIUS_PX))


def _offsets_sq(radius_px: int, scale: float) -> np.ndarray:
    d = np.arange(-radius_px, radius_px + 1) * scale
    return d[:, None] ** 2 + d[None, :] ** 2  # (K, K) squared distance from the centre, arcsec^2


def _normalise(kernels: np.ndarray, squeeze: bool) -> np.ndarray:
    kernels = kernels / kernels.sum(axis=(-2, -1), keepdims=True)
    return kernels[0] if squeeze else kernels


def gaussian_kernel(fwhm_arcsec, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Point-sampled, unit-sum, centred Gaussian kernel(s): scalar FWHM -> (K, K), (B,) -> (B, K, K)."""
    squeeze = np.ndim(fwhm_arcsec) == 0
    fwhm = _check_fwhm(fwhm_arcsec)
    sigma = fwhm * FWHM_TO_SIGMA
    r = _radius_px(sigma * np.sqrt(-2.0 * np.log(WING_TOL)), size, scale)
    d2 = _offsets_sq(r, scale)
    kernels = np.exp(-0.5 * d2[None] / sigma[:, None, None] ** 2)
    return _normalise(kernels, squeeze)


def moffat_kernel(fwhm_arcsec, beta=3.5, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Point-sampled, unit-sum, centred Moffat kernel(s) (1 + (r/alpha)^2)^-beta with the given FWHM."""
    beta = float(beta)
    if not np.isfinite(beta) or beta <= 1.0:
        raise DHSError(f"Moffat beta must be > 1 (finite total flux), got {beta}")
    squeeze = np.ndim(fwhm_arcsec) == 0
    fwhm = _check_fwhm(fwhm_arcsec)
    alpha = moffat_alpha(fwhm, beta)
    # enclosed flux of a Moffat: 1 - (1 + (r/alpha)^2)^(1 - beta)
    r = _radius_px(alpha * np.sqrt(WING_TOL ** (1.0 / (1.0 - beta)) - 1.0), size, scale)
    d2 = _offsets_sq(r, scale)
    kernels = (1.0 + d2[None] / alpha[:, None, None] ** 2) ** (-beta)
    return _normalise(kernels, squeeze)


def make_kernels(fwhm_arcsec, model: str, beta: float = 3.5, size=None, scale=PIXEL_SCALE_ARCSEC):
    """Kernels of the named model ("gaussian" or "moffat") for each FWHM; (B,) -> (B, K, K)."""
    if model == "gaussian":
        return gaussian_kernel(fwhm_arcsec, size=size, scale=scale)
    if model == "moffat":
        return moffat_kernel(fwhm_arcsec, beta=beta, size=size, scale=scale)
    raise DHSError(f"unknown PSF model '{model}' (expected one of {', '.join(PSF_MODELS)})")


def sum_sq(kernels) -> np.ndarray:
    """sum(PSF^2) of unit-sum kernels: the point-source noise-equivalent-area factor (1 / NEA in pixels)."""
    return np.sum(np.asarray(kernels, dtype=np.float64) ** 2, axis=(-2, -1))


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


def convolve(images, kernels):
    """Zero-padded FFT convolution in "same" mode (no wrap-around).

    images (..., H, W) and kernels (..., K, K) with leading shapes that broadcast, e.g. images
    (B, H, W) with kernels (B, K, K), images (B, C, H, W) with kernels (B, C, K, K), or one image per
    stamp (B, 1, H, W) convolved with C kernels (B, C, K, K) (its FFT is then taken once). Output:
    the broadcast leading shape + (H, W). K must be odd; the kernel centre is element (K//2, K//2).
    The FFT size N >= H + K // 2 is the smallest that keeps the circular convolution from aliasing
    into the H x W output (flux leaving the stamp is dropped, never wrapped around). Runs in the
    precision of ``images`` (float32 stays float32).
    """
    images = np.asarray(images)
    kernels = np.asarray(kernels)
    if images.ndim < 2 or kernels.ndim < 2:
        raise DHSError("convolve needs images (..., H, W) and kernels (..., K, K)")
    kh, kw = kernels.shape[-2:]
    if kh != kw or kh % 2 == 0:
        raise DHSError(f"PSF kernels must be square with odd size, got {kernels.shape[-2:]}")
    dtype = np.float32 if images.dtype == np.float32 else np.float64
    h, w = images.shape[-2:]
    c = kh // 2
    if c >= h + c or c >= w + c:
        raise DHSError("PSF kernel larger than the padded image")
    nh = scipy.fft.next_fast_len(h + c, real=True)
    nw = scipy.fft.next_fast_len(w + c, real=True)
    spectrum = scipy.fft.rfft2(images.astype(dtype, copy=False), s=(nh, nw))
    spectrum = spectrum * scipy.fft.rfft2(_wrapped_kernels(kernels, nh, nw, dtype))
    return scipy.fft.irfft2(spectrum, s=(nh, nw))[..., :h, :w].astype(dtype, copy=False)
