"""Simulator speed: full-scene stamps/s per core (manifest -> parquet, both classes) against lenstronomy
rendering the arc alone for the same positives (SIE + SHEAR + SERSIC_ELLIPSE, 3 bands, 4x4 supersampling,
the same pixel PSF kernels), and peak RSS for N and 4N stamps (each in a fresh process).

Single-threaded on purpose (OMP/OpenBLAS/MKL threads = 1, set before numpy is imported) so the figure is
per core. Writes benchmarks/out/bench_simulator.json.

    python benchmarks/bench_simulator.py [--n 2048] [--n_lenstronomy 40] [--psf_model moffat]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def full_scenes(n: int, psf_model: str, batch_size: int, workdir: Path) -> dict:
    """Time manifest construction + rendering + parquet writing of n tasks (half controls)."""
    from darkhaloscope.simulation.inject import render_shard
    from darkhaloscope.simulation.manifest import build_manifest

    # warm-up on a small manifest (imports, FFT plans) so the timing is the steady state
    render_shard(build_manifest(64, seed=1), workdir / "warm", psf_model, 3.5, 0, 1, 64, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = build_manifest(n, seed=123)
    t1 = time.perf_counter()
    counts = render_shard(manifest, workdir / "data", psf_model, 3.5, 0, 1, batch_size, progress=False)
    t2, c2 = time.perf_counter(), time.process_time()
    assert sum(counts.values()) == n
    # per CPU-second as well as per wall-second: on a shared machine the wall clock includes time spent
    # waiting for a core, the CPU time of this (single-threaded) process does not
    return {"n": n, "manifest_s": t1 - t0, "render_write_s": t2 - t1, "stamps_per_s": n / (t2 - t0),
            "stamps_per_cpu_s": n / (c2 - c0), "manifest": manifest}


def lenstronomy_arcs(manifest, n_arcs: int, psf_model: str) -> dict:
    """lenstronomy rendering the noiseless arc alone (3 bands) of the first n_arcs positives."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util import numba_util, param_util, simulation_util

    from darkhaloscope.simulation.physics import light, psf
    from darkhaloscope.simulation.scene import column_arrays, render_arcs
    from darkhaloscope.stamps.contract import BANDS, PIXEL_SCALE_ARCSEC, STAMP_SIZE

    rows = column_arrays(manifest)
    pos = np.nonzero(rows["is_control"] == 0)[0][:n_arcs]
    sub = {k: v[pos] for k, v in rows.items()}
    data = ImageData(**simulation_util.data_configure_simple(STAMP_SIZE, PIXEL_SCALE_ARCSEC, inverse=False))
    lens_model = LensModel(["SIE", "SHEAR"])
    source_model = LightModel(["SERSIC_ELLIPSE"])
    numerics = {"supersampling_factor": 4, "supersampling_convolution": False}

    def arc_fluxes(i):
        e1, e2 = param_util.phi_q2_ellipticity(sub["lens_phi"][i], sub["lens_q"][i])
        kl = [{"theta_E": sub["theta_e_arcsec"][i], "e1": e1, "e2": e2, "center_x": sub["lens_x0"][i],
               "center_y": sub["lens_y0"][i]},
              {"gamma1": sub["shear_g1"][i], "gamma2": sub["shear_g2"][i], "ra_0": sub["lens_x0"][i],
               "dec_0": sub["lens_y0"][i]}]
        se1, se2 = param_util.phi_q2_ellipticity(sub["src_phi"][i], sub["src_q"][i])
        out = np.zeros(len(BANDS))
        for j, b in enumerate(BANDS):
            kernel = psf.make_kernels(sub[f"psfsize_{b}"][i], psf_model, 3.5)
            model = ImageModel(data, PSF(psf_type="PIXEL", kernel_point_source=kernel), lens_model_class=lens_model,
                               source_model_class=source_model, kwargs_numerics=numerics)
            amp = light.sersic_norm(sub[f"src_flux_{b}"][i], sub["src_reff"][i], sub["src_n"][i])
            ks = [{"amp": amp, "R_sersic": sub["src_reff"][i], "n_sersic": sub["src_n"][i], "e1": se1, "e2": se2,
                   "center_x": sub["lens_x0"][i] + sub["src_x"][i], "center_y": sub["lens_y0"][i] + sub["src_y"][i]}]
            out[j] = model.image(kwargs_lens=kl, kwargs_source=ks).sum()
        return out

    # warm-up: lenstronomy jit-compiles (or loads from its cache) its numba kernels on first use when numba
    # is installed, as it now is; the full scenes are timed after a warm-up too
    arc_fluxes(0)
    t0, c0 = time.perf_counter(), time.process_time()
    fluxes = np.array([arc_fluxes(i) for i in range(len(pos))])
    t1, c1 = time.perf_counter(), time.process_time()
    ours = render_arcs(sub, psf_model, 3.5)["arc"].sum(axis=(2, 3))
    return {"n_arcs": int(len(pos)), "seconds": t1 - t0, "arcs_per_s": len(pos) / (t1 - t0),
            "arcs_per_cpu_s": len(pos) / (c1 - c0), "lenstronomy_uses_numba": bool(numba_util.numba_enabled),
            "median_flux_ratio_ours_over_lenstronomy": float(np.median(ours / fluxes))}


def child_rss(n: int, psf_model: str, batch_size: int) -> None:
    """Run in a fresh process: manifest + render n stamps, print peak RSS (MiB)."""
    with tempfile.TemporaryDirectory() as tmp:
        res = full_scenes(n, psf_model, batch_size, Path(tmp))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"n": n, "peak_rss_mib": peak_mib, "stamps_per_s": res["stamps_per_s"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--n_lenstronomy", type=int, default=40)
    ap.add_argument("--psf_model", default="moffat", choices=("gaussian", "moffat"))
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lenstronomy_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip_rss", action="store_true")
    args = ap.parse_args()
    if args.child is not None:
        child_rss(args.child, args.psf_model, args.batch_size)
        return 0
    if args.lenstronomy_child:  # run with NUMBA_DISABLE_JIT=1: lenstronomy as installed without numba
        from darkhaloscope.simulation.manifest import build_manifest

        print(json.dumps(lenstronomy_arcs(build_manifest(args.n, seed=123), args.n_lenstronomy, args.psf_model)))
        return 0

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_sim_"))
    try:
        full = full_scenes(args.n, args.psf_model, args.batch_size, work)
        lt = lenstronomy_arcs(full.pop("manifest"), args.n_lenstronomy, args.psf_model)
        # lenstronomy's numba kernels are optional (numba is not among its requirements); the issue's
        # "about 35 arcs/s" reference is lenstronomy without them, so measure that too, in a child
        # process (NUMBA_DISABLE_JIT would also switch off our kernels in this one)
        out = subprocess.run([sys.executable, __file__, "--lenstronomy_child", "--n", str(args.n),
                              "--n_lenstronomy", str(args.n_lenstronomy), "--psf_model", args.psf_model],
                             check=True, capture_output=True, text=True, env={**os.environ, "NUMBA_DISABLE_JIT": "1"})
        lt_plain = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": "2-core shared CI-class VM, no GPU",
        "python": platform.python_version(), "threads": 1, "psf_model": args.psf_model,
        "batch_size": args.batch_size, "full_scene": full, "lenstronomy_arc_only": lt,
        "ratio_full_scene_over_lenstronomy_arc": full["stamps_per_s"] / lt["arcs_per_s"],
        "ratio_per_cpu_s": full["stamps_per_cpu_s"] / lt["arcs_per_cpu_s"],
        "lenstronomy_arc_only_without_numba": lt_plain,
        "ratio_over_lenstronomy_without_numba": full["stamps_per_s"] / lt_plain["arcs_per_s"],
        "goal_stamps_per_s": 1000.0,
    }
    if not args.skip_rss:
        rss = []
        for n in (args.n, 4 * args.n):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--psf_model", args.psf_model,
                                  "--batch_size", str(args.batch_size)], check=True, capture_output=True, text=True)
            rss.append(json.loads(out.stdout.strip().splitlines()[-1]))
        result["peak_rss"] = rss
    (OUT / "bench_simulator.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"full scene ({args.psf_model}): {full['stamps_per_s']:.0f} stamps/s/core "
          f"(manifest {full['manifest_s']:.2f} s, render+write {full['render_write_s']:.2f} s for {args.n})")
    print(f"lenstronomy arc only: {lt['arcs_per_s']:.1f} 3-band arcs/s/core "
          f"(flux ratio ours/lenstronomy {lt['median_flux_ratio_ours_over_lenstronomy']:.4f})")
    print(f"ratio: {result['ratio_full_scene_over_lenstronomy_arc']:.1f}x (goal 1000 stamps/s, 25x)")
    print(f"lenstronomy without numba: {lt_plain['arcs_per_s']:.1f} arcs/s/core -> ratio "
          f"{result['ratio_over_lenstronomy_without_numba']:.1f}x")
    print(f"per CPU-second: {full['stamps_per_cpu_s']:.0f} stamps vs {lt['arcs_per_cpu_s']:.1f} lenstronomy arcs, "
          f"ratio {result['ratio_per_cpu_s']:.1f}x")
    for r in result.get("peak_rss", []):
        print(f"peak RSS for {r['n']} stamps: {r['peak_rss_mib']:.0f} MiB ({r['stamps_per_s']:.0f} stamps/s)")
    print(f"-> {OUT / 'bench_simulator.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
