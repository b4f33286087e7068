#!/usr/bin/env python3
"""Recall on real hosts: simulated arcs injected into the real galaxies of the check set, scored by a model
at its simulated thresholds, beside its recall on simulated hosts at the same (theta_E/PSF, arc_snr) (issue 26).

    python benchmarks/real_host_recall.py --run_dir results --data data/realcheck --out_dir /tmp/rhr \
        [--model gen3] [--arcs_per_host 200] [--tta 4] [--variant v4_sota_moffat]

Steps, each through the project's own commands:
1. a host dataset with every real galaxy of ``--data`` (controls and candidates; ``--hosts_kind`` narrows it)
   repeated ``--arcs_per_host`` times (task_id ``<id>#<k>``), all in the test split;
2. ``dhs manifest --hosts`` (no controls, the run's source priors and seed + 1) and ``dhs inject --hosts``
   (the variant's PSF model and Moffat beta);
3. ``dhs infer --tta`` with the model's checkpoint;
4. recall at the thresholds of ``<model>_stratified_fpr.csv`` (``sky.recall.operating_thresholds``) per
   (theta_E/PSF, arc_snr) cell (``strata.load_scores`` on both score files, ``strata.bin_index``), beside the
   same on the simulated test positives of ``scores/<model>_test_scores.parquet``, with 95% Wilson intervals,
   and the resolved-bright cell (theta_E/PSF >= 1.4, arc_snr >= 20: tools/finder_table.py);
5. the hosts alone (no arc) through the same ``dhs infer``: a host that passes a threshold by itself (a lens
   candidate does, with its own arc) makes every arc injected into it "found" at that threshold.

The check set does not carry the hosts' observing conditions (the cutouts have none), so the host dataset
gets psfsize_<b> = the DR10 mean FWHM of that band (dr10_conditions.json) and psfdepth_<b> from each
stamp's own noise: sigma = 1.4826 MAD of the pixels outside 5" of the centre, turned into the 5-sigma depth
that ``scene.sky_sigma`` maps back to sigma (sum of PSF^2 of the sky Moffat, ``scene.sky_psf_sum_sq``). The
arc's PSF and arc_snr follow from those, as on simulated hosts. Prints a Markdown table, writes
``<out_dir>/real_host_recall.csv``. Minutes on CPU for ~1k injections.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from darkhaloscope import metrics
from darkhaloscope.evaluation import strata
from darkhaloscope.sky.recall import operating_thresholds
from darkhaloscope.stamps.contract import BANDS, PIXEL_SCALE_ARCSEC, AB_ZEROPOINT, decode_stamp, load_conditions

_spec = importlib.util.spec_from_file_location("finder_table", Path(__file__).resolve().parents[1] / "tools" / "finder_table.py")
finder_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(finder_table)

RATIO_EDGES = (0.5, 0.9, 1.4, math.inf)
SNR_EDGES = (0.0, 10.0, 20.0, math.inf)
NOISE_MIN_RADIUS_ARCSEC = 5.0


def stamp_sigma(image: np.ndarray) -> np.ndarray:
    """Per band, 1.4826 x MAD of the pixels farther than NOISE_MIN_RADIUS_ARCSEC from the stamp centre."""
    n = image.shape[-1]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2.0
    outer = np.hypot(xx, yy) * PIXEL_SCALE_ARCSEC > NOISE_MIN_RADIUS_ARCSEC
    px = image[:, outer]
    return 1.4826 * np.median(np.abs(px - np.median(px, axis=1, keepdims=True)), axis=1)


def depth_from_sigma(sigma, fwhm) -> np.ndarray:
    """The 5-sigma point-source depth (AB) whose ``scene.sky_sigma`` is ``sigma`` for a PSF of ``fwhm``."""
    from darkhaloscope.simulation.scene import sky_psf_sum_sq

    ss = sky_psf_sum_sq(np.asarray(fwhm, np.float64))
    return AB_ZEROPOINT - 2.5 * np.log10(5.0 * np.asarray(sigma, np.float64) / np.sqrt(ss))


def host_dataset(data: Path, out: Path, arcs_per_host: int, kind: str) -> pd.DataFrame:
    t = pq.read_table(data / "region_split=test").to_pandas()
    if kind != "all":
        t = t[t["is_control"] == (1 if kind == "control" else 0)]
    if t.empty:
        raise SystemExit(f"no {kind} host in {data}")
    from darkhaloscope.simulation.manifest import brickname_of, sky_cell

    fwhm = load_conditions()["psf_fwhm_mean_by_band_arcsec"]
    ra, dec = t["ra"].to_numpy(np.float64), t["dec"].to_numpy(np.float64)
    t = t.assign(region_id=sky_cell(ra, dec), brickname=brickname_of(ra, dec))
    rows = []
    for r in t.itertuples(index=False):
        img = decode_stamp(r.stamp_npz)
        sig = stamp_sigma(img)
        size = np.array([fwhm[b] for b in BANDS])
        depth = depth_from_sigma(sig, size)
        for k in range(arcs_per_host):
            rows.append({"task_id": f"{r.task_id}#{k:04d}", "host": r.task_id, "ra": r.ra, "dec": r.dec,
                         "brickname": r.brickname, "region_id": int(r.region_id), "cutout_ok": 1, "stamp_npz": r.stamp_npz,
                         **{f"psfsize_{b}": size[j] for j, b in enumerate(BANDS)},
                         **{f"psfdepth_{b}": depth[j] for j, b in enumerate(BANDS)}})
    df = pd.DataFrame(rows)
    (out / "region_split=test").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df.drop(columns=["host"]), preserve_index=False),
                   out / "region_split=test" / "part-00000.parquet")
    return df.drop(columns=["stamp_npz"]).drop_duplicates("host")


def dhs(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("dhs")), *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")


def recall_cells(df: pd.DataFrame, thresholds) -> list[dict]:
    pos = df[df["y"] == 1]
    ratio, snr, rank = pos["theta_over_psf"].to_numpy(), pos["arc_snr"].to_numpy(), pos["rank"].to_numpy()
    cells = [("all", np.ones(len(pos), bool))]
    ri, si = strata.bin_index(ratio, np.asarray(RATIO_EDGES)), strata.bin_index(snr, np.asarray(SNR_EDGES))
    for a in range(len(RATIO_EDGES) - 1):
        for b in range(len(SNR_EDGES) - 1):
            cells.append((f"theta/psf [{RATIO_EDGES[a]:g},{RATIO_EDGES[a + 1]:g}) snr [{SNR_EDGES[b]:g},"
                          f"{SNR_EDGES[b + 1]:g})", (ri == a) & (si == b)))
    cells.append(("resolved-bright", (ratio >= finder_table.RESOLVED_MIN_RATIO) & (snr >= finder_table.BRIGHT_MIN_SNR)))
    out = []
    for name, sel in cells:
        for target, thr in thresholds:
            k, n = metrics.recall_at_threshold(rank[sel], thr) if math.isfinite(thr) else (0, int(sel.sum()))
            lo, hi = metrics.wilson_interval(k, n) if math.isfinite(thr) else (math.nan, math.nan)
            out.append({"cell": name, "fpr_target": target, "n": n, "k": k if math.isfinite(thr) else None,
                        "recall": k / n if n and math.isfinite(thr) else math.nan, "ci_low": lo, "ci_high": hi})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="a finished workflow run (results/)")
    p.add_argument("--data", required=True, help="the real check set (scripts/fetch_realcheck.py)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--model", default="gen3", choices=("gen3", "gen2"))
    p.add_argument("--arcs_per_host", type=int, default=200)
    p.add_argument("--hosts_kind", default="all", choices=("all", "control", "candidate"))
    p.add_argument("--variant", default="v4_sota_moffat", help="the variant whose PSF model the arcs get")
    p.add_argument("--tta", type=int, default=None, help="default: the run's infer.tta")
    p.add_argument("--config", default=None, help="the run's config (default: config.yaml of this checkout)")
    args = p.parse_args(argv)
    run, out = Path(args.run_dir), Path(args.out_dir)
    cfg = yaml.safe_load(Path(args.config or Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    variant = cfg["variants"][args.variant]
    tta = args.tta or cfg["infer"].get("tta", 1)
    ckpt = run / ("runs/gen3_stageA2/best.pt" if args.model == "gen3" else "runs/gen2/best.pt")
    thresholds = [(t, v) for t, v in operating_thresholds(run / f"{args.model}_stratified_fpr.csv") if t >= 1e-4]
    out.mkdir(parents=True, exist_ok=True)
    hosts = host_dataset(Path(args.data), out / "hosts", args.arcs_per_host, args.hosts_kind)
    sim = cfg["simulation"]
    dhs("manifest", "--hosts", str(out / "hosts"), "--out", str(out / "manifest.parquet"), "--control_frac", "0",
        "--seed", str(cfg["seed"] + 1), "--source_priors", sim["source_priors"])
    dhs("inject", "--hosts", str(out / "hosts"), "--manifest", str(out / "manifest.parquet"), "--out_dir",
        str(out / "injected"), "--psf_model", variant["psf_model"], "--moffat_beta", str(variant["moffat_beta"]),
        "--shard", "0", "--n_shards", "1", "--variant", args.variant)
    scores = out / f"{args.model}_real_host_scores.parquet"
    scores.unlink(missing_ok=True)
    dhs("infer", "--data", str(out / "injected"), "--ckpt", str(ckpt), "--out", str(scores), "--split", "test",
        "--tta", str(tta))
    # the hosts alone (no arc), one copy each: a host above a threshold on its own is "found" with any arc
    host_dataset(Path(args.data), out / "hosts_once", 1, args.hosts_kind)
    alone = out / f"{args.model}_host_alone_scores.parquet"
    alone.unlink(missing_ok=True)
    dhs("infer", "--data", str(out / "hosts_once"), "--ckpt", str(ckpt), "--out", str(alone), "--split", "test",
        "--tta", str(tta))
    alone_logit = pq.read_table(alone, columns=["task_id", "logit"]).to_pandas()
    real = recall_cells(strata.load_scores(scores), thresholds)
    simulated = recall_cells(strata.load_scores(run / "scores" / f"{args.model}_test_scores.parquet"), thresholds)
    table = pd.DataFrame(real).merge(pd.DataFrame(simulated), on=["cell", "fpr_target"], suffixes=("_real", "_sim"))
    table.insert(0, "model", args.model)
    table.to_csv(out / "real_host_recall.csv", index=False)
    print(f"{len(hosts)} real hosts x {args.arcs_per_host} arcs ({args.hosts_kind}); model {args.model} ({ckpt}), "
          f"tta {tta}; psfdepth_r of the hosts from their noise: "
          + ", ".join(f"{h}: {d:.2f}" for h, d in zip(hosts["host"], hosts["psfdepth_r"])))
    print("hosts alone (no arc): " + ", ".join(
        f"{t.split('#')[0]} logit {v:.2f} (above: {','.join(f'{f:g}' for f, thr in thresholds if v >= thr) or 'none'})"
        for t, v in zip(alone_logit["task_id"], alone_logit["logit"])))
    print("| cell | fpr | real-host recall [95%] (n) | simulated-host recall [95%] (n) |\n|---|---|---|---|")
    for r in table.itertuples(index=False):
        if r.n_real == 0 and r.n_sim == 0:
            continue
        f = lambda v, lo, hi, n: "-" if not np.isfinite(v) else f"{v:.3f} [{lo:.3f}, {hi:.3f}] ({n})"  # noqa: E731
        print(f"| {r.cell} | {r.fpr_target:g} | {f(r.recall_real, r.ci_low_real, r.ci_high_real, r.n_real)} | "
              f"{f(r.recall_sim, r.ci_low_sim, r.ci_high_sim, r.n_sim)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
