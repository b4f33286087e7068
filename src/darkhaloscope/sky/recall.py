"""`dhs recall`: recall on real known lenses at the evaluation's operating thresholds.

Input: a Phase 4c-contract dataset of real known lenses (``dhs cutouts --label lens`` of, e.g., lenscat
entries; every split is read: a known lens is a known lens wherever its sky cell falls), a checkpoint and
the stratified CSV that ``dhs eval`` wrote for that model. The operating thresholds are the ``threshold``
(logit) of the ``stratum = all``, ``metric = tpr@fpr`` rows of that CSV, i.e. those set on the test
controls; a target whose threshold is empty there (too few controls to estimate it) gets empty cells here.

Views: the thresholds are only valid for logits scored the same way, so a lens is scored in the views of the
score file the stratified CSV was computed from (``--scored_with``, which records them; or ``--tta N``), through
``dhs infer``'s own path (``infer.load_scorer``/``score_batches``): a lens gets the logit ``dhs infer`` gives it.

A lens counts as found when its logit >= the threshold (the same rule as a ROC threshold, ties found).
Output ``--out_csv`` (default ``<stem>_recall.csv`` next to the stratified CSV), one row per (grade,
fpr target): ``grade`` (``all`` first, then each value of ``--grade_column``; a null grade is
``ungraded``), ``fpr_target``, ``threshold``, ``tta_views`` (the views scored), ``n_lenses`` (rows of that
grade), ``n_scored``, ``n_found``, ``recall`` = n_found / n_scored with its 95% Wilson interval ``ci_low``/``ci_high``, and ``n_unscored``
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

from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation.infer import TTA_CHOICES, load_scorer, score_batches, scoring_of
from darkhaloscope.evaluation.report import gallery_figure, missing, page, safe, section, table_html
from darkhaloscope.io import atomic_output, check_writable, file_sha256, refuse_overwrite, same_file
from darkhaloscope.metrics import recall_at_threshold, wilson_interval
from darkhaloscope.stamps.contract import SPLITS
from darkhaloscope.stamps.dataset import fetch_stamps, open_split

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
    out = []
    for t, v in zip(rows["target"], rows["threshold"]):
        target, thr = _number(t, "fpr target", path), _number(v, "threshold", path)
        if math.isnan(target):
            raise DHSError(f"{path}: an 'all' tpr@fpr row has no fpr target")
        out.append((target, thr))
    targets = [t for t, _ in out]
    for t in targets:
        if targets.count(t) > 1:
            raise DHSError(f"{path} repeats fpr target {t:g} in its 'all' tpr@fpr rows ({targets.count(t)} rows): "
                           "one threshold per target")
    return sorted(out)


def _number(value, what: str, path) -> float:
    """A cell as a float: empty is NaN (not estimable), 'inf' is inf (dhs eval's cut above every control)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DHSError(f"{path}: {what} '{value}' is not a number") from None


def check_outputs(args) -> None:
    """Before any work: no output is an input (or lies inside --data) or another output, and each is writable."""
    inputs = {"--data": args.data, "--ckpt": args.ckpt, "--stratified_csv": args.stratified_csv}
    outs = {"--out_csv": args.out_csv or recall_path(args.stratified_csv), "--scores_out": args.scores_out,
            "--report": args.report}
    for flag, out in outs.items():
        refuse_overwrite(out, inputs, flag)
    named = [(f, o) for f, o in outs.items() if o is not None]
    for i, (f, o) in enumerate(named):
        for g, q in named[i + 1:]:
            if same_file(o, q):
                raise DHSError(f"{f} and {g} are the same file {o}: refusing to write one over the other")
    for flag, out in named:
        check_writable(out, flag)


def score_lenses(data: str, ckpt_path: str, grade_column: str | None, batch_size: int = 256,
                 device: str = "auto", tta: int = 1, use_bf16: bool = False) -> pd.DataFrame:
    """One row per lens of every split: task_id, ra, dec, grade, region_split, scored (bool), reason,
    logit (NaN when not scored). Scored through ``infer``'s one path (``infer.load_scorer`` +
    ``infer.score_batches``) in ``tta`` views, so a lens gets the logit ``dhs infer --tta`` gives it."""
    scorer = load_scorer(ckpt_path, device, tta, use_bf16)
    frames = []
    for split in SPLITS:
        try:
            part = open_split(data, split)
        except DHSError as exc:
            if "no parquet files" in str(exc):
                continue
            raise
        schema = part.schema
        for c in ("ra", "dec"):
            if c not in schema.names:
                raise DHSError(f"{data} lacks column {c}: recall needs the catalogue's positions")
        if grade_column and grade_column not in schema.names:
            raise DHSError(f"{data} has no grade column '{grade_column}' (--grade_column); columns: "
                           f"{', '.join(schema.names)}")
        missing_meta = [c for c in scorer.meta_cols if c not in schema.names]
        if missing_meta:
            raise DHSError(f"{data} lacks the checkpoint's meta column(s) {', '.join(missing_meta)}")
        passthrough = list(dict.fromkeys(["ra", "dec", *([grade_column] if grade_column else []),
                                          *(["is_control"] if "is_control" in schema.names else [])]))
        for item in score_batches(part, scorer, passthrough, batch_size, skip_nan_meta=True, keep_unscored=True):
            for table, scored in ((item["table"], True), (item["unscored"], False)):
                if table is None or not table.num_rows:
                    continue
                if "is_control" in table.column_names and (
                        table.column("is_control").to_numpy(zero_copy_only=False) != 0).any():
                    raise DHSError(f"{data} split '{split}' has rows with is_control != 0: recall is for known "
                                   "lenses (dhs cutouts --label lens)")
                n = table.num_rows
                grades = table.column(grade_column).to_pylist() if grade_column else [None] * n
                frames.append(pd.DataFrame({
                    "task_id": table.column("task_id").to_pylist(),
                    "ra": table.column("ra").to_numpy(zero_copy_only=False),
                    "dec": table.column("dec").to_numpy(zero_copy_only=False),
                    "grade": [UNGRADED if g is None else str(g) for g in grades],
                    "region_split": split, "scored": scored,
                    "reason": [None] * n if scored else table.column("reason").to_pylist(),
                    "logit": (table.column("logit").to_numpy(zero_copy_only=False).astype(np.float64) if scored
                              else np.full(n, np.nan)),
                }))
    if not frames:
        raise DHSError(f"{data} has no rows in any split")
    return pd.concat(frames, ignore_index=True)


def views_of(tta: int | None, scored_with: str | None, ckpt: str | None = None) -> int:
    """The number of views to score in: those the stratified table's scores were made with. With ``ckpt``, the
    score file must also have been made by that very checkpoint (its recorded SHA-256): thresholds of one model
    (e.g. Gen3's) applied to another's logits (Gen2's) would give a meaningless recall."""
    if scored_with is None:
        if tta is None:
            raise DHSError("say which views the stratified table's scores used: --scored_with SCORES.parquet "
                           "(the score file dhs eval read) or --tta N")
        return tta
    scoring = scoring_of(scored_with)
    recorded = int(scoring["tta"])
    if tta is not None and tta != recorded:
        raise DHSError(f"--tta {tta} disagrees with {scored_with}, which was scored with {recorded} view(s)")
    if ckpt is not None and scoring.get("ckpt_sha256") and scoring["ckpt_sha256"] != file_sha256(ckpt):
        raise DHSError(f"--ckpt {ckpt} is not the checkpoint that scored {scored_with} ({scoring.get('ckpt')}): "
                       "the thresholds belong to that model; pass its checkpoint, or the score file of this one")
    return recorded


def recall_table(lenses: pd.DataFrame, thresholds: list[tuple[float, float]], grade_column: str | None,
                 tta: int = 1) -> pd.DataFrame:
    groups = [("all", lenses)]
    if grade_column:
        groups += [(g, lenses[lenses["grade"] == g]) for g in sorted(lenses["grade"].unique())]
    rows = []
    for grade, df in groups:
        scored = df.loc[df["scored"], "logit"].to_numpy(np.float64)
        for target, thr in thresholds:
            row = {"grade": grade, "fpr_target": target, "threshold": thr, "tta_views": tta, "n_lenses": len(df),
                   "n_scored": len(scored), "n_found": math.nan, "recall": math.nan, "ci_low": math.nan,
                   "ci_high": math.nan, "n_unscored": int((~df["scored"]).sum())}
            if not math.isnan(thr) and len(scored):  # an infinite threshold finds none (or all): recall 0 (1)
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
    parser.add_argument("--scored_with", default=None,
                        help="the score parquet the stratified CSV was computed from: its recorded views are used")
    parser.add_argument("--tta", type=int, default=None, choices=TTA_CHOICES,
                        help="views to score in (must match the thresholds' scores; --scored_with reads them)")
    parser.add_argument("--use_bf16", action="store_true", help="as dhs infer --use_bf16")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.batch_size < 1:
        raise DHSError(f"--batch_size must be >= 1, got {args.batch_size}")
    check_outputs(args)
    thresholds = operating_thresholds(args.stratified_csv)
    tta = views_of(args.tta, args.scored_with, args.ckpt)
    lenses = score_lenses(args.data, args.ckpt, args.grade_column, args.batch_size, args.device, tta, args.use_bf16)
    table = recall_table(lenses, thresholds, args.grade_column, tta)
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
    print(f"recall on {len(lenses)} known lenses ({n_un} not scorable), {tta} view(s): {summary} -> {out_csv}")
    return 0
