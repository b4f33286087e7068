#!/usr/bin/env python3
"""The finder-quality tables (issue 10) from score parquets: a finished workflow run directory or any scores.

    python tools/finder_table.py --run_dir results                 # gen3_test + gen2_test of a run
    python tools/finder_table.py --scores gen3=a.parquet --scores gen2=b.parquet [--json out.json]
    python tools/finder_table.py --run_dir results --append_csv docs/measurements/finder_runs.csv \
        --row_id 72 --change "what this run changed"    # also record the run: gen3 as row 72, gen2 as 72'

Per model, on its test split (rows joined with the stamps' truth columns by `dhs infer`):
* the summary row: AUROC (all positives, 95% Hanley-McNeil interval), tpr@fpr 1e-2 / 1e-3 / 1e-4 of all
  positives and of the "resolved bright" ones (theta_E/PSF >= 1.4 and arc_snr >= 20), with 95% Wilson
  intervals, empty where the controls cannot resolve the FPR (fewer than 1/FPR of them);
* the arc_snr strata: AUROC and tpr@fpr1e-2 per bin, beside the matched-filter reference of the same
  positives (darkhaloscope.evaluation.evaluate.mf_*: lens ~ N(arc_snr, 1), control ~ N(0, 1));
* what the false positives are: per confuser kind of the controls (``confuser_kind``: none, ring, tidal_arc,
  spiral_arm, blue_companion), how many there are and the fraction above the all-positives threshold at
  FPR 1e-2 and 1e-3 (a ring or tidal-arc confuser *is* arc-like light: the matched-filter reference, whose
  controls are pure noise, does not know about them);
* with --run_dir, the wall seconds of each rule from Snakemake's benchmark files and their sum.
  A run made by `snakemake gen3_stratified_fpr.csv` alone has no Gen2 test scores: Gen3 only, and a note says so.

Prints Markdown; --json also saves the numbers; --append_csv adds one row per model to the measured-runs log
(`docs/measurements/finder_runs.csv`, columns CSV_COLUMNS). No network, no training: seconds on any machine.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation import evaluate as ev
from darkhaloscope import metrics
from darkhaloscope.evaluation import strata
from darkhaloscope.io import check_writable, finite_or_null

FPRS = (1e-2, 1e-3, 1e-4)
RESOLVED_MIN_RATIO = 1.4
BRIGHT_MIN_SNR = 20.0
SNR_BINS = (0, 3, 5, 10, 20, 50, math.inf)


def auroc_interval(auc: float, n_pos: int, n_neg: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% interval of an AUROC from the Hanley & McNeil (1982, Radiology 143:29) standard error."""
    if not (math.isfinite(auc) and n_pos and n_neg):
        return math.nan, math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def rates(pos: np.ndarray, neg: np.ndarray, snr: np.ndarray) -> dict:
    """AUROC and tpr@fpr (with intervals) of one set of positives against all controls, and the
    matched-filter reference of the same positives."""
    out = {"n_pos": int(pos.size), "n_neg": int(neg.size)}
    y = np.r_[np.ones(pos.size, np.int8), np.zeros(neg.size, np.int8)]
    auc = metrics.auroc(y, np.r_[pos, neg]) if pos.size and neg.size else math.nan
    out["auroc"], out["auroc_ci"] = auc, auroc_interval(auc, pos.size, neg.size)
    out["mf_auroc"] = ev.mf_auroc(snr) if pos.size else math.nan
    pts = metrics.roc_points(y, np.r_[pos, neg]) if pos.size and neg.size else None
    for f in FPRS:
        key = f"tpr@{f:g}"
        value, ci = math.nan, (math.nan, math.nan)
        if pts is not None and metrics.fpr_target_estimable(neg.size, f):
            value = metrics.tpr_at_fpr(pts, f)[0]
            ci = metrics.wilson_interval(int(round(value * pos.size)), int(pos.size))
        out[key], out[key + "_ci"] = value, ci
        out["mf_" + key] = ev.mf_tpr_at_fpr(snr, f) if pos.size else math.nan
    return out


def confuser_rows(df: pd.DataFrame, scores_path) -> list[dict]:
    """Controls by confuser kind: count and fraction at or above the all-positives tpr@fpr thresholds."""
    import pyarrow.parquet as pq

    if "confuser_kind" not in pq.read_schema(scores_path).names:
        return []
    kind = pq.read_table(scores_path, columns=["confuser_kind"]).column("confuser_kind").to_pandas()
    y, rank = df["y"].to_numpy(), df["rank"].to_numpy()
    pts = metrics.roc_points(y, rank)
    ctrl = y == 0
    rows = []
    thresholds = {f: metrics.tpr_at_fpr(pts, f)[1] for f in (1e-2, 1e-3)
                  if metrics.fpr_target_estimable(int(ctrl.sum()), f)}
    for k in sorted(kind[ctrl].fillna("none").unique()):
        sel = ctrl & (kind.fillna("none").to_numpy() == k)
        row = {"kind": k, "n": int(sel.sum())}
        for f, thr in thresholds.items():
            row[f"above@{f:g}"] = int((rank[sel] >= thr).sum())
            row[f"frac_above@{f:g}"] = float((rank[sel] >= thr).mean())
        rows.append(row)
    return rows


def model_tables(scores_path) -> dict:
    df = strata.load_scores(scores_path)
    pos, neg = df[df.y == 1], df.loc[df.y == 0, "rank"].to_numpy()
    rank, snr, ratio = pos["rank"].to_numpy(), pos["arc_snr"].to_numpy(), pos["theta_over_psf"].to_numpy()
    bright = (ratio >= RESOLVED_MIN_RATIO) & (snr >= BRIGHT_MIN_SNR)
    snr_rows = []
    edges = np.asarray(SNR_BINS, float)
    idx = strata.bin_index(snr, edges)
    for b in range(edges.size - 1):
        snr_rows.append({"lo": edges[b], "hi": edges[b + 1], **rates(rank[idx == b], neg, snr[idx == b])})
    return {"all": rates(rank, neg, snr), "resolved_bright": rates(rank[bright], neg, snr[bright]),
            "snr_strata": snr_rows, "confusers": confuser_rows(df, scores_path), "path": str(scores_path)}


def rule_seconds(run_dir: Path) -> dict:
    out: dict[str, float] = {}
    for tsv in sorted((run_dir / "benchmarks").rglob("*.tsv")):
        rel = tsv.relative_to(run_dir / "benchmarks")
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        out[rule] = out.get(rule, 0.0) + float(pd.read_csv(tsv, sep="\t")["s"].iloc[0])
    return out


def _f(x, nd=3) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _ci(value, ci, nd=2) -> str:
    if not math.isfinite(value):
        return "–"
    return f"{value:.{nd + 1}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def markdown(results: dict) -> str:
    lines = ["| model | n_pos / n_neg | AUROC (all) | tpr@1e-2 (all) | tpr@1e-3 (all) | tpr@1e-4 (all) | "
             "resolved-bright n | RB tpr@1e-2 | RB tpr@1e-3 | RB tpr@1e-4 |", "|---" * 10 + "|"]
    for label, r in results.items():
        a, rb = r["all"], r["resolved_bright"]
        lines.append(f"| {label} | {a['n_pos']} / {a['n_neg']} | {_ci(a['auroc'], a['auroc_ci'])} | "
                     + " | ".join(_ci(a[f'tpr@{f:g}'], a[f'tpr@{f:g}_ci']) for f in FPRS)
                     + f" | {rb['n_pos']} | " + " | ".join(_ci(rb[f'tpr@{f:g}'], rb[f'tpr@{f:g}_ci']) for f in FPRS) + " |")
    first = next(iter(results.values()))
    a, rb = first["all"], first["resolved_bright"]
    lines.append(f"| matched-filter reference | | {_f(a['mf_auroc'])} | "
                 + " | ".join(_f(a[f'mf_tpr@{f:g}']) for f in FPRS) + " | | "
                 + " | ".join(_f(rb[f'mf_tpr@{f:g}']) for f in FPRS) + " |")
    lines += ["", "| arc_snr | n_pos | " + " | ".join(f"{k} AUROC | {k} tpr@1e-2" for k in results)
              + " | MF AUROC | MF tpr@1e-2 |", "|---" * (4 + 2 * len(results)) + "|"]
    for i, st in enumerate(first["snr_strata"]):
        cells = []
        for r in results.values():
            s = r["snr_strata"][i]
            cells += [_ci(s["auroc"], s["auroc_ci"]), _ci(s["tpr@0.01"], s["tpr@0.01_ci"])]
        hi = "inf" if not math.isfinite(st["hi"]) else f"{st['hi']:g}"
        lines.append(f"| {st['lo']:g}-{hi} | {st['n_pos']} | " + " | ".join(cells)
                     + f" | {_f(st['mf_auroc'])} | {_f(st['mf_tpr@0.01'])} |")
    for label, r in results.items():
        if not r["confusers"]:
            continue
        lines += ["", f"{label}: controls by confuser kind, above the all-positives threshold at FPR 1e-2 / 1e-3",
                  "", "| confuser_kind | n | above @1e-2 | frac | above @1e-3 | frac |", "|---|---|---|---|---|---|"]
        for c in r["confusers"]:
            lines.append(f"| {c['kind']} | {c['n']} | {c.get('above@0.01', '')} | {_f(c.get('frac_above@0.01', math.nan))} | "
                         f"{c.get('above@0.001', '')} | {_f(c.get('frac_above@0.001', math.nan))} |")
    return "\n".join(lines)


# The measured-runs log (docs/measurements/finder_runs.csv): one row per model of a measured run; the
# resolved-bright ("rb") figures with their 95% intervals; empty cells where a figure was not recorded.
RB_COLUMNS = {1e-2: "rb_tpr_1e-2", 1e-3: "rb_tpr_1e-3", 1e-4: "rb_tpr_1e-4"}
CSV_COLUMNS = ("row_id", "date", "model", "change", "n_pos", "n_neg", "rb_n", "auroc", "auroc_lo", "auroc_hi",
               *(col + suffix for col in RB_COLUMNS.values() for suffix in ("", "_lo", "_hi")), "timing", "verdict")


def csv_rows(results: dict, row_id: str, change: str, timing: str = "", verdict: str = "") -> list[dict]:
    """The measured-runs rows of these results: gen3 (or a lone model) as row_id, gen2 as row_id', any other
    label as row_id-label."""
    rows = []
    for label, r in results.items():
        rid = row_id + "'" if label == "gen2" else row_id if label == "gen3" or len(results) == 1 else f"{row_id}-{label}"
        a, rb = r["all"], r["resolved_bright"]
        row = {"row_id": rid, "date": datetime.date.today().isoformat(), "model": label, "change": change,
               "n_pos": a["n_pos"], "n_neg": a["n_neg"], "rb_n": rb["n_pos"], "auroc": _f(a["auroc"]),
               "auroc_lo": _f(a["auroc_ci"][0], 2), "auroc_hi": _f(a["auroc_ci"][1], 2),
               "timing": timing, "verdict": verdict}
        for f, col in RB_COLUMNS.items():
            value, (lo, hi) = rb[f"tpr@{f:g}"], rb[f"tpr@{f:g}_ci"]
            row[col], row[col + "_lo"], row[col + "_hi"] = _f(value), _f(lo, 2), _f(hi, 2)
        rows.append(row)
    return rows


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows to the measured-runs log; the header is written when the file is new. A file with other
    columns or a row id already there is refused before anything is written."""
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
                raise DHSError(f"{path}: columns {reader.fieldnames} are not the log's {list(CSV_COLUMNS)}")
            taken = {r["row_id"] for r in reader} & {r["row_id"] for r in rows}
        if taken:
            raise DHSError(f"{path}: row id {', '.join(sorted(taken))} already recorded")
        header = False
    else:
        header = True
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    with path.open("a", newline="") as fh:  # one write: the log never holds half a run
        fh.write(buf.getvalue())


def check_outputs(pairs, args) -> None:
    """One model per label (the tables are keyed by label: a repeated one would drop a model silently), and the
    --json/--md paths writable files, checked before any table is computed."""
    labels = [label for label, _ in pairs]
    for label in labels:
        if labels.count(label) > 1:
            raise DHSError(f"label '{label}' is given {labels.count(label)} times; give each model its own label")
    for flag in ("json", "md"):
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", help="a finished workflow run directory (scores/gen3_test, gen2_test)")
    ap.add_argument("--scores", action="append", default=[], help="label=path of a score parquet (repeatable)")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--md", help="also write the Markdown here")
    ap.add_argument("--append_csv", help="also append the run to this measured-runs log (CSV_COLUMNS)")
    ap.add_argument("--row_id", help="the run's row id in the log (with --append_csv; gen2 gets ID')")
    ap.add_argument("--change", help="what the run changed, for the log (with --append_csv)")
    ap.add_argument("--verdict", default="", help="optional verdict cell for the log")
    args = ap.parse_args(argv)
    if args.append_csv and not (args.row_id and args.change):
        ap.error("--append_csv needs --row_id and --change")
    pairs = [s.split("=", 1) for s in args.scores]
    if args.run_dir:
        run = Path(args.run_dir)
        found = [(k, run / "scores" / f"{k}_test_scores.parquet") for k in ("gen3", "gen2")]
        if not found[1][1].exists():  # `snakemake gen3_stratified_fpr.csv` alone scores Gen3 only
            print(f"finder_table: {found[1][1]} absent (the report or gen2_stratified_fpr.csv makes it): "
                  "Gen2 left out", file=sys.stderr)
        pairs = [(k, str(p)) for k, p in found if k == "gen3" or p.exists()] + pairs
    if not pairs or any(len(p) != 2 for p in pairs):
        ap.error("give --run_dir or --scores label=path")
    try:
        check_outputs(pairs, args)
    except DHSError as exc:
        print(f"finder_table: error: {exc}", file=sys.stderr)
        return 2
    try:
        results = {label: model_tables(path) for label, path in pairs}
    except DHSError as exc:  # a missing or malformed score file: one line, no traceback
        print(f"finder_table: error: {exc}", file=sys.stderr)
        return 2
    text = markdown(results)
    doc = {"models": results}
    if args.run_dir:
        secs = rule_seconds(Path(args.run_dir))
        doc["rule_seconds"] = secs
        text += ("\n\nrule wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())
                 + f"; sum {sum(secs.values()):.0f} s")
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(finite_or_null(doc), indent=1))
    if args.append_csv:
        secs = doc.get("rule_seconds", {})
        timing = (f"rule wall s: train {secs.get('train', 0):.0f}, sum {sum(secs.values()):.0f}" if secs else "")
        try:
            append_csv(Path(args.append_csv), csv_rows(results, args.row_id, args.change, timing, args.verdict))
        except DHSError as exc:
            print(f"finder_table: error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
