"""PSF kernels against GalSim, kernel centring, and padded (non-wrapping) FFT convolution."""

import numpy as np
import pytest
import scipy.fft
import scipy.signal

from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.physics import psf

galsim = pytest.importorskip("galsim")

SCALE = 0.262
FWHMS = (0.75, 1.0, 1.3, 1.6)


def _galsim_kernel(profile, size, method="no_pixel"):
    return profile.drawImage(nx=size, ny=size, scale=SCALE, method=method).array.astype(np.float64)


@pytest.mark.parametrize("fwhm", FWHMS)
def test_gaussian_kernel_matches_galsim(fwhm):
    k = psf.gaussian_kernel(fwhm)
    ref = _galsim_kernel(galsim.Gaussian(fwhm=fwhm), k.shape[0])
    assert np.abs(k - ref).sum() <= 1e-3


@pytest.mark.parametrize("beta", (2.5, 3.5, 4.5))
@pytest.mark.parametrize("fwhm", FWHMS)
def test_moffat_kernel_matches_galsim(fwhm, beta):
    k = psf.moffat_kernel(fwhm, beta)
    ref = _galsim_kernel(galsim.Moffat(beta=beta, fwhm=fwhm), k.shape[0])
    # GalSim's drawn grid misses the flux beyond the kernel; ours is renormalised, so the L1 difference
    # also bounds the flux our truncation drops.
    assert np.abs(k - ref).sum() <= 1e-3


def test_kernels_are_point_sampled_not_pixel_convolved():
    # The comparison is sharp enough to tell the two GalSim drawing methods apart: a pixel-integrated
    # kernel (GalSim's default method) differs from ours by far more than the tolerance.
    k = psf.moffat_kernel(0.9, 3.5)
    ref = _galsim_kernel(galsim.Moffat(beta=3.5, fwhm=0.9), k.shape[0], method="auto")
    assert np.abs(k - ref).sum() > 1e-2


def test_batch_kernels_odd_unit_sum_and_size_rule():
    fwhm = np.array([0.8, 1.2, 1.6])
    for model in psf.PSF_MODELS:
        k = psf.make_kernels(fwhm, model, beta=3.5)
        assert k.ndim == 3 and k.shape[0] == 3 and k.shape[1] == k.shape[2] and k.shape[1] % 2 == 1
        np.testing.assert_allclose(k.sum(axis=(1, 2)), 1.0, rtol=1e-12)
        # each kernel equals the one computed alone, padded to the batch's size
        single = psf.make_kernels(0.8, model, size=k.shape[1])
        np.testing.assert_allclose(k[0], single, rtol=1e-12)
    # wide Moffat wings are capped at 127 pixels (the largest separation inside a 64-pixel stamp)
    assert psf.moffat_kernel(1.6, 2.5).shape == (127, 127)
    assert psf.moffat_kernel(1.6, 3.5).shape[0] > psf.gaussian_kernel(1.6).shape[0]


def _centroid_offset(kernel):
    k = np.asarray(kernel, dtype=np.float64)
    c = (k.shape[0] - 1) / 2.0
    idx = np.arange(k.shape[0])
    return (k.sum(axis=1) @ idx - c * k.sum()) / k.sum(), (k.sum(axis=0) @ idx - c * k.sum()) / k.sum()


def _point_response_peak(kernel):
    img = np.zeros((1, 64, 64))
    img[0, 31, 40] = 1.0
    out = psf.convolve(img, kernel[None])[0]
    return np.unravel_index(np.argmax(out), out.shape)


def _assert_centred(kernel):
    dy, dx = _centroid_offset(kernel)
    assert abs(dy) < 1e-9 and abs(dx) < 1e-9, f"kernel centroid off by ({dy:.3f}, {dx:.3f}) px"
    assert _point_response_peak(kernel) == (31, 40), "a point source moved under convolution"


@pytest.mark.parametrize("model", psf.PSF_MODELS)
def test_kernels_are_centred_and_off_centre_kernel_fails(model):
    k = psf.make_kernels(1.2, model)
    _assert_centred(k)
    shifted = np.roll(k, 1, axis=1)  # one pixel off: the classic FFT-kernel bug
    with pytest.raises(AssertionError):
        _assert_centred(shifted)


def test_convolve_matches_direct_convolution_same_mode():
    rng = np.random.default_rng(1)
    imgs = rng.normal(size=(3, 64, 64))
    kernels = psf.make_kernels(np.array([0.8, 1.3, 1.6]), "moffat", beta=2.5)
    out = psf.convolve(imgs, kernels)
    for i in range(3):
        ref = scipy.signal.convolve2d(imgs[i], kernels[i], mode="same", boundary="fill")
        np.testing.assert_allclose(out[i], ref, atol=1e-10)


def test_convolve_general_kernels_and_convolve_psf():
    rng = np.random.default_rng(2)
    imgs = rng.normal(size=(2, 64, 64))
    lopsided = rng.uniform(size=(2, 7, 7))  # not symmetric: takes the general FFT path
    out = psf.convolve(imgs, lopsided)
    for i in range(2):
        ref = scipy.signal.convolve2d(imgs[i], lopsided[i], mode="same", boundary="fill")
        np.testing.assert_allclose(out[i], ref, atol=1e-10)
    # one image per stamp against three band kernels, without building the kernels
    fwhm = np.array([[1.5, 1.3, 1.2], [0.9, 0.8, 0.8]])
    got = psf.convolve_psf(imgs[:, None], fwhm, "moffat", beta=2.5)
    want = psf.convolve(np.repeat(imgs[:, None], 3, axis=1), psf.make_kernels(fwhm.ravel(), "moffat", 2.5).reshape(2, 3, 127, 127))
    assert got.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
def test_symmetric_spectrum_equals_rfft2_of_the_wrapped_kernel(dtype):
    """The cosine-matrix spectrum of symmetric kernels equals the rfft2 of the full wrapped kernels (its
    previous formulation, a DCT-I of the zero-padded quadrant, is the same transform)."""
    quad = psf.kernel_quadrants(np.array([0.9, 1.4, 2.2]), "moffat", beta=3.5).astype(dtype)
    for nh, nw in ((96, 96), (100, 90)):
        got = psf._symmetric_spectrum(quad, nh, nw, dtype)
        want = scipy.fft.rfft2(psf._wrapped_kernels(psf._mirror(quad), nh, nw, np.float64))
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want.real, atol=1e-12 if dtype == np.float64 else 1e-6)
        assert np.abs(want.imag).max() < 1e-12


def test_point_source_at_edge_does_not_wrap_around():
    img = np.zeros((1, 64, 64))
    img[0, 0, 20] = 1.0  # on the bottom edge
    k = psf.moffat_kernel(1.6, 4.5)[None]  # 51 px: reaches 25 rows up, not the top rows
    assert k.shape[-1] < 64
    out = psf.convolve(img, k)[0]
    assert out[-8:].sum() == pytest.approx(0.0, abs=1e-12)  # nothing may appear on the top rows
    assert out[:3].sum() > 0.1
    # The same check catches a circular (unpadded) FFT convolution:
    kpad = np.zeros((64, 64))
    c = k.shape[-1] // 2
    kpad[: 2 * c + 1, : 2 * c + 1] = k[0]
    kpad = np.roll(kpad, (-c, -c), (0, 1))  # correctly centred, but no padding of the image
    wrapped = np.real(np.fft.ifft2(np.fft.fft2(img[0]) * np.fft.fft2(kpad)))
    assert wrapped[-8:].sum() > 1e-3


def test_convolution_conserves_flux_away_from_edges_and_keeps_float32():
    img = np.zeros((2, 3, 64, 64), dtype=np.float32)
    img[:, :, 30:34, 28:33] = 1.0
    k = psf.make_kernels(np.array([1.0, 1.2, 1.4, 1.6, 0.9, 1.1]), "moffat", beta=4.5)
    k = k.reshape(2, 3, *k.shape[-2:])
    out = psf.convolve(img, k)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out.sum(axis=(-2, -1)), img.sum(axis=(-2, -1)), rtol=2e-4)


def test_bad_psf_input_is_refused():
    with pytest.raises(DHSError, match="unknown PSF model"):
        psf.make_kernels(1.0, "airy")
    with pytest.raises(DHSError, match="beta"):
        psf.make_kernels(1.0, "moffat", beta=1.0)
    with pytest.raises(DHSError, match="FWHM"):
        psf.make_kernels(np.array([1.0, np.nan]), "gaussian")
    with pytest.raises(DHSError, match="FWHM"):
        psf.make_kernels(-1.0, "gaussian")
    with pytest.raises(DHSError, match="odd"):
        psf.gaussian_kernel(1.0, size=10)
    with pytest.raises(DHSError, match="odd"):
        psf.convolve(np.zeros((1, 8, 8)), np.ones((1, 4, 4)))
