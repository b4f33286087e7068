"""Arc renderer speed per core: darkhaloscope.simulation.physics.render.render_arcs vs lenstronomy, same arcs.

Both render 3-band (g, r, z), PSF-convolved, 4x4-supersampled 64x64 arcs of SIE + shear lenses and
elliptical Sersic sources, with the same pixel kernels. Single-threaded ("per core"). Prints a summary
and writes benchmarks/out/bench_render.json.

    python benchmarks/bench_render.py [--n 2000] [--n-ref 60] [--batch 256] [--prior realistic|grid_sota]
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from darkhaloscope.simulation.physics import light, psf, render  # noqa: E402
from darkhaloscope.stamps.contract import load_conditions  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def draw(n, prior, rng):
    """Lens/source/PSF draws from the JSON's realistic priors or its grid_sota ranges."""
    cond = load_conditions()
    rp = cond["realistic_source_priors"]
    q = cond["psfsize_r_fwhm_arcsec"]["quantiles"]
    fwhm_r = np.interp(rng.uniform(0, 1, n), [float(k) for k in q], list(q.values()))
    ratio = cond["psf_fwhm_mean_by_band_arcsec"]
    fwhm = np.stack([fwhm_r * ratio["g"] / ratio["r"], fwhm_r, fwhm_r * ratio["z"] / ratio["r"]], axis=1)
    if prior == "grid_sota":
        g = cond["injection_grid_sota"]
        theta_e = rng.choice(g["theta_e_arcsec"], n)
        r_eff = rng.choice(g["src_reff_arcsec"], n)
        shear = rng.choice(g["shear"], n)
        ang = rng.uniform(0, np.pi, n)
        g1, g2 = shear * np.cos(2 * ang), shear * np.sin(2 * ang)
    else:
        theta_e = rng.uniform(*rp["theta_e_arcsec"], n)
        r_eff = rng.uniform(*rp["src_reff_arcsec"], n)
        g1, g2 = rng.normal(0, rp["shear_component_sd"], (2, n))
    beta = theta_e * rng.uniform(*rp["beta_over_theta_e"], n)
    ang = rng.uniform(0, 2 * np.pi, n)
    flux_r = 10 ** (-0.4 * (rng.uniform(*rp["src_r_mag"], n) - 22.5))
    lens = dict(theta_e=theta_e, q=rng.uniform(*rp["lens_q"], n), phi=rng.uniform(0, np.pi, n), gamma1=g1,
                gamma2=g2, x0=rng.normal(0, 0.05, n), y0=rng.normal(0, 0.05, n))
    src = dict(x=beta * np.cos(ang), y=beta * np.sin(ang), r_eff=r_eff, n=rng.uniform(*rp["src_sersic_n"], n),
               q=rng.uniform(*rp["src_q"], n), phi=rng.uniform(0, np.pi, n),
               flux_g=flux_r * 10 ** (-0.4 * rng.normal(rp["src_g_minus_r"]["mean"], rp["src_g_minus_r"]["sd"], n)),
               flux_r=flux_r,
               flux_z=flux_r * 10 ** (0.4 * rng.normal(rp["src_r_minus_z"]["mean"], rp["src_r_minus_z"]["sd"], n)))
    return lens, src, fwhm


def subset(d, sl):
    return {k: v[sl] for k, v in d.items()}


def time_ours(lens, src, fwhm, model, beta, batch, repeats):
    n = fwhm.shape[0]
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            sl = slice(s, s + batch)
            render.render_arcs(subset(lens, sl), subset(src, sl), fwhm[sl], model, moffat_beta=beta)
        best = min(best, time.perf_counter() - t0)
    return n / best


def stage_times(lens, src, fwhm, model, beta, batch):
    """Seconds per arc of the stages of render_arcs (one pass over the first batch)."""
    sl = slice(0, batch)
    L = {k: np.asarray(v[sl], dtype=np.float64) for k, v in lens.items()}
    S = {k: np.asarray(v[sl], dtype=np.float64) for k, v in src.items()}
    n = fwhm[sl].shape[0]
    best = [np.inf] * 3
    for _ in range(3):
        t0 = time.perf_counter()
        unit, n_super = render.lensed_unit_images(L, S, 4)
        t1 = time.perf_counter()
        q = psf.kernel_quadrants(fwhm[sl].ravel(), model, beta=beta)
        t2 = time.perf_counter()
        psf.convolve_psf(unit[:, None], fwhm[sl], model, beta=beta)
        t3 = time.perf_counter()
        best = [min(b, t) for b, t in zip(best, (t1 - t0, t2 - t1, t3 - t2))]
    return dict(ray_trace_and_source_ms=1e3 * best[0] / n, kernels_ms=1e3 * best[1] / n,
                kernels_and_convolution_ms=1e3 * best[2] / n, mean_supersampled_pixels=float(n_super.mean()),
                kernel_size=int(2 * q.shape[-1] - 1))


def lenstronomy_arcs(lens, src, fwhm, model, beta):
    """Render with lenstronomy (one ImageModel, PSF swapped per band); returns (images, seconds)."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.LensModel.Profiles.sersic_utils import SersicUtil
    from lenstronomy.Util import param_util

    SersicUtil.b_n = staticmethod(light.sersic_b)  # same (exact) Sersic b_n as ours, for the accuracy check
    n = fwhm.shape[0]
    kernels = psf.make_kernels(fwhm.ravel(), model, beta=beta)
    kernels = kernels.reshape(n, 3, *kernels.shape[-2:])
    c = -(63 / 2) * 0.262
    data = ImageData(image_data=np.zeros((64, 64)), ra_at_xy_0=c, dec_at_xy_0=c, transform_pix2angle=np.eye(2) * 0.262)
    im = ImageModel(data, PSF(psf_type="PIXEL", kernel_point_source=kernels[0, 0]),
                    lens_model_class=LensModel(["SIE", "SHEAR"]), source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                    kwargs_numerics=dict(supersampling_factor=4))
    out = np.zeros((n, 3, 64, 64))

    def render(i):
        e1, e2 = param_util.phi_q2_ellipticity(lens["phi"][i], lens["q"][i])
        kl = [dict(theta_E=lens["theta_e"][i], e1=e1, e2=e2, center_x=lens["x0"][i], center_y=lens["y0"][i]),
              dict(gamma1=lens["gamma1"][i], gamma2=lens["gamma2"][i], ra_0=lens["x0"][i], dec_0=lens["y0"][i])]
        se1, se2 = param_util.phi_q2_ellipticity(src["phi"][i], src["q"][i])
        for b, band in enumerate("grz"):
            im.update_psf(PSF(psf_type="PIXEL", kernel_point_source=kernels[i, b]))
            ks = [dict(amp=light.sersic_norm(src[f"flux_{band}"][i], src["r_eff"][i], src["n"][i]),
                       R_sersic=src["r_eff"][i], n_sersic=src["n"][i], e1=se1, e2=se2,
                       center_x=lens["x0"][i] + src["x"][i], center_y=lens["y0"][i] + src["y"][i])]
            out[i, b] = im.image(kl, ks)

    render(0)  # warm-up: with numba installed lenstronomy compiles (or loads) its kernels on first use
    t0 = time.perf_counter()
    for i in range(n):
        render(i)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="arcs rendered by darkhaloscope per repeat")
    ap.add_argument("--n-ref", type=int, default=60, help="arcs rendered by lenstronomy (the same first ones)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prior", choices=("realistic", "grid_sota"), default="realistic")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    rng = np.random.default_rng(args.seed)
    lens, src, fwhm = draw(args.n, args.prior, rng)
    result = dict(prior=args.prior, n=args.n, n_ref=args.n_ref, batch=args.batch, supersample=4, threads=1,
                  machine=f"{platform.machine()} {os.cpu_count()} cpus ({platform.processor() or 'cpu'})",
                  models={})
    for model in ("gaussian", "moffat"):
        ours = time_ours(lens, src, fwhm, model, 3.5, args.batch, args.repeats)
        stages = stage_times(lens, src, fwhm, model, 3.5, args.batch)
        sl = slice(0, args.n_ref)
        ref, sec = lenstronomy_arcs(subset(lens, sl), subset(src, sl), fwhm[sl], model, 3.5)
        mine = render.render_arcs(subset(lens, sl), subset(src, sl), fwhm[sl], model, moffat_beta=3.5).images
        peak = ref.max(axis=(2, 3))
        rec = dict(ours_arcs_per_s=ours, lenstronomy_arcs_per_s=args.n_ref / sec, speedup=ours * sec / args.n_ref,
                   max_pixel_diff_over_peak=float((np.abs(mine - ref).max(axis=(2, 3)) / peak).max()),
                   max_flux_rel_diff=float(np.abs(mine.sum(axis=(2, 3)) / ref.sum(axis=(2, 3)) - 1).max()),
                   **stages)
        result["models"][model] = rec
        print(f"{model:8s}: ours {ours:7.1f} arcs/s/core  lenstronomy {rec['lenstronomy_arcs_per_s']:5.1f} arcs/s/core"
              f"  speed-up {rec['speedup']:5.1f}x  | trace {stages['ray_trace_and_source_ms']:.3f} ms,"
              f" kernels {stages['kernels_ms']:.3f} ms, kernels+convolution {stages['kernels_and_convolution_ms']:.3f} ms per arc"
              f" (K={stages['kernel_size']}, {stages['mean_supersampled_pixels']:.0f} supersampled px)"
              f" | vs lenstronomy: max |diff|/peak {rec['max_pixel_diff_over_peak']:.1e},"
              f" max flux diff {rec['max_flux_rel_diff']:.1e}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"bench_render_{args.prior}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
