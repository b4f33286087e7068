"""`dhs realcheck`: the finders on real survey pixels, at the operating thresholds set on simulated controls.

The real check set (docs/realcheck.md) is a Phase 4c-contract dataset (64x64, 0.262"/px, nanomaggies, every
row in ``region_split=test``) of real grz cutouts: ordinary massive galaxies (``is_control = 1``, the
controls) and lens candidates (``is_control = 0``). Each row records where its pixels come from
(``source_repo``, ``source_path``, ``source_commit``, ``source_units``, ``source_pixscale``) and its ``half``:
``look`` or ``held_out``, fixed by a hash of its id (``half_of``) so that adding rows never moves old ones.
Tune on ``look`` only; ``held_out`` is reported, never tuned on.

Conversion to the contract (``to_contract``): the object goes where the Legacy Surveys cutout service puts
the requested position, CRPIX = (N + 1) / 2 (FITS, 1-based), i.e. 0-based (31.5, 31.5) for 64x64, between
the four central pixels. The source cutout's own WCS (a TAN projection with its CRPIX and pixel scale) and
the target WCS are astropy WCS objects; each target pixel centre is mapped through the sky to the source
pixel grid and the source is interpolated there with a cubic spline (``scipy.ndimage.map_coordinates``),
times (target scale / source scale)^2 so that pixel values stay fluxes per pixel in nanomaggies.

Scoring: each model's checkpoint scores the set through ``dhs infer`` (``evaluation.infer.run``, the same
entry point, normalisation and test-time augmentation as the simulated test split). The thresholds are
those of the model's stratified table (``sky.recall.operating_thresholds``: the ``all`` stratum's tpr@fpr
rows, set on the simulated test controls). Output ``--out_csv``, one row per (model, half, fpr target):
``n_controls``, ``n_above`` (logit >= threshold), ``fpr`` with its 95% Wilson interval, the median real
control logit and the median simulated control logit; then one row per (model, candidate) with its logit
and the tightest simulated FPR target it passes. ``--report`` writes an offline HTML page with the tables,
the real and simulated control logit distributions side by side, and the candidates' stamps.

When ``--data`` does not exist (the check set is fetched, not committed: ``scripts/fetch_realcheck.py``), the
command writes a CSV with only its header and a page that says so, and exits 0 with one line naming the
fetch command: the demo runs without network access.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation import infer
from darkhaloscope.evaluation.report import figure_img, gallery_figure, missing, page, parse_labelled, pyplot, safe, section, table_html
from darkhaloscope.evaluation.scorefile import read_checked
from darkhaloscope.io import atomic_output
from darkhaloscope.metrics import wilson_interval
from darkhaloscope.sky.recall import operating_thresholds
from darkhaloscope.stamps.contract import BANDS, PIXEL_SCALE_ARCSEC, STAMP_SIZE, encode_stamp
from darkhaloscope.stamps.dataset import fetch_stamps

log = logging.getLogger("dhs.realcheck")

HALVES = ("look", "held_out")
FETCH_HINT = "python scripts/fetch_realcheck.py --out <data>"
CSV_COLUMNS = ("model", "row", "half", "fpr_target", "threshold", "n_controls", "n_above", "fpr", "ci_low",
               "ci_high", "median_real_logit", "median_sim_control_logit", "n_sim_controls", "task_id", "logit")
SOURCE_COLUMNS = ("source_repo", "source_path", "source_commit", "source_units", "source_pixscale")


# ----------------------------------------------------------------------------------------------------
# The check set: contract conversion, halves, dataset
# ----------------------------------------------------------------------------------------------------

def cutout_wcs(ra: float, dec: float, size: int, pixscale: float, crpix: float | None = None):
    """The TAN WCS the Legacy Surveys cutout service writes for a ``size`` x ``size`` cutout at (ra, dec):
    CRPIX = (size + 1) / 2 (1-based) unless given, north up and east left (CD1_1 < 0)."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    c = (size + 1) / 2.0 if crpix is None else float(crpix)
    w.wcs.crpix = [c, c]
    s = float(pixscale) / 3600.0
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    w.pixel_shape = (size, size)
    return w


def to_contract(cube: np.ndarray, ra: float, dec: float, src_pixscale: float, src_crpix: float | None = None) -> np.ndarray:
    """(3, N, N) grz cutout in nanomaggies with its own cutout WCS -> (3, 64, 64) float32 on the contract's
    grid (module docstring). Raises DHSError if the stamp would reach outside the source cutout."""
    from scipy.ndimage import map_coordinates

    cube = np.asarray(cube, np.float64)
    if cube.ndim != 3 or cube.shape[0] != len(BANDS) or cube.shape[1] != cube.shape[2]:
        raise DHSError(f"cutout has shape {cube.shape}, expected (3, N, N) grz")
    if not np.isfinite(cube).all():
        raise DHSError("cutout has non-finite pixels")
    n = cube.shape[1]
    src = cutout_wcs(ra, dec, n, src_pixscale, src_crpix)
    dst = cutout_wcs(ra, dec, STAMP_SIZE, PIXEL_SCALE_ARCSEC)
    yy, xx = np.mgrid[0:STAMP_SIZE, 0:STAMP_SIZE].astype(np.float64)
    sky = dst.pixel_to_world(xx, yy)
    sx, sy = src.world_to_pixel(sky)
    if sx.min() < 0 or sy.min() < 0 or sx.max() > n - 1 or sy.max() > n - 1:
        raise DHSError(f"a {STAMP_SIZE}x{STAMP_SIZE} stamp at {PIXEL_SCALE_ARCSEC}\"/px reaches outside the "
                       f"{n}x{n} cutout at {src_pixscale}\"/px")
    area = (PIXEL_SCALE_ARCSEC / float(src_pixscale)) ** 2
    out = np.stack([map_coordinates(band, [sy, sx], order=3, mode="nearest", prefilter=True) for band in cube])
    return (out * area).astype(np.float32)


def half_of(row_id: str) -> str:
    """``look`` or ``held_out``: the parity of the first byte of sha256(id), so a row's half never changes."""
    return HALVES[hashlib.sha256(str(row_id).encode()).digest()[0] & 1]


def write_check_set(records: list[dict], out_dir) -> dict:
    """Write the check set (module docstring) as ``out_dir/region_split=test/part-00000.parquet``.

    Each record: ``id``, ``ra``, ``dec``, ``is_control`` (1 control, 0 candidate), ``image`` (3, 64, 64 on the
    contract grid), the ``SOURCE_COLUMNS`` and optionally ``psfsize_<b>``/``psfdepth_<b>`` (NaN when the
    source does not give them). Returns counts per (kind, half)."""
    if not records:
        raise DHSError("no check-set record to write")
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        raise DHSError("check-set ids repeat")
    cols = {
        "task_id": pa.array(ids, pa.string()),
        "ra": pa.array([float(r["ra"]) for r in records]),
        "dec": pa.array([float(r["dec"]) for r in records]),
        "is_control": pa.array([int(r["is_control"]) for r in records], pa.int32()),
        "cutout_ok": pa.array(np.ones(len(records), np.int32)),
        "stamp_npz": pa.array([encode_stamp(r["image"]) for r in records], pa.binary()),
        "half": pa.array([half_of(i) for i in ids], pa.string()),
    }
    for prefix in ("psfsize", "psfdepth"):
        for b in BANDS:
            cols[f"{prefix}_{b}"] = pa.array([float(r.get(f"{prefix}_{b}", math.nan)) for r in records],
                                             pa.float64(), from_pandas=True)
    for c in SOURCE_COLUMNS:
        cols[c] = pa.array([None if r.get(c) is None else str(r[c]) for r in records], pa.string())
    table = pa.table(cols)
    out = Path(out_dir)
    with atomic_output(out / "region_split=test" / "part-00000.parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    counts = {}
    for ctl, half in zip(cols["is_control"].to_pylist(), cols["half"].to_pylist()):
        key = ("control" if ctl else "candidate", half)
        counts[key] = counts.get(key, 0) + 1
    return counts


def read_check_set(data) -> pd.DataFrame:
    """The check set without stamps (task_id, is_control, half, ra, dec and the source columns)."""
    path = Path(data) / "region_split=test"
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise DHSError(f"{data} has no region_split=test/*.parquet (not a check set)")
    cols = ["task_id", "is_control", "half", "ra", "dec", *SOURCE_COLUMNS]
    for f in files:
        missing = [c for c in cols if c not in pq.read_schema(f).names]
        if missing:
            raise DHSError(f"{data} is not a check set: {f.name} lacks column(s) {', '.join(missing)} "
                           f"(write it with {FETCH_HINT})")
    df = pd.concat([pq.read_table(f, columns=cols).to_pandas() for f in files], ignore_index=True)
    bad = ~df["half"].isin(HALVES)
    if bad.any():
        raise DHSError(f"{data}: {int(bad.sum())} row(s) have a half other than {', '.join(HALVES)}")
    return df


# ----------------------------------------------------------------------------------------------------
# Scoring and figures
# ----------------------------------------------------------------------------------------------------

def score_check_set(data, ckpt, out, tta: int = 1, batch_size: int = 256, device: str = "auto") -> pd.DataFrame:
    """Logits of every row of the check set through ``dhs infer`` (task_id, logit)."""
    args = argparse.Namespace(data=str(data), ckpt=str(ckpt), out=str(out), split="test", batch_size=batch_size,
                              use_bf16=False, tta=tta, only_controls=False, num_workers=0, max_skip_frac=0.0,
                              device=device)
    infer.run(args)
    return pq.read_table(out, columns=["task_id", "logit"]).to_pandas()


def sim_control_logits(path) -> np.ndarray:
    """Logits of the simulated test controls of a ``dhs infer`` score file."""
    t = read_checked(path, ["is_control", "logit"])
    ctl = t.column("is_control").to_numpy(zero_copy_only=False) == 1
    return np.asarray(t.column("logit").to_numpy(zero_copy_only=False), np.float64)[ctl]


def fpr_rows(model: str, scored: pd.DataFrame, thresholds, sim_logits: np.ndarray) -> list[dict]:
    """Per half (and both): the real controls above each simulated threshold, with Wilson intervals."""
    rows = []
    ctl = scored[scored["is_control"] == 1]
    med_sim = float(np.median(sim_logits)) if len(sim_logits) else math.nan
    for half in (*HALVES, "all"):
        part = ctl if half == "all" else ctl[ctl["half"] == half]
        logits = part["logit"].to_numpy(np.float64)
        for target, thr in thresholds:
            n = len(logits)
            k = int((logits >= thr).sum()) if math.isfinite(thr) else 0
            lo, hi = wilson_interval(k, n) if math.isfinite(thr) else (math.nan, math.nan)
            rows.append({"model": model, "row": "controls", "half": half, "fpr_target": target, "threshold": thr,
                         "n_controls": n, "n_above": k if math.isfinite(thr) else None,
                         "fpr": k / n if n and math.isfinite(thr) else math.nan, "ci_low": lo, "ci_high": hi,
                         "median_real_logit": float(np.median(logits)) if n else math.nan,
                         "median_sim_control_logit": med_sim, "n_sim_controls": len(sim_logits)})
    return rows


def candidate_rows(model: str, scored: pd.DataFrame, thresholds) -> list[dict]:
    """One row per candidate: its logit and the tightest simulated FPR target whose threshold it reaches."""
    rows = []
    for r in scored[scored["is_control"] == 0].sort_values("task_id").itertuples(index=False):
        passed = [t for t, thr in thresholds if math.isfinite(thr) and r.logit >= thr]
        rows.append({"model": model, "row": "candidate", "half": r.half, "task_id": r.task_id, "logit": r.logit,
                     "fpr_target": min(passed) if passed else math.nan})
    return rows


def distribution_figure(per_model: dict) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(per_model), figsize=(5 * len(per_model), 3.4), squeeze=False)
    for ax, (model, (real, sim, thresholds)) in zip(axes[0], per_model.items()):
        allv = np.concatenate([real, sim]) if len(real) else sim
        bins = np.linspace(np.nanpercentile(allv, 0.5), np.nanpercentile(allv, 99.9), 40)
        ax.hist(sim, bins=bins, density=True, alpha=0.5, label=f"simulated controls (n={len(sim)})")
        if len(real):
            ax.hist(real, bins=bins, density=True, alpha=0.6, label=f"real controls (n={len(real)})")
        for t, thr in thresholds:
            if math.isfinite(thr):
                ax.axvline(thr, color="k", lw=0.8, ls=":")
                ax.text(thr, ax.get_ylim()[1] * 0.95, f"{t:g}", fontsize=7, rotation=90, va="top")
        ax.set_xlabel("logit")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_img(fig, "realcheck-logits", "real vs simulated control logits")


def report_page(table: pd.DataFrame, per_model: dict, data, scored: pd.DataFrame | None) -> str:
    ctl = table[table["row"] == "controls"][["model", "half", "fpr_target", "threshold", "n_controls", "n_above",
                                               "fpr", "ci_low", "ci_high", "median_real_logit",
                                               "median_sim_control_logit"]]
    cand = table[table["row"] == "candidate"][["model", "task_id", "half", "logit", "fpr_target"]]
    parts = [section("realcheck-fpr", "Real galaxies above the simulated thresholds",
                     "<p class=\"note\">fpr_target: the simulated test controls' FPR that sets the threshold; fpr: "
                     "the fraction of real controls with logit &gt;= threshold, 95% Wilson interval. Tune on "
                     "the look half only.</p>" + (table_html(ctl) if len(ctl) else missing("no real controls"))),
             section("realcheck-dist", "Logits: real and simulated controls", safe(lambda: distribution_figure(per_model),
                                                                                   "logit distributions")),
             section("realcheck-candidates", "Lens candidates",
                     "<p class=\"note\">fpr_target: the tightest simulated FPR target whose threshold the "
                     "candidate reaches (empty: none).</p>" + (table_html(cand) if len(cand) else missing("no candidates")))]
    if scored is not None and len(scored):
        def _gallery():
            ids = scored.sort_values(["is_control", "task_id"])["task_id"].tolist()[:48]
            stamps = fetch_stamps(str(data), ids)
            keep = [i for i in ids if i in stamps]
            return gallery_figure([stamps[i] for i in keep], keep, "realcheck-stamps", "real check-set stamps")
        parts.append(section("realcheck-stamps", "The stamps (candidates first)", safe(_gallery, "stamps")))
    return page("darkhaloscope: real check set", parts)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _pairs(items, flag: str) -> dict[str, str]:
    return dict(parse_labelled(items or [], flag))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the real check set (scripts/fetch_realcheck.py writes it)")
    parser.add_argument("--ckpt", action="append", required=True, help="MODEL=best.pt (repeat per model)")
    parser.add_argument("--table", action="append", required=True,
                        help="MODEL=<model>_stratified_fpr.csv from dhs eval (its thresholds are used)")
    parser.add_argument("--sim_scores", action="append", required=True,
                        help="MODEL=<model>_test_scores.parquet: the simulated test scores (controls compared)")
    parser.add_argument("--out_csv", required=True)
    parser.add_argument("--report", default=None, help="also write an offline HTML page")
    parser.add_argument("--scores_dir", default=None, help="keep each model's check-set score parquet here")
    parser.add_argument("--tta", type=int, default=1, help="dhs infer --tta (use the value the test split got)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto")


def _write(table: pd.DataFrame, out_csv, report: str | None, page: str) -> None:
    with atomic_output(out_csv) as tmp:
        table.to_csv(tmp, index=False, na_rep="")
    if report:
        with atomic_output(report) as tmp:
            Path(tmp).write_text(page, encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    ckpts, tables, sims = (_pairs(args.ckpt, "--ckpt"), _pairs(args.table, "--table"),
                           _pairs(args.sim_scores, "--sim_scores"))
    if set(ckpts) != set(tables) or set(ckpts) != set(sims):
        raise DHSError("--ckpt, --table and --sim_scores must name the same models "
                       f"({','.join(ckpts)} / {','.join(tables)} / {','.join(sims)})")
    if not Path(args.data).exists():
        msg = f"real check set {args.data} is absent: skipped (fetch it with {FETCH_HINT})"
        _write(pd.DataFrame(columns=list(CSV_COLUMNS)), args.out_csv, args.report,
               page("darkhaloscope: real check set", [section("realcheck", "Real check set", missing(msg))]))
        print(f"realcheck: {msg}")
        return 0
    check = read_check_set(args.data)
    thresholds = {m: operating_thresholds(t) for m, t in tables.items()}  # refuse bad tables before scoring
    rows, per_model, scored_any = [], {}, None
    with tempfile.TemporaryDirectory() as tmpdir:
        for model, ckpt in ckpts.items():
            out = Path(args.scores_dir or tmpdir) / f"realcheck_{model}_scores.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.unlink()  # dhs infer refuses to overwrite; this file is ours
            logits = score_check_set(args.data, ckpt, out, args.tta, args.batch_size, args.device)
            scored = check.merge(logits, on="task_id", how="inner")
            if len(scored) != len(check):
                raise DHSError(f"{len(check) - len(scored)} check-set row(s) were not scored by {model}")
            sim = sim_control_logits(sims[model])
            rows += fpr_rows(model, scored, thresholds[model], sim)
            rows += candidate_rows(model, scored, thresholds[model])
            per_model[model] = (scored.loc[scored["is_control"] == 1, "logit"].to_numpy(np.float64), sim,
                                thresholds[model])
            scored_any = scored
    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    _write(table, args.out_csv, args.report, report_page(table, per_model, args.data, scored_any))
    n_ctl, n_cand = int((check["is_control"] == 1).sum()), int((check["is_control"] == 0).sum())
    summary = []
    for model in ckpts:
        sel = table[(table["model"] == model) & (table["row"] == "controls") & (table["half"] == "all")]
        summary.append(f"{model}: " + ", ".join(f"{int(r.n_above)}/{int(r.n_controls)} above {r.fpr_target:g}"
                                                for r in sel.itertuples() if pd.notna(r.n_above)))
    print(f"realcheck: {n_ctl} real controls, {n_cand} candidates; " + "; ".join(summary) + f" -> {args.out_csv}")
    return 0

