"""`dhs recall`: recall on real known lenses at the evaluation's operating thresholds.

Input: a Phase 4c-contract dataset of real known lenses (``dhs cutouts --label lens`` of, e.g., lenscat
entries; every split is read: a known lens is a known lens wherever its sky cell falls), a checkpoint and
the stratified CSV that ``dhs eval`` wrote for that model. The operating thresholds are the ``threshold``
(logit) of the ``stratum = all``, ``metric = tpr@fpr`` rows of that CSV, i.e. those set on the test
controls; a target whose threshold is empty there (too few controls to estimate it) gets empty cells here.

A lens counts as found when its logit >= the threshold (the same rule as a ROC threshold, ties found).
Output ``--out_csv`` (default ``<stem>_recall.csv`` next to the stratified CSV), one row per (grade,
fpr target): ``grade`` (``all`` first, then each value of ``--grade_column``; a null grade is
``ungraded``), ``fpr_target``, ``threshold``, ``n_lenses`` (rows of that grade), ``n_scored``, ``n_found``,
``recall`` = n_found / n_scored with its 95% Wilson interval ``ci_low``/``ci_high``, and ``n_unscored``
(cutout_ok = 0, unusable stamp, or missing observing conditions the model needs: never silently dropped,
and never counted as missed). ``--scores_out`` keeps per-lens logits with the catalogue's positions;
``--report`` writes an offline HTML page with the table and galleries of found and missed lenses.

Positions are the dataset's ``ra``/``dec``, i.e. the catalogue's, never typed by hand.
"""

from __future__ import annotations

import argparse
import html
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.stamps.contract import SPLITS
from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output

log = logging.getLogger("dhs.recall")
UNGRADED = "ungraded"


def operating_thresholds(stratified_csv) -> list[tuple[float, float]]:
    """[(fpr target, logit threshold or NaN)] of the ``all`` stratum's tpr@fpr rows."""
    path = Path(stratified_csv)
    if not path.exists():
        raise DHSError(f"stratified CSV {path} does not exist")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise DHSError(f"stratified CSV {path} is not readable ({type(exc).__name__})") from None
    need = {"stratum", "metric", "target", "threshold"}
    if not need <= set(df.columns):
        raise DHSError(f"{path} lacks column(s) {', '.join(sorted(need - set(df.columns)))} (not a dhs eval table)")
    rows = df[(df["stratum"] == "all") & (df["metric"] == "tpr@fpr")]
    if rows.empty:
        raise DHSError(f"{path} has no 'all' stratum tpr@fpr rows")
    out = [(float(t), float(v) if pd.notna(v) else math.nan) for t, v in zip(rows["target"], rows["threshold"])]
    return sorted(out)


def score_lenses(data: str, ckpt_path: str, grade_column: str | None, batch_size: int = 256,
                 device: str = "auto") -> pd.DataFrame:
    """One row per lens of every split: task_id, ra, dec, grade, region_split, scored (bool), reason,
    logit (NaN when not scored)."""
    import torch

    from darkhaloscope.learning.checkpoint import load_model
    from darkhaloscope.evaluation.infer import forward_logits
    from darkhaloscope.learning.stream import decode_batch, open_split

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, ckpt = load_model(ckpt_path, map_location=dev)
    model.to(dev)
    meta_cols = list(ckpt["meta_cols"])
    frames = []
    for split in SPLITS:
        try:
            part = open_split(data, split)
            schema = part.schema
        except DHSError as exc:
            if "no parquet files" in str(exc):
                continue
            raise
        for c in ("ra", "dec"):
            if c not in schema.names:
                raise DHSError(f"{data} lacks column {c}: recall needs the catalogue's positions")
        if grade_column and grade_column not in schema.names:
            raise DHSError(f"{data} has no grade column '{grade_column}' (--grade_column); columns: "
                           f"{', '.join(schema.names)}")
        missing_meta = [c for c in meta_cols if c not in schema.names]
        if missing_meta:
            raise DHSError(f"{data} lacks the checkpoint's meta column(s) {', '.join(missing_meta)}")
        cols = ["task_id", "ra", "dec", "stamp_npz", *meta_cols,
                *[c for c in ("cutout_ok", "cutout_reason", "is_control") if c in schema.names],
                *([grade_column] if grade_column else [])]
        for batch in part.iter_batches(cols, batch_size):
            n = batch.num_rows
            reason = np.full(n, None, object)
            if "is_control" in batch.schema.names and (batch.column("is_control").to_numpy(zero_copy_only=False) != 0).any():
                raise DHSError(f"{data} split '{split}' has rows with is_control != 0: recall is for known lenses "
                               "(dhs cutouts --label lens)")
            if meta_cols:  # rows without the conditions the model needs are not scored (not NaN logits)
                raw = np.column_stack([np.asarray(batch.column(c).to_numpy(zero_copy_only=False), np.float64)
                                       for c in meta_cols])
                bad = ~np.isfinite(raw).all(axis=1)
                if bad.any():
                    reason[bad] = "no_conditions:" + ",".join(meta_cols)
                    table = pa.Table.from_batches([batch])
                    cut = (table.column("cutout_ok").to_numpy(zero_copy_only=False) if "cutout_ok" in table.column_names
                           else np.ones(n))
                    table = _replace(table, "cutout_ok", pa.array(((cut == 1) & ~bad).astype(np.int32)))
                    for j, c in enumerate(meta_cols):
                        table = _replace(table, c, pa.array(np.where(bad, 0.0, raw[:, j])))
                    batch = table
            images, meta, ok, _ = decode_batch(batch, meta_cols, ckpt["meta_mean"], ckpt["meta_std"])
            logit = np.full(n, np.nan)
            if ok.any():
                logit[ok] = forward_logits(model, images, meta, dev)
            cut_reason = (batch.column("cutout_reason").to_pylist() if "cutout_reason" in batch.schema.names
                          else [None] * n)
            for i in np.flatnonzero(~ok):
                if reason[i] is None:
                    reason[i] = cut_reason[i] or "unusable_stamp"
            grades = (batch.column(grade_column).to_pylist() if grade_column else [None] * n)
            frames.append(pd.DataFrame({
                "task_id": batch.column("task_id").to_pylist(),
                "ra": batch.column("ra").to_numpy(zero_copy_only=False),
                "dec": batch.column("dec").to_numpy(zero_copy_only=False),
                "grade": [UNGRADED if g is None else str(g) for g in grades],
                "region_split": split, "scored": ok, "reason": list(reason), "logit": logit,
            }))
    if not frames:
        raise DHSError(f"{data} has no rows in any split")
    return pd.concat(frames, ignore_index=True)


def _replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def recall_table(lenses: pd.DataFrame, thresholds: list[tuple[float, float]], grade_column: str | None) -> pd.DataFrame:
    from darkhaloscope.metrics import recall_at_threshold, wilson_interval

    groups = [("all", lenses)]
    if grade_column:
        groups += [(g, lenses[lenses["grade"] == g]) for g in sorted(lenses["grade"].unique())]
    rows = []
    for grade, df in groups:
        scored = df.loc[df["scored"], "logit"].to_numpy(np.float64)
        for target, thr in thresholds:
            row = {"grade": grade, "fpr_target": target, "threshold": thr, "n_lenses": len(df),
                   "n_scored": len(scored), "n_found": math.nan, "recall": math.nan, "ci_low": math.nan,
                   "ci_high": math.nan, "n_unscored": int((~df["scored"]).sum())}
            if math.isfinite(thr) and len(scored):
                k, n = recall_at_threshold(scored, thr)
                lo, hi = wilson_interval(k, n)
                row.update(n_found=k, recall=k / n, ci_low=lo, ci_high=hi)
            rows.append(row)
    out = pd.DataFrame(rows)
    out["n_found"] = out["n_found"].astype("Int64")
    return out


def recall_path(stratified_csv) -> Path:
    p = Path(stratified_csv)
    return p.with_name(f"{p.stem}_recall.csv")


def report_html(table: pd.DataFrame, lenses: pd.DataFrame, data: str, thresholds, gallery_n: int = 16) -> str:
    """Offline page: the recall table, then found and missed lenses at the lowest estimable FPR target."""
    from darkhaloscope.evaluation.report import gallery_figure, missing, page, safe, section, table_html
    from darkhaloscope.stamps.dataset import fetch_stamps

    parts = [section("recall", "Recall on real known lenses", table_html(table))]
    usable = [(t, v) for t, v in thresholds if math.isfinite(v)]
    if not usable:
        parts.append(section("recall-galleries", "Found and missed lenses",
                              missing("no fpr target has a threshold in the stratified table")))
    else:
        target, thr = usable[0]
        scored = lenses[lenses["scored"]]
        found = scored[scored["logit"] >= thr].sort_values("logit", ascending=False).head(gallery_n)
        missed = scored[scored["logit"] < thr].sort_values("logit", ascending=True).head(gallery_n)
        body = ""
        for name, title, df in (("recall-found", f"Found at fpr {target:g} (highest logit first)", found),
                                ("recall-missed", f"Missed at fpr {target:g} (lowest logit first)", missed)):
            if df.empty:
                body += f"<h3>{html.escape(title)}</h3>" + missing("none")
                continue

            def _gallery(df=df, name=name, title=title):
                stamps = fetch_stamps(data, df["task_id"].tolist())
                keep = [t for t in df["task_id"] if t in stamps]
                caps = [f"{t} ({r:.4f}, {d:+.4f}) {g} logit {v:.2f}" for t, r, d, g, v in
                        df[["task_id", "ra", "dec", "grade", "logit"]].itertuples(index=False) if t in stamps]
                return gallery_figure([stamps[t] for t in keep], caps, name, title)
            body += f"<h3>{html.escape(title)}</h3>" + safe(_gallery, title)
        parts.append(section("recall-galleries", "Found and missed lenses", body))
    return page("darkhaloscope: recall on real known lenses", parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset of known-lens cutouts (dhs cutouts --label lens)")
    parser.add_argument("--ckpt", required=True, help="checkpoint (best.pt) that the stratified CSV evaluated")
    parser.add_argument("--stratified_csv", required=True, help="dhs eval's table: its tpr@fpr thresholds are used")
    parser.add_argument("--out_csv", default=None, help="default: <stem>_recall.csv next to --stratified_csv")
    parser.add_argument("--grade_column", default=None, help="catalogue grade column (lenscat: grading)")
    parser.add_argument("--scores_out", default=None, help="also write per-lens logits (parquet)")
    parser.add_argument("--report", default=None, help="also write an HTML page with found/missed galleries")
    parser.add_argument("--gallery_n", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.batch_size < 1:
        raise DHSError(f"--batch_size must be >= 1, got {args.batch_size}")
    thresholds = operating_thresholds(args.stratified_csv)
    lenses = score_lenses(args.data, args.ckpt, args.grade_column, args.batch_size, args.device)
    table = recall_table(lenses, thresholds, args.grade_column)
    out_csv = Path(args.out_csv) if args.out_csv else recall_path(args.stratified_csv)
    with atomic_output(out_csv) as tmp:
        table.to_csv(tmp, index=False, na_rep="")
    if args.scores_out:
        with atomic_output(args.scores_out) as tmp:
            pq.write_table(pa.Table.from_pandas(lenses, preserve_index=False), tmp)
    if args.report:
        page = report_html(table, lenses, args.data, thresholds, args.gallery_n)
        with atomic_output(args.report) as tmp:
            Path(tmp).write_text(page, encoding="utf-8")
    allrows = table[table["grade"] == "all"]
    summary = ", ".join(f"fpr {t:g}: {r:.3f}" if pd.notna(r) else f"fpr {t:g}: -"
                        for t, r in zip(allrows["fpr_target"], allrows["recall"]))
    n_un = int((~lenses["scored"]).sum())
    print(f"recall on {len(lenses)} known lenses ({n_un} not scorable): {summary} -> {out_csv}")
    return 0
