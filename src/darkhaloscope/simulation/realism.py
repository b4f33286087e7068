"""Real-sky effects of DR10 LRG cutouts that the plain simulator lacks (docs/realism.md): close companions,
coadd-correlated noise, PSF shapes beyond a round Moffat, masked/hot pixels, and a wider host-centring
jitter for the training split.

Manifest side (``RealismPrior``, ``draw_*``): every effect's random draws are frozen in manifest columns,
each from its own random stream, label-blind (controls and positives share one distribution), so that
switching an effect on never changes any other column. Scene side (``companion_light``, ``psf_shape``,
``correlate_normals``, ``bad_pixels``): applied by ``scene.render_scenes`` when the columns are present.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
import scipy.fft

from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.physics.psf import moffat_alpha
from darkhaloscope.stamps.contract import BANDS, PIXEL_SCALE_ARCSEC, STAMP_SIZE

MAX_COMPANIONS = 2
COMPANION_COLUMNS = ("comp_x", "comp_y", "comp_mag_r", "comp_g_minus_r", "comp_r_minus_z", "comp_reff", "comp_n",
                     "comp_q", "comp_phi")
PSF_SHAPE_COLUMNS = (tuple(f"psf_e1_{b}" for b in BANDS) + tuple(f"psf_e2_{b}" for b in BANDS)
                     + tuple(f"psf_dx_{b}" for b in BANDS) + tuple(f"psf_dy_{b}" for b in BANDS)
                     + ("psf_tail_frac", "psf_tail_x", "psf_tail_y"))
NOISE_CORR_COLUMN = "noise_corr"
BAD_PIXEL_COLUMNS = ("bad_kind", "bad_band", "bad_row", "bad_col", "bad_len", "bad_sigma")
BAD_KINDS = ("none", "masked", "hot")

# Companions (docs/realism.md has the sources). Separation from the host centre 0.5-5 arcsec (3-35 kpc at the
# z ~ 0.3-0.8 of DR10 LRGs), p(r) ~ r^COMP_R_POWER: a projected correlation function w(r) ~ r^-0.8 in an
# annulus of area ~ r dr. Flux below the host by COMP_DMAG (r band: 1:1.6 to 1:100 in flux).
COMP_SEP_ARCSEC = (0.5, 5.0)
COMP_R_POWER = 0.2
COMP_DMAG = (0.5, 5.0)
COMP_RED_FRAC = 0.7
# PSF shape: DECam coadd PSF ellipticity, band-to-band astrometric offsets, a one-sided wing.
PSF_E_SD, PSF_E_BAND_SD = 0.03, 0.01
PSF_SHIFT_SD_ARCSEC = 0.02
PSF_TAIL_MAX_FRAC = 0.05
PSF_TAIL_SIGMA_ARCSEC = 0.5
PSF_TAIL_OFFSET_ARCSEC = (0.3, 0.8)
# Bad pixels: the kind of defect a stamp carries (if any) and its size.
BAD_HOT_FRAC = 0.3
BAD_LEN_MAX = 8
BAD_HOT_SIGMA = (10.0, 30.0)
NOISE_ACF_FILE = "dr10_noise_acf.json"


@dataclass(frozen=True)
class RealismPrior:
    """The realism switches of ``dhs manifest`` (config ``simulation.realism``). All off = the plain simulator,
    column for column."""
    companion_rate: float = 0.0          # mean companions per stamp (Poisson, at most MAX_COMPANIONS)
    train_companion_rate: float | None = None  # the training split's own rate (None: companion_rate)
    correlated_noise: bool = False       # DR10-coadd pixel-noise correlation (measured on real cutouts)
    psf_shape: bool = False              # elliptical, band-shifted PSF with a one-sided wing
    bad_pixel_rate: float = 0.0          # fraction of stamps with one masked or hot pixel defect
    train_centre_jitter_px: float = 0.0  # extra host offset (uniform in a disc of this radius, px), train split only

    def check(self) -> "RealismPrior":
        for name in ("companion_rate", "train_companion_rate", "bad_pixel_rate", "train_centre_jitter_px"):
            v = getattr(self, name)
            if v is not None and not (np.isfinite(v) and v >= 0):
                raise DHSError(f"--{name} must be a finite number >= 0, got {v}")
        if self.bad_pixel_rate > 1:
            raise DHSError(f"--bad_pixel_rate must be <= 1, got {self.bad_pixel_rate}")
        if self.train_centre_jitter_px > 3:
            raise DHSError(f"--train_centre_jitter_px must be <= 3 pixels, got {self.train_centre_jitter_px}")
        return self

    @property
    def any(self) -> bool:
        return bool(self.companion_rate or self.train_companion_rate or self.correlated_noise or self.psf_shape
                    or self.bad_pixel_rate or self.train_centre_jitter_px)

    def describe(self) -> str:
        return (f"realism=companions:{self.companion_rate}/{self.train_companion_rate},"
                f"correlated_noise:{int(self.correlated_noise)},psf_shape:{int(self.psf_shape)},"
                f"bad_pixels:{self.bad_pixel_rate},train_centre_jitter_px:{self.train_centre_jitter_px}")


# ----------------------------------------------------------------------------------------------------
# Manifest draws
# ----------------------------------------------------------------------------------------------------

def companion_separation(u) -> np.ndarray:
    """Inverse CDF of p(r) ~ r^COMP_R_POWER on COMP_SEP_ARCSEC: uniform u in [0, 1) -> separation (arcsec)."""
    a, b = COMP_SEP_ARCSEC
    p = COMP_R_POWER + 1.0
    return (a**p + np.asarray(u) * (b**p - a**p)) ** (1.0 / p)


def draw_companions(rng: np.random.Generator, hosts: dict, rate) -> dict:
    """Close companions (satellites, pair members) of each host, label-blind: Poisson(rate) per stamp (rate a
    number or one per row), at most MAX_COMPANIONS, at COMP_SEP_ARCSEC from the host centre, COMP_DMAG fainter
    than the host in r; red (host colours, COMP_RED_FRAC) or blue star-forming. Unused slots: NaN magnitude."""
    n = len(hosts["host_x"])
    shape = (n, MAX_COMPANIONS)
    count = np.minimum(rng.poisson(rate, n), MAX_COMPANIONS)
    r = companion_separation(rng.random(shape))
    t = rng.random(shape) * 2 * np.pi
    mag = hosts["host_mag_r"][:, None] + rng.uniform(*COMP_DMAG, shape)
    red = rng.random(shape) < COMP_RED_FRAC
    gr = np.where(red, hosts["host_g_minus_r"][:, None] - 0.05 + 0.1 * rng.standard_normal(shape),
                  0.6 + 0.2 * rng.standard_normal(shape))
    rz = np.where(red, hosts["host_r_minus_z"][:, None] - 0.05 + 0.1 * rng.standard_normal(shape),
                  0.5 + 0.2 * rng.standard_normal(shape))
    n_sersic = np.where(red, rng.uniform(2.0, 4.0, shape), rng.uniform(0.7, 1.5, shape))
    mag[np.arange(MAX_COMPANIONS)[None, :] >= count[:, None]] = np.nan
    return {
        "comp_x": hosts["host_x"][:, None] + r * np.cos(t), "comp_y": hosts["host_y"][:, None] + r * np.sin(t),
        "comp_mag_r": mag, "comp_g_minus_r": gr, "comp_r_minus_z": rz,
        "comp_reff": np.clip(np.exp(np.log(0.35) + 0.4 * rng.standard_normal(shape)), 0.15, 1.5),
        "comp_n": n_sersic, "comp_q": rng.uniform(0.4, 1.0, shape), "comp_phi": rng.random(shape) * np.pi,
    }


def draw_psf_shapes(rng: np.random.Generator, n: int) -> dict:
    """Per stamp: PSF ellipticity (e1, e2) per band (a common part plus a band part), band astrometric offsets
    (dx, dy, arcsec), and a one-sided Gaussian wing (flux share, offset x/y in arcsec)."""
    e_common = PSF_E_SD * rng.standard_normal((2, n))
    out = {}
    for i, b in enumerate(BANDS):
        out[f"psf_e1_{b}"] = e_common[0] + PSF_E_BAND_SD * rng.standard_normal(n)
        out[f"psf_e2_{b}"] = e_common[1] + PSF_E_BAND_SD * rng.standard_normal(n)
    for b in BANDS:
        out[f"psf_dx_{b}"] = PSF_SHIFT_SD_ARCSEC * rng.standard_normal(n)
        out[f"psf_dy_{b}"] = PSF_SHIFT_SD_ARCSEC * rng.standard_normal(n)
    r = rng.uniform(*PSF_TAIL_OFFSET_ARCSEC, n)
    t = rng.random(n) * 2 * np.pi
    out["psf_tail_frac"] = rng.uniform(0.0, PSF_TAIL_MAX_FRAC, n)
    out["psf_tail_x"], out["psf_tail_y"] = r * np.cos(t), r * np.sin(t)
    return {k: out[k] for k in PSF_SHAPE_COLUMNS}


def draw_bad_pixels(rng: np.random.Generator, n: int, rate: float) -> dict:
    """At most one defect per stamp (probability ``rate``): a masked run of 1-BAD_LEN_MAX pixels along a column
    (value 0, as DR10 coadds store pixels with no unmasked exposure) or one hot pixel of BAD_HOT_SIGMA sky
    sigmas that the coadd's outlier rejection missed; one band, anywhere in the stamp."""
    has = rng.random(n) < rate
    hot = rng.random(n) < BAD_HOT_FRAC
    kind = np.where(has, np.where(hot, "hot", "masked"), "none").astype(object)
    return {
        "bad_kind": kind,
        "bad_band": rng.integers(0, len(BANDS), n).astype(np.int32),
        "bad_row": rng.integers(0, STAMP_SIZE, n).astype(np.int32),
        "bad_col": rng.integers(0, STAMP_SIZE, n).astype(np.int32),
        "bad_len": np.where(hot, 1, rng.integers(1, BAD_LEN_MAX + 1, n)).astype(np.int32),
        "bad_sigma": rng.uniform(*BAD_HOT_SIGMA, n),
    }


def centre_jitter(rng: np.random.Generator, n: int, radius_px) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy) arcsec uniform in a disc of ``radius_px`` pixels (a number or one per row)."""
    r = np.sqrt(rng.random(n)) * np.asarray(radius_px, np.float64) * PIXEL_SCALE_ARCSEC
    t = rng.random(n) * 2 * np.pi
    return r * np.cos(t), r * np.sin(t)


# ----------------------------------------------------------------------------------------------------
# Correlated noise
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def noise_acf() -> np.ndarray:
    """(7, 7) pixel-noise autocorrelation of DR10 coadd cutouts (lag 0 at the centre, [row, col] lags),
    measured on off-source sky pixels of six real cutouts (data/dr10_noise_acf.json says how)."""
    text = resources.files("darkhaloscope.data").joinpath(NOISE_ACF_FILE).read_text()
    acf = np.asarray(json.loads(text)["acf"], np.float64)
    return 0.5 * (acf + acf[::-1, ::-1])


@functools.lru_cache(maxsize=1)
def noise_kernel() -> np.ndarray:
    """(7, 7) float32 kernel k with sum(k^2) = 1 whose autocorrelation k * k reproduces ``noise_acf``: the
    zero-phase square root of the noise power spectrum (the Fourier transform of the ACF, negative
    frequencies clipped), truncated to the ACF's support. White unit normals convolved with k keep unit
    variance and get the measured correlation. Written by hand: no library derives a kernel from an ACF."""
    acf = noise_acf()
    n, c = 32, acf.shape[0] // 2
    grid = np.zeros((n, n))
    for dy in range(-c, c + 1):
        for dx in range(-c, c + 1):
            grid[dy % n, dx % n] = acf[dy + c, dx + c]
    power = np.clip(np.fft.fft2(grid).real, 0.0, None)
    k = np.fft.ifft2(np.sqrt(power)).real
    k = np.fft.fftshift(k)[n // 2 - c:n // 2 + c + 1, n // 2 - c:n // 2 + c + 1]
    return (k / np.sqrt(np.sum(k * k))).astype(np.float32)


def correlate_normals(normals: np.ndarray) -> np.ndarray:
    """(..., H + K - 1, W + K - 1) white unit normals -> (..., H, W) unit-variance normals with the DR10
    correlation: the "valid" part of their convolution with ``noise_kernel`` (by FFT: the output pixels
    never see the circular wrap, which stays in the K - 1 cropped rows and columns)."""
    k = noise_kernel()
    pad = k.shape[0] - 1
    ny, nx = normals.shape[-2:]
    spectrum = scipy.fft.rfft2(np.asarray(normals, np.float32)) * _kernel_spectrum(ny, nx)
    return scipy.fft.irfft2(spectrum, s=(ny, nx))[..., pad:, pad:].astype(np.float32, copy=False)


@functools.lru_cache(maxsize=8)
def _kernel_spectrum(ny: int, nx: int) -> np.ndarray:
    k = noise_kernel()
    grid = np.zeros((ny, nx), np.float32)
    grid[:k.shape[0], :k.shape[1]] = k
    out = scipy.fft.rfft2(grid)
    out.flags.writeable = False
    return out


# ----------------------------------------------------------------------------------------------------
# PSF shape (applied to the whole noiseless scene)
# ----------------------------------------------------------------------------------------------------

def moffat_second_moment_px2(fwhm_arcsec, beta: float) -> np.ndarray:
    """Per-axis second moment (px^2) of a round Moffat: alpha^2 / (2 (beta - 2)), beta > 2."""
    alpha = moffat_alpha(fwhm_arcsec, beta) / PIXEL_SCALE_ARCSEC
    return alpha**2 / (2.0 * (beta - 2.0))


def shape_covariance(e1, e2, sigma0_sq) -> np.ndarray:
    """(..., 2, 2) covariance (px^2, [x, y] axes) of the elliptical Gaussian that turns a round PSF of
    per-axis second moment sigma0^2 into one of ellipticity ~(e1, e2) / (1 + 1.5 |e|):
    sigma0^2 (1.5 |e| I + [[e1, e2], [e2, -e1]]), positive definite (eigenvalues 2.5 |e| and 0.5 |e| sigma0^2)."""
    e1, e2, s = (np.asarray(v, np.float64) for v in (e1, e2, sigma0_sq))
    e = np.hypot(e1, e2)
    cov = np.empty(e.shape + (2, 2))
    cov[..., 0, 0] = s * (1.5 * e + e1)
    cov[..., 1, 1] = s * (1.5 * e - e1)
    cov[..., 0, 1] = cov[..., 1, 0] = s * e2
    return cov


def shape_transfer(cov, shift, tail_frac, tail_offset, ky, kx) -> np.ndarray:
    """Fourier transfer function of the PSF-shape kernel D = (1 - f) G_cov(x - d) + f G_tail(x - d - t) on the
    angular frequencies ky (N, 1), kx (1, M) (rad/px): cov (..., 2, 2) px^2, shift d (..., 2) px [x, y], f (...,),
    t (..., 2) px; complex64 (..., N, M). A Gaussian's transform is exact, so sub-pixel covariances and shifts
    need no kernel sampling. The phases are separable in x and y, so they are outer products of 1-d factors."""
    def col(a):
        return np.asarray(a, np.float32)[..., None, None]
    ky, kx = np.asarray(ky, np.float32), np.asarray(kx, np.float32)
    cov, shift, t = (np.asarray(a) for a in (cov, shift, tail_offset))
    f = col(tail_frac)
    st2 = np.float32((PSF_TAIL_SIGMA_ARCSEC / PIXEL_SCALE_ARCSEC) ** 2)
    core = np.exp(-0.5 * (col(cov[..., 0, 0]) * kx**2 + col(cov[..., 1, 1]) * ky**2
                          + 2 * col(cov[..., 0, 1]) * kx * ky))
    phase = np.exp(-1j * col(shift[..., 0]) * kx).astype(np.complex64) * \
        np.exp(-1j * col(shift[..., 1]) * ky).astype(np.complex64)
    tail = np.exp(-0.5 * st2 * (kx**2 + ky**2)) * np.exp(-1j * col(t[..., 0]) * kx).astype(np.complex64) * \
        np.exp(-1j * col(t[..., 1]) * ky).astype(np.complex64)
    return phase * ((1.0 - f) * core + f * tail)


PSF_SHAPE_PAD = 8  # zero padding (px) on each side before the FFT: the wing offset and shifts stay < 4 px


def psf_shape(images: np.ndarray, rows: dict, beta: float) -> np.ndarray:
    """(B, 3, H, W) noiseless PSF-convolved scenes -> the same scenes convolved with each stamp's and band's
    PSF-shape kernel (``shape_transfer``, parameters from the ``psf_*`` manifest columns); flux is kept."""
    b, nb, h, w = images.shape
    n = h + 2 * PSF_SHAPE_PAD
    ky = 2 * np.pi * np.fft.fftfreq(n)[:, None]
    kx = 2 * np.pi * np.fft.rfftfreq(n)[None, :]
    fwhm = np.stack([np.asarray(rows[f"psfsize_{x}"], np.float64) for x in BANDS], axis=-1)
    e1 = np.stack([rows[f"psf_e1_{x}"] for x in BANDS], axis=-1)
    e2 = np.stack([rows[f"psf_e2_{x}"] for x in BANDS], axis=-1)
    cov = shape_covariance(e1, e2, moffat_second_moment_px2(fwhm, beta))
    shift = np.stack([np.stack([rows[f"psf_dx_{x}"], rows[f"psf_dy_{x}"]], -1) for x in BANDS], 1) / PIXEL_SCALE_ARCSEC
    tail = np.stack([rows["psf_tail_x"], rows["psf_tail_y"]], -1)[:, None, :] / PIXEL_SCALE_ARCSEC
    frac = np.repeat(np.asarray(rows["psf_tail_frac"], np.float64)[:, None], nb, 1)
    transfer = shape_transfer(cov, shift, frac, np.broadcast_to(tail, shift.shape), ky, kx)
    padded = np.zeros((b, nb, n, n), np.float32)
    padded[..., PSF_SHAPE_PAD:PSF_SHAPE_PAD + h, PSF_SHAPE_PAD:PSF_SHAPE_PAD + w] = images
    out = scipy.fft.irfft2(scipy.fft.rfft2(padded) * transfer, s=(n, n))
    return out[..., PSF_SHAPE_PAD:PSF_SHAPE_PAD + h, PSF_SHAPE_PAD:PSF_SHAPE_PAD + w].astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Bad pixels (applied to the noisy image)
# ----------------------------------------------------------------------------------------------------

def bad_pixels(image: np.ndarray, rows: dict, sky_sigma: np.ndarray) -> np.ndarray:
    """Applies each stamp's defect in place: a masked run (``bad_len`` pixels down a column from (``bad_row``,
    ``bad_col``), clipped to the stamp) set to 0, or a hot pixel raised by ``bad_sigma`` sky sigmas."""
    kinds = np.asarray(rows["bad_kind"]).astype(str)
    for i in np.nonzero(kinds != "none")[0]:
        band, r0, c0 = int(rows["bad_band"][i]), int(rows["bad_row"][i]), int(rows["bad_col"][i])
        if kinds[i] == "masked":
            image[i, band, r0:r0 + int(rows["bad_len"][i]), c0] = 0.0
        elif kinds[i] == "hot":
            image[i, band, r0, c0] += np.float32(rows["bad_sigma"][i] * sky_sigma[i, band])
        else:
            raise DHSError(f"unknown bad_kind '{kinds[i]}' (expected one of {', '.join(BAD_KINDS)})")
    return image
