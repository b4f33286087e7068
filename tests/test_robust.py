"""The compiled median / MAD normalisation equals the numpy formulation bit for bit."""

import numpy as np
import pytest

from darkhaloscope.stamps import contract, robust


# The contract's outer annulus written out independently of contract.OUTER_ANNULUS: pixel centres more
# than 16 px from the stamp centre (31.5, 31.5), i.e. 3284 of the 4096 pixels.
_yy, _xx = np.mgrid[:64, :64]
LITERAL_ANNULUS = np.hypot(_xx - 31.5, _yy - 31.5) > 16


def test_outer_annulus_is_r_greater_than_16_px():
    assert LITERAL_ANNULUS.sum() == 3284
    assert np.array_equal(contract.OUTER_ANNULUS, LITERAL_ANNULUS)
    assert contract.OUTER_ANNULUS.sum() == 3284


def _reference(images):
    outer = images[..., LITERAL_ANNULUS]
    med = np.median(outer, axis=-1)
    mad = np.maximum(np.median(np.abs(outer - med[..., None]), axis=-1) * np.float32(1.4826), np.float32(1e-8))
    out = np.clip((images - med[..., None, None]) / mad[..., None, None], -10, 10)
    return out.astype(np.float32)


def _orders(n, rng):
    """Inputs that break naive quickselects: sorted, reversed, constant, organ pipe, few distinct values."""
    base = np.arange(n, dtype=np.float32)
    pipe = np.concatenate([base[: n // 2], base[: n - n // 2][::-1]])
    return [base, base[::-1].copy(), np.zeros(n, np.float32), pipe,
            rng.integers(0, 3, n).astype(np.float32), rng.normal(size=n).astype(np.float32),
            np.repeat(rng.normal(size=n // 8 + 1), 8)[:n].astype(np.float32)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 64, 1001, 1024, 1025, 3284, 3285])
def test_median_equals_numpy(n):
    rng = np.random.default_rng(n)
    for a in _orders(n, rng):
        expect = np.median(a)
        got = robust.median_inplace(a.copy(), np.empty(n, np.float32), np.empty(robust.SAMPLE, np.float32))
        assert np.float32(got) == np.float32(expect), (n, a[:8])


@pytest.mark.parametrize("k", [0, 1, 5, 1641, 1642, 3283])
def test_select_partitions_around_k(k):
    rng = np.random.default_rng(k)
    for a in _orders(3284, rng):
        b = a.copy()
        v = robust.select_inplace(b, k)
        assert v == np.sort(a)[k]
        assert (b[:k] <= v).all() and (b[k + 1:] >= v).all()
        assert np.array_equal(np.sort(b), np.sort(a))


def test_normalise_equals_numpy_on_realistic_and_degenerate_stamps():
    rng = np.random.default_rng(3)
    sky = rng.normal(0.0, 0.01, size=(6, 3, 64, 64)).astype(np.float32)
    sky[:, :, 24:40, 24:40] += 5.0  # a bright centre
    sky[1] = np.round(sky[1] * 300) / 300  # heavy ties in the annulus
    sky[2, 1] = 0.25  # a constant band: MAD 0 -> the 1e-8 floor
    sky[3] *= np.float32(1e6)  # large values clip at +-10
    got = contract.normalize_stamps(sky)
    assert got.dtype == np.float32 and got.shape == sky.shape
    assert np.array_equal(got, _reference(sky))
    assert np.abs(got).max() == 10.0


def test_a_nan_in_the_annulus_makes_that_band_nan():
    images = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    images[1, 2, 0, 0] = np.nan  # a corner pixel: inside the outer annulus
    got = contract.normalize_stamps(images)
    assert np.isnan(got[1, 2]).all()
    assert np.array_equal(got[0], _reference(images[:1])[0]) and np.isfinite(got[1, :2]).all()


def test_wrong_shape_is_refused():
    with pytest.raises(contract.DHSError, match="expected"):
        contract.normalize_stamps(np.zeros((2, 3, 32, 32), np.float32))
    images = np.zeros((2, 3, 64, 64), np.float32)
    for out in (np.zeros((2, 3, 64, 64)), np.zeros((3, 2, 64, 64), np.float32).transpose(1, 0, 2, 3)):
        with pytest.raises(contract.DHSError, match="out must be"):
            contract.normalize_stamps(images, out=out)
    with pytest.raises(contract.DHSError, match="codes in 0..7"):
        contract.normalize_stamps(images, symmetries=[0, 8])


def test_in_place_equals_out_of_place():
    images = np.random.default_rng(2).normal(size=(5, 3, 64, 64)).astype(np.float32)
    codes = np.arange(5)
    expect = contract.normalize_stamps(images, codes)
    assert contract.normalize_stamps(images, codes, out=images) is not None
    assert np.array_equal(images, expect)
