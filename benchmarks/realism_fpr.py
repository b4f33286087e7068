#!/usr/bin/env python3
"""How much each real-sky effect (simulation/realism.py, docs/realism.md) moves a finished run's false-positive
rate at its fixed operating points.

    python benchmarks/realism_fpr.py --run_dir /work/runs/base/results --out docs/measurements/realism_fpr_base.json

The run's test-split controls (its manifest rows) are re-rendered once per arm with one effect changed, scored
with ``dhs infer --tta T --only_controls`` by each model, and compared at the thresholds of the run's
``<model>_stratified_fpr.csv`` (stratum "all", tpr@fpr 1e-2 and 1e-3: a stamp is a false positive when its logit
>= the threshold). The reference is the run's own test scores (``scores/<model>_test_scores.parquet``). Arms:

* ``<effect>:on``: every control carries the effect: one companion drawn from the prior (``companions``), the
  DR10 noise correlation (``correlated_noise``), a PSF shape draw (``psf_shape``), one defect
  (``bad_pixels``), or the host (and every other object, as a cutout off by half a pixel would place them)
  0.5 px off its place in a random direction (``centre_offset``);
* ``<effect>:off``: the effect removed from the rows that have it (only where the run's manifest has it);
* ``reference`` (with ``--ckpt``): the controls unchanged; that checkpoint's thresholds come from these scores
  (``thresholds_from_scores``), for a model that has no stratified table (e.g. an earlier epoch).

Output: JSON (and a CSV beside it) with, per model, arm and FPR target, the threshold, the false positives and
controls, the FPR with its 95% Wilson interval, and the multiple FPR(arm) / FPR(reference). Rendering and
inference run on the CPU (minutes per arm on 2 cores; --max_controls subsamples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.metrics import wilson_interval
from darkhaloscope.simulation import realism
from darkhaloscope.stamps.contract import PIXEL_SCALE_ARCSEC

EFFECTS = ("companions", "correlated_noise", "psf_shape", "bad_pixels", "centre_offset")
FPRS = (1e-2, 1e-3)
MODELS = {"gen3": "runs/gen3_stageA2/best.pt", "gen2": "runs/gen2/best.pt"}
VARIANT = ("v4_sota_moffat", "moffat", 3.5)  # the variant the run's test scores are on (rules/common.smk SCORES)
CENTRE_OFFSET_PX = 0.5
ARM_ID_OFFSET = 10**9  # arm k's rows get task_id + (k + 1) * ARM_ID_OFFSET (manifest task_ids are far smaller)
POSITION_COLUMNS = (("host_x", "host_y"), ("nb_x", "nb_y"), ("star_x", "star_y"), ("comp_x", "comp_y"))


def _drop(table: pa.Table, names) -> pa.Table:
    return table.drop_columns([c for c in names if c in table.column_names])


def _set(table: pa.Table, cols: dict) -> pa.Table:
    for k, v in cols.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            arr = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float64()), v.shape[1])
        elif isinstance(v, np.ndarray) and v.dtype == object:
            arr = pa.array(list(v), pa.string())
        else:
            arr = pa.array(v)
        i = table.schema.get_field_index(k)
        table = table.set_column(i, k, arr) if i >= 0 else table.append_column(k, arr)
    return table


def arm_table(table: pa.Table, effect: str, on: bool, rng: np.random.Generator) -> pa.Table:
    """The manifest rows with one effect forced on every row (on) or removed (off)."""
    from darkhaloscope.simulation.scene import column_arrays

    n = table.num_rows
    if effect == "reference":
        return table
    if not on:
        return _drop(table, {"companions": realism.COMPANION_COLUMNS, "psf_shape": realism.PSF_SHAPE_COLUMNS,
                             "bad_pixels": realism.BAD_PIXEL_COLUMNS,
                             "correlated_noise": (realism.NOISE_CORR_COLUMN,)}[effect])
    rows = column_arrays(table)
    if effect == "companions":  # exactly one companion per stamp, from the prior
        comp = realism.draw_companions(rng, rows, 1e3)
        comp["comp_mag_r"][:, 1:] = np.nan
        return _set(table, comp)
    if effect == "correlated_noise":
        return _set(table, {realism.NOISE_CORR_COLUMN: np.ones(n, np.int8)})
    if effect == "psf_shape":
        return _set(table, realism.draw_psf_shapes(rng, n))
    if effect == "bad_pixels":
        return _set(table, realism.draw_bad_pixels(rng, n, 1.0))
    if effect == "centre_offset":  # the whole scene shifted: a cutout centred half a pixel off
        t = rng.random(n) * 2 * np.pi
        d = CENTRE_OFFSET_PX * PIXEL_SCALE_ARCSEC * np.stack([np.cos(t), np.sin(t)])
        cols = {}
        for cx, cy in POSITION_COLUMNS:
            if cx in rows:
                shape = (n,) + (1,) * (rows[cx].ndim - 1)
                cols[cx] = rows[cx] + d[0].reshape(shape)
                cols[cy] = rows[cy] + d[1].reshape(shape)
        return _set(table, cols)
    raise DHSError(f"unknown effect '{effect}' (expected one of {', '.join(EFFECTS)})")


def run_cli(args: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    with open(log, "w") as fh:
        done = subprocess.run(["dhs", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise DHSError(f"dhs {args[0]} failed (exit {done.returncode}); see {log}")


def thresholds(run_dir: Path, model: str) -> dict[float, float]:
    table = pd.read_csv(run_dir / f"{model}_stratified_fpr.csv")
    sel = table[(table["stratum"] == "all") & (table["metric"] == "tpr@fpr")]
    out = {}
    for f in FPRS:  # a target the run's controls cannot resolve has no threshold: left out, with a note
        row = sel[np.isclose(sel["target"], f)]
        if row.empty or not np.isfinite(row["threshold"].iloc[0]):
            print(f"note: {run_dir}/{model}_stratified_fpr.csv has no finite threshold at fpr {f}; skipped",
                  file=sys.stderr)
            continue
        out[f] = float(row["threshold"].iloc[0])
    if not out:
        raise DHSError(f"{run_dir}/{model}_stratified_fpr.csv has no finite tpr@fpr threshold at {FPRS}")
    return out


def thresholds_from_scores(logits: np.ndarray) -> dict[float, float]:
    """The lowest logit threshold whose FPR (logit >= threshold) on these controls is <= each target (a tie
    is all in or all out, as metrics.tpr_at_fpr): for models without a stratified table yet."""
    values = np.sort(np.unique(logits))[::-1]
    above = np.searchsorted(np.sort(logits), values, side="left")  # controls below each distinct value
    fp = logits.size - above  # controls >= each distinct value (values descending, fp ascending)
    out = {}
    for f in FPRS:
        ok = np.flatnonzero(fp <= f * logits.size * (1 + 1e-12))
        if ok.size:
            out[f] = float(values[ok[-1]])
    return out


def fpr_row(logits: np.ndarray, thr: float) -> dict:
    k, n = int(np.sum(logits >= thr)), int(logits.size)
    lo, hi = wilson_interval(k, n)
    return {"false_pos": k, "controls": n, "fpr": k / n, "fpr_ci_low": lo, "fpr_ci_high": hi}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", required=True, type=Path, help="a finished workflow run directory (results/)")
    p.add_argument("--out", required=True, type=Path, help="JSON to write (a CSV is written beside it)")
    p.add_argument("--effects", default=",".join(EFFECTS))
    p.add_argument("--models", default="gen3", help="comma list of gen3, gen2")
    p.add_argument("--ckpt", action="append", default=[],
                   help="MODEL=PATH: score with this checkpoint instead of the run's (e.g. an earlier epoch); its "
                        "thresholds then come from its own scores of the unchanged controls (arm 'reference')")
    p.add_argument("--tta", type=int, default=4, help="dhs infer --tta (the demo's infer.tta)")
    p.add_argument("--max_controls", type=int, default=None, help="subsample the test controls (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    try:
        effects = [e for e in args.effects.split(",") if e]
        models = [m for m in args.models.split(",") if m]
        for e in effects:
            if e not in EFFECTS:
                raise DHSError(f"--effects: unknown effect '{e}' (expected {', '.join(EFFECTS)})")
        for m in models:
            if m not in MODELS:
                raise DHSError(f"--models: unknown model '{m}' (expected {', '.join(MODELS)})")
        manifest = pq.read_table(args.run_dir / "manifest" / "manifest.parquet")
        keep = np.asarray(manifest.column("region_split").to_pylist(), object) == "test"
        keep &= manifest.column("is_control").to_numpy() == 1
        controls = manifest.filter(pa.array(keep))
        rng = np.random.default_rng(args.seed)
        if args.max_controls and controls.num_rows > args.max_controls:
            controls = controls.take(pa.array(np.sort(rng.choice(controls.num_rows, args.max_controls, replace=False))))
        ids = controls.column("task_id").to_numpy()
        ckpts = {m: args.run_dir / MODELS[m] for m in models}
        for item in args.ckpt:
            m, _, path = item.partition("=")
            if m not in models or not path:
                raise DHSError(f"--ckpt '{item}' must be MODEL=PATH with MODEL one of --models")
            ckpts[m] = Path(path)
        refs, thr = {}, {}
        for m in models:  # the run's own test scores and thresholds, unless another checkpoint is scored
            if m in dict(i.partition("=")[::2] for i in args.ckpt):
                continue
            s = pq.read_table(args.run_dir / "scores" / f"{m}_test_scores.parquet", columns=["task_id", "is_control", "logit"]).to_pandas()
            s = s[s["is_control"] == 1].set_index("task_id").loc[ids]
            refs[m], thr[m] = s["logit"].to_numpy(), thresholds(args.run_dir, m)
        arms = [("reference", True)] if len(refs) < len(models) else []
        for e in effects:
            arms.append((e, True))
            present = {"companions": "comp_mag_r", "correlated_noise": realism.NOISE_CORR_COLUMN,
                       "psf_shape": realism.PSF_SHAPE_COLUMNS[0], "bad_pixels": "bad_kind"}.get(e)
            if present in controls.column_names:
                arms.append((e, False))
        work = Path(args.work or tempfile.mkdtemp(prefix="realism_fpr_"))
        work.mkdir(parents=True, exist_ok=True)
        results = []
        # one inject per arm (task_ids offset by arm), all arms' test parts in one dataset, one infer per model
        data = work / "data"
        (data / "region_split=test").mkdir(parents=True, exist_ok=True)
        for k, (effect, on) in enumerate(arms):
            name = f"{effect}_{'on' if on else 'off'}"
            table = arm_table(controls, effect, on, np.random.default_rng([args.seed, (EFFECTS + ('reference',)).index(effect)]))
            table = table.set_column(table.schema.get_field_index("task_id"), "task_id",
                                     pa.array(ids + (k + 1) * ARM_ID_OFFSET))
            pq.write_table(table, work / f"{name}.parquet")
            run_cli(["inject", "--manifest", str(work / f"{name}.parquet"), "--out_dir", str(work / name),
                     "--variant", VARIANT[0], "--psf-model", VARIANT[1], "--moffat-beta", str(VARIANT[2]),
                     "--shard", "0", "--n_shards", "1"], work / f"{name}_inject.log")
            os.replace(work / name / "region_split=test" / "part-00000.parquet",
                       data / "region_split=test" / f"part-{k:05d}.parquet")
            print(f"rendered {name}: {table.num_rows} controls", flush=True)
        for m in models:
            out = work / f"scores_{m}.parquet"
            run_cli(["infer", "--data", str(data), "--ckpt", str(ckpts[m]), "--out", str(out),
                     "--split", "test", "--batch_size", "256", "--tta", str(args.tta), "--only_controls"],
                    work / f"infer_{m}.log")
            scores = pq.read_table(out, columns=["task_id", "logit"]).to_pandas()
            arm_of = scores["task_id"].to_numpy() // ARM_ID_OFFSET - 1
            logits_of = {arms[k]: scores["logit"].to_numpy()[arm_of == k] for k in range(len(arms))}
            if m not in refs:
                refs[m] = logits_of[("reference", True)]
                thr[m] = thresholds_from_scores(refs[m])
            for f in thr[m]:
                results.append({"model": m, "ckpt": str(ckpts[m]), "arm": "reference", "target_fpr": f,
                                "threshold": thr[m][f], **fpr_row(refs[m], thr[m][f]), "multiple": 1.0})
            for (effect, on), logits in logits_of.items():
                if effect == "reference":
                    continue
                for f in thr[m]:
                    row = fpr_row(logits, thr[m][f])
                    ref = fpr_row(refs[m], thr[m][f])["fpr"]
                    results.append({"model": m, "ckpt": str(ckpts[m]), "arm": f"{effect}:{'on' if on else 'off'}",
                                    "target_fpr": f, "threshold": thr[m][f], **row,
                                    "multiple": row["fpr"] / ref if ref > 0 else math.nan})
                    print(f"{m} {effect}:{'on' if on else 'off'} fpr {f:g}: {row['false_pos']}/{row['controls']} "
                          f"= {row['fpr']:.4g} (x{results[-1]['multiple']:.2f})", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(results)
        frame.to_csv(args.out.with_suffix(".csv"), index=False)
        meta = {"run_dir": str(args.run_dir), "tta": args.tta, "seed": args.seed, "n_controls": int(len(ids)),
                "manifest": (manifest.schema.metadata or {}).get(b"dhs_manifest", b"").decode(), "rows": results}
        args.out.write_text(json.dumps(meta, indent=1))
        print(frame.to_string(index=False))
    except DHSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
