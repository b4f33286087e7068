"""Noiseless lensed-arc renderer (SIE + shear, Sersic source with optional Gaussian clumps, PSF per
band) and arc S/N.

The source's unlensed total flux is fixed in the source plane and ray-traced: the lensed image carries
the magnification and is never renormalised.

Sub-pixel sampling without paying for it everywhere: the ray-trace is first evaluated at the
(H+1) x (W+1) pixel corners. Where the source is negligible the pixel value is the mean of its four
corners (a 2x2 trapezoid rule, exact enough for a smooth, faint profile). A pixel is supersampled
(s x s sub-pixel centres, averaged) when its traced footprint may come close to the source: the
smallest elliptical source radius among its traced corners, minus CORNER_MARGIN times the length of
its traced diagonals (a pixel near a critical curve or the lens centre is stretched and folded in the
source plane; the margin covers that), is below the radius where the source's surface brightness
falls to SB_TOL times its value at r_eff. Every pixel where the source is not negligible is thus
averaged over s x s sub-pixels, exactly like a full supersampled render (tests compare with
lenstronomy doing the full render). With supersample = 1 those pixels are point-sampled at their
centres (for comparison only: point sampling misestimates compact sources by tens of percent).

Speed: the per-point arithmetic of the trace (rotations, the lens equation, the source frame, the
corner tests, the sub-pixel positions and averages) runs in small numba kernels, one fused pass each;
the transcendentals (arctan, arctanh, log, exp) stay whole-array numpy calls in between, because
numpy's SIMD versions are ~10x faster than the scalar libm calls of compiled code here.

Clumps (optional): circular Gaussians in the source plane, each with a fraction of the unlensed source
flux (the Sersic keeps the rest), evaluated at the same traced corners and sub-pixel centres as the
Sersic; a pixel is supersampled also where its traced footprint may reach CLUMP_SIGMAS sigmas of a
clump. Stamps without clumps take exactly the path of a smooth source.

The lens equation inside the kernels repeats ``physics/lens.py`` (the reference) in fused form, on purpose:
tests/test_physics_render.py compares the two, so a change to one that is not made to the other fails there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np

from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.physics import psf as psf_mod
from darkhaloscope.simulation.physics.lens import PSI_FLOOR, q_capped, rotate_shear
from darkhaloscope.simulation.physics.light import R_FLOOR, sersic_b, sersic_norm
from darkhaloscope.stamps.contract import PIXEL_SCALE_ARCSEC, STAMP_SIZE

LENS_KEYS = ("theta_e", "q", "phi", "gamma1", "gamma2", "x0", "y0")
SOURCE_KEYS = ("x", "y", "r_eff", "n", "q", "phi", "flux_g", "flux_r", "flux_z")
FLUX_KEYS = ("flux_g", "flux_r", "flux_z")
CLUMP_KEYS = ("x", "y", "sigma", "frac")
SB_TOL = 1e-2
# A clump's reach for the supersampling test, in Gaussian sigmas: its surface brightness there is
# exp(-8) = 3e-4 of its peak. Beyond CLUMP_EXP_MAX (e^-30) the exponential is not evaluated.
CLUMP_SIGMAS = 4.0
CLUMP_EXP_MAX = np.float32(30.0)
CORNER_MARGIN = 1.0
CORNER_MARGIN32 = np.float32(CORNER_MARGIN)


@dataclass
class ArcRender:
    """Result of render_arcs (also readable as a mapping: ``result["images"]``).

    images: (B, 3, H, W) float32, PSF-convolved noiseless arc in nanomaggies per pixel (g, r, z).
    magnification: (B,) total lensed flux inside the stamp before the PSF / unlensed flux.
    lensed_flux: (B, 3) nanomaggies inside the stamp before the PSF.
    n_supersampled: (B,) number of pixels that were supersampled.
    """

    images: np.ndarray
    magnification: np.ndarray
    lensed_flux: np.ndarray
    n_supersampled: np.ndarray = field(repr=False)

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return ("images", "magnification", "lensed_flux", "n_supersampled")


def _batch_params(mapping, keys, what) -> dict[str, np.ndarray]:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise DHSError(f"{what} parameters missing: {', '.join(missing)}")
    out = {k: np.atleast_1d(np.asarray(mapping[k], dtype=np.float64)) for k in keys}
    sizes = {v.shape for v in out.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise DHSError(f"{what} parameters must be 1-d arrays of one length, got shapes {sorted(sizes)}")
    bad = [k for k, v in out.items() if not np.all(np.isfinite(v))]
    if bad:
        raise DHSError(f"{what} parameters not finite: {', '.join(bad)}")
    return out


def _check_ranges(lens, src):
    checks = (
        (lens["theta_e"] > 0, "lens theta_e must be > 0"),
        ((lens["q"] > 0) & (lens["q"] <= 1), "lens q must be in (0, 1]"),
        (src["r_eff"] > 0, "source r_eff must be > 0"),
        ((src["n"] >= 0.2) & (src["n"] <= 8), "source n must be in [0.2, 8]"),
        ((src["q"] > 0) & (src["q"] <= 1), "source q must be in (0, 1]"),
    )
    for ok, message in checks:
        if not np.all(ok):
            raise DHSError(message)


# Stamps per pass (arcs here, backgrounds in scene.py): 16 keeps the float32 buffers of a pass inside the CPU
# cache; FFT_CHUNK stamps per FFT convolution call (complex spectra of 4 x 3 bands fit in L2).
CHUNK = 16
FFT_CHUNK = 4

# Columns of the (B, len(PARAM_COLUMNS)) float32 table of per-stamp constants read by the trace kernels.
PARAM_COLUMNS = ("x0", "y0", "cos_l", "sin_l", "q", "f", "b_over_f", "g1p", "g2p", "cxp", "cyp", "cos_s", "sin_s",
                 "sq", "half_inv_n", "log_t0", "neg_b", "log_amp", "r_cut")
(X0, Y0, COS_L, SIN_L, Q, F, B_OVER_F, G1P, G2P, CXP, CYP, COS_S, SIN_S, SQ, HALF_INV_N, LOG_T0, NEG_B, LOG_AMP,
 R_CUT) = range(len(PARAM_COLUMNS))
R2_FLOOR = np.float32(R_FLOOR**2)
PSI_FLOOR32 = np.float32(PSI_FLOOR)


def _flat_params(lens, src) -> np.ndarray:
    """(B, len(PARAM_COLUMNS)) float32 per-stamp constants of the trace and the source."""
    n = src["n"]
    b = sersic_b(n)
    g1p, g2p = rotate_shear(lens["gamma1"], lens["gamma2"], lens["phi"])
    cl, sl = np.cos(lens["phi"]), np.sin(lens["phi"])
    dphi = src["phi"] - lens["phi"]  # source axes seen from the lens frame
    p = dict(
        x0=lens["x0"], y0=lens["y0"], cos_l=cl, sin_l=sl, g1p=g1p, g2p=g2p,
        # source centre in the lens frame (src x, y are relative to the lens centre)
        cxp=cl * src["x"] + sl * src["y"], cyp=cl * src["y"] - sl * src["x"],
        cos_s=np.cos(dphi), sin_s=np.sin(dphi), sq=np.sqrt(src["q"]),
        # Sersic: SB = exp(log_amp - b t), t = (R / r_eff)^(1/n) = exp(half_inv_n ln R^2 + log_t0)
        half_inv_n=0.5 / n, log_t0=-np.log(src["r_eff"]) / n, neg_b=-b,
        log_amp=np.log(sersic_norm(1.0, src["r_eff"], n)) + b,
        # product-average radius where the surface brightness is SB_TOL times its value at r_eff
        r_cut=src["r_eff"] * (1.0 - np.log(SB_TOL) / b) ** n,
    )
    p = {k: v.astype(np.float32) for k, v in p.items()}
    # SIE constants in float32, as ray_shoot_lens_frame computes them for float32 inputs
    p["q"] = q_capped(lens["q"].astype(np.float32))
    p["f"] = np.sqrt(1 - p["q"] * p["q"])
    p["b_over_f"] = lens["theta_e"].astype(np.float32) * np.sqrt(p["q"]) / p["f"]
    return np.stack([p[k] for k in PARAM_COLUMNS], axis=1)


@numba.njit(cache=True)
def _lens_frame(p, x, y, lo, xp, yp, at, ath):
    """Points (x, y), those of stamp k at lo[k]:lo[k + 1] -> lens-frame (xp, yp) and the arguments of the
    SIE's arctan and arctanh, f xp / psi and f yp / psi. Compiled: numpy needs ~12 passes with
    temporaries and per-point copies of the stamp constants for this (the arctan and arctanh stay in
    numpy, whose SIMD versions beat the scalar libm calls of compiled code)."""
    for k in range(p.shape[0]):
        x0, y0, c, s, q, f = p[k, X0], p[k, Y0], p[k, COS_L], p[k, SIN_L], p[k, Q], p[k, F]
        xk, yk = x[lo[k]:lo[k + 1]], y[lo[k]:lo[k + 1]]
        xpk, ypk, atk, athk = xp[lo[k]:lo[k + 1]], yp[lo[k]:lo[k + 1]], at[lo[k]:lo[k + 1]], ath[lo[k]:lo[k + 1]]
        for i in range(xk.size):
            dx = xk[i] - x0
            dy = yk[i] - y0
            xl = c * dx + s * dy
            yl = c * dy - s * dx
            psi = math.sqrt((q * xl) * (q * xl) + yl * yl)
            inv_psi = np.float32(1.0) / (PSI_FLOOR32 if psi < PSI_FLOOR32 else psi)  # NaN stays NaN (np.maximum)
            xpk[i] = xl
            ypk[i] = yl
            atk[i] = f * xl * inv_psi
            athk[i] = f * yl * inv_psi


@numba.njit(cache=True)
def _source_frame(p, lo, xp, yp, at, ath, u, v, r2):
    """Lens-frame points and the arctan / arctanh of _lens_frame's arguments -> source-frame (u, v)
    (elliptical radius sqrt(u^2 + v^2)) and the floored R^2. Compiled for the same reason as _lens_frame."""
    for k in range(p.shape[0]):
        bof, g1, g2, cx, cy = p[k, B_OVER_F], p[k, G1P], p[k, G2P], p[k, CXP], p[k, CYP]
        c, s, sq = p[k, COS_S], p[k, SIN_S], p[k, SQ]
        xk, yk, atk, athk = xp[lo[k]:lo[k + 1]], yp[lo[k]:lo[k + 1]], at[lo[k]:lo[k + 1]], ath[lo[k]:lo[k + 1]]
        uk, vk, r2k = u[lo[k]:lo[k + 1]], v[lo[k]:lo[k + 1]], r2[lo[k]:lo[k + 1]]
        for i in range(xk.size):
            bx = xk[i] - bof * atk[i] - (g1 * xk[i] + g2 * yk[i]) - cx
            by = yk[i] - bof * athk[i] - (g2 * xk[i] - g1 * yk[i]) - cy
            uu = (c * bx + s * by) * sq
            vv = (c * by - s * bx) / sq
            rr = uu * uu + vv * vv
            uk[i] = uu
            vk[i] = vv
            r2k[i] = R2_FLOOR if rr < R2_FLOOR else rr


@numba.njit(cache=True)
def _affine(p, lo, t, scale, offset):
    """In place t = p[k, offset] + p[k, scale] t for the points lo[k]:lo[k + 1] of each stamp k (numpy
    would need per-point copies of both constants)."""
    for k in range(p.shape[0]):
        a, b = p[k, offset], p[k, scale]
        tk = t[lo[k]:lo[k + 1]]
        for i in range(tk.size):
            tk[i] = a + b * tk[i]


def _trace(p, x, y, lo):
    """Ray-trace points (x, y) (flat float32; those of stamp k at lo[k]:lo[k + 1]) -> source-frame (u, v),
    R^2 and the unit-flux surface brightness exp(log_amp - b exp(half_inv_n ln R^2 + log_t0))."""
    xp, yp, at, ath, u, v, r2 = (np.empty(x.size, np.float32) for _ in range(7))
    _lens_frame(p, x, y, lo, xp, yp, at, ath)
    np.arctan(at, out=at)
    np.arctanh(ath, out=ath)
    _source_frame(p, lo, xp, yp, at, ath, u, v, r2)
    t = np.log(r2, out=xp)
    _affine(p, lo, t, HALF_INV_N, LOG_T0)
    np.exp(t, out=t)
    _affine(p, lo, t, NEG_B, LOG_AMP)
    return u, v, r2, np.exp(t, out=t)


@numba.njit(cache=True)
def _corner_pixels(u, v, r2, sb, r_cut):
    """Traced (B, H+1, W+1) corners -> trapezoid pixel values (B, H, W) and the mask of pixels to
    supersample (see the module docstring). Compiled: numpy needs ~16 shifted-slice passes for this."""
    nb, m, _ = u.shape
    image = np.empty((nb, m - 1, m - 1), np.float32)
    near = np.empty((nb, m - 1, m - 1), np.bool_)
    for k in range(nb):
        for i in range(m - 1):
            for j in range(m - 1):
                corners = sb[k, i, j] + sb[k, i, j + 1] + sb[k, i + 1, j] + sb[k, i + 1, j + 1]
                image[k, i, j] = np.float32(0.25) * corners
                r2_min = min(min(r2[k, i, j], r2[k, i, j + 1]), min(r2[k, i + 1, j], r2[k, i + 1, j + 1]))
                du1, dv1 = u[k, i + 1, j + 1] - u[k, i, j], v[k, i + 1, j + 1] - v[k, i, j]
                du2, dv2 = u[k, i + 1, j] - u[k, i, j + 1], v[k, i + 1, j] - v[k, i, j + 1]
                diag = math.sqrt(max(du1 * du1 + dv1 * dv1, du2 * du2 + dv2 * dv2))
                near[k, i, j] = math.sqrt(r2_min) - CORNER_MARGIN32 * diag < r_cut[k]
    return image, near


@numba.njit(cache=True)
def _subpixel_points(near, centre, scale, sx, sy):
    """Sub-pixel centres (x, y) of the pixels flagged in ``near`` (B, H, W), pixel by pixel in row-major
    order, and the offsets lo of each stamp's points (lo[k]:lo[k + 1]). Compiled: numpy needs
    np.nonzero, per-pixel index arrays and two broadcast temporaries for this."""
    nb, h, w = near.shape
    lo = np.zeros(nb + 1, np.int64)
    for k in range(nb):
        lo[k + 1] = lo[k] + np.count_nonzero(near[k]) * sx.size
    x = np.empty(lo[nb], np.float32)
    y = np.empty(lo[nb], np.float32)
    n = 0
    for k in range(nb):
        for i in range(h):
            for j in range(w):
                if near[k, i, j]:
                    px = (np.float32(j) - centre) * scale
                    py = (np.float32(i) - centre) * scale
                    for m in range(sx.size):
                        x[n] = px + sx[m]
                        y[n] = py + sy[m]
                        n += 1
    return x, y, lo


@numba.njit(cache=True)
def _fill_supersampled(image, near, sb, n_sub):
    """image[near] = mean of each flagged pixel's n_sub consecutive sub-pixel values (the order of
    _subpixel_points). Compiled: numpy needs a reshape-mean and a fancy-indexed scatter."""
    nb, h, w = near.shape
    n = 0
    for k in range(nb):
        for i in range(h):
            for j in range(w):
                if near[k, i, j]:
                    total = np.float32(0.0)
                    for m in range(n_sub):
                        total += sb[n + m]
                    image[k, i, j] = total / np.float32(n_sub)
                    n += n_sub


def _clump_table(clumps, src, nb):
    """Clump mapping of (B, K) arrays x, y (source-plane offset from the source centre, arcsec, the
    stamp's axes), sigma (Gaussian sigma, arcsec), frac (share of the unlensed source flux; NaN or 0 =
    empty slot) -> None when no stamp has a clump, else (table (B, K, 4) float32 of the used clumps
    first: offset along the source's major and minor axes, 1 / (2 sigma^2), frac / (2 pi sigma^2); (B,)
    int64 clump counts; (B,) float32 share of the smooth Sersic; (B,) source radius R that covers
    CLUMP_SIGMAS sigmas of every clump)."""
    if clumps is None:
        return None
    missing = [k for k in CLUMP_KEYS if k not in clumps]
    if missing:
        raise DHSError(f"clump parameters missing: {', '.join(missing)}")
    c = {k: np.asarray(clumps[k], dtype=np.float64) for k in CLUMP_KEYS}
    shapes = {v.shape for v in c.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != nb:
        raise DHSError(f"clump parameters must be ({nb}, K) arrays, got shapes {sorted(shapes)}")
    frac = c["frac"]
    used = np.isfinite(frac) & (frac != 0)
    if not used.any():
        return None
    if np.any(frac[used] < 0):
        raise DHSError("clump frac must be >= 0")
    bad = [k for k in ("x", "y", "sigma") if not np.all(np.isfinite(c[k][used]))]
    if bad:
        raise DHSError(f"clump parameters not finite: {', '.join(bad)}")
    if np.any(c["sigma"][used] <= 0):
        raise DHSError("clump sigma must be > 0")
    total = np.where(used, frac, 0.0).sum(axis=1)
    if np.any(total > 1.0 + 1e-9):
        raise DHSError(f"clump fractions of a source sum to more than 1 (max {total.max():.6g})")
    order = np.argsort(~used, axis=1, kind="stable")  # used slots first, in slot order
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    used, fr = take(used), np.where(take(used), take(frac), 0.0)
    x, y, sig = (np.where(used, take(c[k]), 0.0) for k in ("x", "y", "sigma"))
    sig = np.where(used, sig, 1.0)
    phi = np.asarray(src["phi"], np.float64)[:, None]
    cs, ss = np.cos(phi), np.sin(phi)
    major, minor = cs * x + ss * y, cs * y - ss * x  # the source's own axes
    sq = np.sqrt(np.asarray(src["q"], np.float64))[:, None]
    reach = np.hypot(major * sq, minor / sq) + CLUMP_SIGMAS * sig / sq  # R moves <= d / sqrt(q) for a shift d
    table = np.stack([major, minor, 0.5 / sig**2, fr / (2 * np.pi * sig**2)], axis=-1).astype(np.float32)
    return (table, used.sum(axis=1).astype(np.int64), np.maximum(1.0 - total, 0.0).astype(np.float32),
            np.where(used, reach, 0.0).max(axis=1))


@numba.njit(cache=True)
def _add_clumps(p, table, count, smooth, lo, u, v, sb):
    """In place sb = smooth * sb + the clumps' unit-flux surface brightness at the traced source-frame
    points (u, v) of each stamp k (lo[k]:lo[k + 1]); (u / sqrt(q), v sqrt(q)) is the point's offset from
    the source centre along the source's axes. Compiled, one clump at a time over the stamp's points;
    no exponential is evaluated for points farther than sqrt(2 CLUMP_EXP_MAX) sigmas from a clump."""
    for k in range(p.shape[0]):
        if count[k] == 0:  # smooth[k] is then exactly 1
            continue
        sq = p[k, SQ]
        inv_sq = np.float32(1.0) / sq
        w = smooth[k]
        for i in range(lo[k], lo[k + 1]):
            sb[i] *= w
        for j in range(count[k]):
            cx, cy, inv_two_s2, amp = table[k, j, 0], table[k, j, 1], table[k, j, 2], table[k, j, 3]
            for i in range(lo[k], lo[k + 1]):
                dx = u[i] * inv_sq - cx
                dy = v[i] * sq - cy
                arg = (dx * dx + dy * dy) * inv_two_s2
                if arg < CLUMP_EXP_MAX:
                    sb[i] += amp * math.exp(-arg)


def _trace_light(p, x, y, lo, clumps):
    """_trace, with the clumps (a chunk of _clump_table's output, or None) added to the surface brightness."""
    u, v, r2, sb = _trace(p, x, y, lo)
    if clumps is not None:
        _add_clumps(p, *clumps, lo, u, v, sb)
    return u, v, r2, sb


def lensed_unit_images(lens, src, supersample=4, size=STAMP_SIZE, scale=PIXEL_SCALE_ARCSEC, clumps=None):
    """(B, H, W) float32 lensed surface brightness of a unit-flux source (the Sersic plus the optional
    ``clumps``, see render_arcs) averaged over each pixel (flux per arcsec^2), plus the (B,) count of
    supersampled pixels. See the module docstring."""
    s = int(supersample)
    if s < 1 or s != supersample:
        raise DHSError(f"supersample must be a positive integer, got {supersample}")
    p = _flat_params(lens, src)
    ct = _clump_table(clumps, src, p.shape[0])
    if ct is not None:  # supersample also where the footprint may reach a clump
        p[:, R_CUT] = np.maximum(p[:, R_CUT], ct[3].astype(np.float32))
    nb = p.shape[0]
    edges = ((np.arange(size + 1) - 0.5 - (size - 1) / 2.0) * scale).astype(np.float32)
    yc, xc = (a.ravel() for a in np.meshgrid(edges, edges, indexing="ij"))
    sub = (((np.arange(s) + 0.5) / s - 0.5) * scale).astype(np.float32)
    sy, sx = (a.ravel() for a in np.meshgrid(sub, sub, indexing="ij"))
    centre = np.float32((size - 1) / 2.0)
    image = np.empty((nb, size, size), dtype=np.float32)
    n_super = np.zeros(nb, dtype=np.int64)
    for start in range(0, nb, CHUNK):
        pc = p[start:start + CHUNK]
        nc = len(pc)
        cc = None if ct is None else tuple(a[start:start + CHUNK] for a in ct[:3])
        traced = _trace_light(pc, np.tile(xc, nc), np.tile(yc, nc), np.arange(nc + 1) * xc.size, cc)
        img, near = _corner_pixels(*(a.reshape(nc, size + 1, size + 1) for a in traced), pc[:, R_CUT])
        x, y, lo = _subpixel_points(near, centre, np.float32(scale), sx, sy)
        _fill_supersampled(img, near, _trace_light(pc, x, y, lo, cc)[3], sx.size)
        n_super[start:start + nc] = np.diff(lo) // sx.size
        image[start:start + nc] = img
    return image, n_super


def render_arcs(lens, source, psf_fwhm, psf_model, moffat_beta=3.5, supersample=4,
                size=STAMP_SIZE, scale=PIXEL_SCALE_ARCSEC, clumps=None) -> ArcRender:
    """Render the noiseless, PSF-convolved lensed arc of a batch of B lens systems in g, r, z.

    lens: mapping of (B,) arrays theta_e (arcsec), q, phi (rad), gamma1, gamma2, x0, y0 (arcsec,
      lens centre relative to the stamp centre).
    source: mapping of (B,) arrays x, y (source-plane position in arcsec relative to the lens centre),
      r_eff (arcsec, product-average half-light radius), n, q, phi (rad), flux_g, flux_r, flux_z
      (unlensed total flux, nanomaggies).
    psf_fwhm: (B, 3) arcsec per band (g, r, z); psf_model "gaussian" or "moffat" (with moffat_beta).
    clumps: optional mapping of (B, K) arrays x, y (source-plane offset of each clump from the source
      centre, arcsec, the stamp's axes), sigma (circular Gaussian sigma, arcsec), frac (share of the
      unlensed source flux, the same in every band; NaN or 0 = empty slot). The Sersic keeps
      1 - sum(frac), so flux_g/r/z stay the source's total unlensed flux.
    """
    lens_p = _batch_params(lens, LENS_KEYS, "lens")
    src_p = _batch_params(source, SOURCE_KEYS, "source")
    nb = lens_p["theta_e"].shape[0]
    if src_p["x"].shape[0] != nb:
        raise DHSError(f"lens has {nb} rows but source has {src_p['x'].shape[0]}")
    _check_ranges(lens_p, src_p)
    fwhm = np.asarray(psf_fwhm, dtype=np.float64)
    if fwhm.shape != (nb, len(FLUX_KEYS)):
        raise DHSError(f"psf_fwhm must have shape ({nb}, 3), got {fwhm.shape}")
    psf_mod.kernel_quadrants(fwhm[:1, 0], psf_model, beta=moffat_beta)  # validate model and beta up front
    psf_mod.kernel_quadrants(fwhm.ravel(), "gaussian", size=1)  # validate every FWHM (cheap)

    if nb == 0:
        return ArcRender(images=np.zeros((0, len(FLUX_KEYS), size, size), np.float32), magnification=np.zeros(0),
                         lensed_flux=np.zeros((0, len(FLUX_KEYS))), n_supersampled=np.zeros(0, np.int64))
    unit, n_super = lensed_unit_images(lens_p, src_p, supersample, size, scale, clumps)
    unit *= np.float32(scale * scale)  # flux per pixel of a unit-flux source
    magnification = unit.sum(axis=(1, 2), dtype=np.float64)
    flux = np.stack([src_p[k] for k in FLUX_KEYS], axis=1)  # (B, 3)
    # the bands share the unlensed shape: convolve the unit-flux image once per band kernel, then scale
    # (kernels of the whole batch, one shared size; FFTs FFT_CHUNK stamps at a time so that the complex
    # spectra stay in L2: ~2x faster than the whole batch at once, and the same result)
    quad = psf_mod.kernel_quadrants(fwhm.ravel(), psf_model, beta=moffat_beta, scale=scale).astype(np.float32)
    quad = quad.reshape(fwhm.shape + quad.shape[-2:])
    images = np.empty((nb, len(FLUX_KEYS), size, size), np.float32)
    for lo in range(0, nb, FFT_CHUNK):
        images[lo:lo + FFT_CHUNK] = psf_mod.convolve_quadrants(unit[lo:lo + FFT_CHUNK, None], quad[lo:lo + FFT_CHUNK])
    images *= flux[:, :, None, None].astype(np.float32)
    return ArcRender(images=images, magnification=magnification, lensed_flux=magnification[:, None] * flux,
                     n_supersampled=n_super)


def _variance(arc, sigma_pix, variance):
    if variance is not None:
        return np.broadcast_to(np.asarray(variance, dtype=np.float64), arc.shape)
    sigma = np.asarray(sigma_pix, dtype=np.float64).reshape(-1, *([1] * (arc.ndim - 1)))
    return np.broadcast_to(sigma**2, arc.shape)


def arc_snr(arc_images, sigma_pix=None, threshold=1.0, variance=None):
    """Integrated S/N of noiseless arcs: sum(arc) / sqrt(sum(variance)) over the pixels where the arc
    exceeds ``threshold`` times the per-pixel noise sigma; 0 when no pixel does.

    arc_images: (B, H, W) noiseless arc of one band (the r band by convention), nanomaggies.
    sigma_pix: (B,) per-pixel sky noise (nanomaggies), or ``variance`` (B, H, W) per-pixel variance
    (e.g. sky plus source Poisson) instead.
    """
    arc = np.asarray(arc_images, dtype=np.float64)
    if arc.ndim != 3:
        raise DHSError(f"arc_snr expects (B, H, W) images of one band, got shape {arc.shape}")
    if variance is None:  # one sigma per stamp: no per-pixel variance arrays needed
        sigma = np.asarray(sigma_pix, dtype=np.float64).reshape(-1)
        if np.any(~(sigma**2 > 0)):
            raise DHSError("arc_snr needs a positive, finite noise variance")
        mask = arc > (threshold * np.sqrt(sigma**2))[:, None, None]
        signal = np.where(mask, arc, 0.0).sum(axis=(1, 2))
        noise = np.sqrt(np.count_nonzero(mask, axis=(1, 2)) * sigma**2)
        return np.divide(signal, noise, out=np.zeros_like(signal), where=noise > 0)
    var = _variance(arc, sigma_pix, variance)
    if np.any(~(var > 0)):
        raise DHSError("arc_snr needs a positive, finite noise variance")
    mask = arc > threshold * np.sqrt(var)
    signal = np.where(mask, arc, 0.0).sum(axis=(1, 2))
    noise = np.sqrt(np.where(mask, var, 0.0).sum(axis=(1, 2)))
    return np.divide(signal, noise, out=np.zeros_like(signal), where=noise > 0)


def arc_snr_peak(arc_images, sigma_pix=None, variance=None):
    """Peak-pixel S/N of noiseless arcs: max over pixels of arc / sigma (the original pipeline's
    definition; kept as a second column)."""
    arc = np.asarray(arc_images, dtype=np.float64)
    if arc.ndim != 3:
        raise DHSError(f"arc_snr_peak expects (B, H, W) images of one band, got shape {arc.shape}")
    if variance is None:  # one sigma per stamp: x -> x / sigma is monotonic, so max(arc) / sigma is the same
        sigma = np.asarray(sigma_pix, dtype=np.float64).reshape(-1)
        if np.any(~(sigma**2 > 0)):
            raise DHSError("arc_snr_peak needs a positive, finite noise variance")
        return arc.max(axis=(1, 2)) / np.sqrt(sigma**2)
    var = _variance(arc, sigma_pix, variance)
    if np.any(~(var > 0)):
        raise DHSError("arc_snr_peak needs a positive, finite noise variance")
    return (arc / np.sqrt(var)).max(axis=(1, 2))
