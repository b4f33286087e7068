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


def _point_responses(k, model, fwhm, img):
    """The library's three convolution entry points on the same image: convolve (full kernel),
    convolve_psf (model + FWHM) and convolve_quadrants (the renderer's path)."""
    c = k.shape[-1] // 2
    return {"convolve": psf.convolve(img, k[None])[0],
            "convolve_psf": psf.convolve_psf(img, np.array([fwhm]), model, beta=3.5)[0],
            "convolve_quadrants": psf.convolve_quadrants(img, k[None, c:, c:])[0]}


@pytest.mark.parametrize("model", psf.PSF_MODELS)
def test_kernels_are_centred_and_convolution_keeps_a_point_source_in_place(model):
    k = psf.make_kernels(1.2, model, beta=3.5)
    dy, dx = _centroid_offset(k)
    assert abs(dy) < 1e-9 and abs(dx) < 1e-9, f"kernel centroid off by ({dy:.3f}, {dx:.3f}) px"
    assert np.unravel_index(np.argmax(k), k.shape) == (k.shape[0] // 2, k.shape[1] // 2)
    img = np.zeros((1, 64, 64))
    img[0, 31, 40] = 1.0
    for name, out in _point_responses(k, model, 1.2, img).items():
        assert np.unravel_index(np.argmax(out), out.shape) == (31, 40), name
        # symmetric about the source pixel: the kernel is applied centred, not shifted by a pixel
        patch = out[31 - 8:31 + 9, 40 - 8:40 + 9]
        np.testing.assert_allclose(patch, patch[::-1, ::-1], atol=1e-12, err_msg=name)


@pytest.mark.parametrize("shift", [(0, 1), (1, 0), (-2, 3)])
def test_convolve_takes_the_middle_element_as_the_kernel_centre(shift):
    """With a kernel that is one off-centre spike (the general, non-symmetric path), convolve moves
    the image by exactly that offset: element (K//2, K//2) is the kernel's origin, as documented."""
    dy, dx = shift
    k = np.zeros((7, 7))
    k[3 + dy, 3 + dx] = 1.0
    img = np.random.default_rng(0).normal(size=(1, 64, 64))
    out = psf.convolve(img, k[None])[0]
    want = np.zeros((64, 64))
    want[max(dy, 0):64 + min(dy, 0), max(dx, 0):64 + min(dx, 0)] = \
        img[0, max(-dy, 0):64 + min(-dy, 0), max(-dx, 0):64 + min(-dx, 0)]
    np.testing.assert_allclose(out, want, atol=1e-12)


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


@pytest.mark.parametrize("where", [(0, 20), (30, 63), (63, 63)])
def test_point_source_at_edge_does_not_wrap_around(where):
    """A point on an edge or corner: every convolution entry point equals scipy's zero-filled linear
    convolution (mode "same"), so flux that leaves the stamp is dropped and none reappears on the
    opposite side, as it would with a circular (unpadded) FFT."""
    img = np.zeros((1, 64, 64))
    img[0, where[0], where[1]] = 1.0
    k = psf.moffat_kernel(1.6, 3.5)  # 127 px: reaches across the whole stamp
    lopsided = k * np.linspace(0.5, 1.5, k.shape[0])[None, :]  # not symmetric: the general FFT path
    ref = scipy.signal.fftconvolve(img[0], k, mode="same")
    far = (63 - where[0], 63 - where[1])
    assert ref[far] < 1e-4 * ref[where]  # the opposite side gets (almost) nothing in the reference
    for name, out in _point_responses(k, "moffat", 1.6, img).items():
        np.testing.assert_allclose(out, ref, atol=1e-12, err_msg=name)
        assert out.sum() == pytest.approx(ref.sum(), rel=1e-10) and out.sum() < 0.9  # flux left the stamp
    out = psf.convolve(img, lopsided[None])[0]
    np.testing.assert_allclose(out, scipy.signal.fftconvolve(img[0], lopsided, mode="same"), atol=1e-12)


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
