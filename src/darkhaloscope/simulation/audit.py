"""Realism gates (``dhs audit``), measured on a Phase 4c split before any training.

- core-only AUC: a logistic regression on the central 10x10 pixels (all three bands) of the
  normalised stamps (``contract.normalize_stamps``), 5-fold cross-validated. A high value means the
  positives can be told apart by "more light in the core" alone (the shortcut that broke earlier
  generations).
- metadata-only AUC: gradient boosting on ``psfsize_r``, ``psfdepth_r`` alone, 5-fold cross-validated.
  A high value means the observing conditions alone reveal the label.
- class balance: means, quantiles and a two-sample KS test of every condition column per class.

The AUCs are computed from out-of-fold predictions (``cross_val_predict``), so they estimate what a
model trained on other rows achieves. Both gates are compared to thresholds; a failure warns loudly
(``--on_fail warn``, exit 0) or stops (``--on_fail stop``, DHSError naming the gate).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
from scipy.stats import ks_2samp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from darkhaloscope.errors import DHSError
from darkhaloscope.metrics import auroc
from darkhaloscope.io import atomic_output, check_writable, refuse_overwrite
from darkhaloscope.stamps import dataset
from darkhaloscope.stamps.contract import CONDITION_COLUMNS, SPLITS, STAMP_SIZE, decode_stamps, normalize_stamps

CORE_PIX = 10
META_COLUMNS = ("psfsize_r", "psfdepth_r")
N_FOLDS = 5


def load_split(data, split: str, max_rows: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Read one split of a Phase 4c dataset (``stamps.dataset``: local or s3://, either writer's layout):
    a seeded random subset of at most ``max_rows`` of the rows with a cutout, returning the label,
    condition columns and decoded stamps of those that decode. Two streaming passes: the small columns
    of every row, then the stamps of the chosen rows only."""
    if split not in SPLITS:
        raise DHSError(f"--split must be one of {SPLITS}, got '{split}'")
    sp = dataset.open_split(str(data), split)
    need = ["is_control", "stamp_npz", *META_COLUMNS]
    sp.require(need)
    small = ["is_control", *META_COLUMNS] + [c for c in CONDITION_COLUMNS if c in sp.schema.names and c not in need]
    read = small + (["cutout_ok"] if "cutout_ok" in sp.schema.names else [])
    values = {c: [] for c in small}
    usable = []
    for batch in sp.iter_batches(read, batch_size=65536):
        usable.append(dataset.cutout_usable(batch))
        values["is_control"].append(dataset.control_flags(batch.column("is_control"), sp.where))
        for c in small[1:]:
            values[c].append(dataset.as_float(batch.column(c), f"{c} of {sp.where}"))
    usable = np.concatenate(usable) if usable else np.zeros(0, bool)
    rows = np.flatnonzero(usable)
    if rows.size == 0:
        raise DHSError(f"--data {data} has no rows with a cutout in split '{split}' "
                       f"({int((~usable).sum())} declared cutout failures)")
    if max_rows and rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    blobs, start = [], 0
    for batch in sp.iter_batches(["stamp_npz"], batch_size=1024):
        stop = start + batch.num_rows
        sel = rows[(rows >= start) & (rows < stop)] - start
        if sel.size:
            blobs.append(batch.column(0).take(pa.array(sel)))
        start = stop
    images, ok = decode_stamps(pa.chunked_array(blobs, pa.binary()) if blobs else [])
    out = {c: np.concatenate(v)[rows][ok] for c, v in values.items()}
    out["images"] = images
    out["n_undecodable"] = int((~ok).sum())
    out["n_cutout_failed"] = int((~usable).sum())
    return out


def core_features(images: np.ndarray) -> np.ndarray:
    """Central CORE_PIX x CORE_PIX pixels of the normalised stamps, all bands, flattened."""
    lo = STAMP_SIZE // 2 - CORE_PIX // 2
    core = normalize_stamps(images)[:, :, lo:lo + CORE_PIX, lo:lo + CORE_PIX]
    return core.reshape(len(core), -1).astype(np.float64)


def _cv_auc(model, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    folds = StratifiedKFold(n_splits=N_FOLDS, shuffle=True, random_state=seed)
    prob = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(auroc(y, prob))


def core_only_auc(images: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    return _cv_auc(model, core_features(images), y, seed)


def metadata_only_auc(meta: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    model = HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, random_state=seed)
    return _cv_auc(model, meta, y, seed)


def _summary(v: np.ndarray) -> dict:
    return {"mean": float(np.mean(v)), "q10_q50_q90": [float(q) for q in np.quantile(v, [0.1, 0.5, 0.9])]}


def class_balance(data: dict, y: np.ndarray) -> dict:
    """Per condition column: mean and 10/50/90% quantiles per class, and the two-sample KS p-value."""
    out = {}
    for c in CONDITION_COLUMNS:
        if c not in data:
            continue
        v = np.asarray(data[c], np.float64)
        pos, neg = v[y == 1], v[y == 0]
        out[c] = {
            "positives": _summary(pos),
            "controls": _summary(neg),
            "ks_pvalue": float(ks_2samp(pos, neg).pvalue),
        }
    return out


def audit(data, split: str = "train", max_rows: int | None = 20000, core_auc_max: float = 0.65,
          meta_auc_max: float = 0.55, seed: int = 0) -> dict:
    """All gate figures for one split as a JSON-ready dict."""
    d = load_split(data, split, max_rows, seed)
    y = (np.asarray(d["is_control"]) == 0).astype(int)  # 1 = injected lens (control_flags checked 0/1)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < N_FOLDS:
        raise DHSError(f"split '{split}' has {n_pos} positives and {n_neg} controls; the audit needs at least "
                       f"{N_FOLDS} of each")
    meta = np.stack([np.asarray(d[c], np.float64) for c in META_COLUMNS], axis=1)
    if not np.isfinite(meta).all():
        raise DHSError(f"split '{split}' has NaN/inf in {', '.join(META_COLUMNS)}")
    # one BLAS/OpenMP thread: these fits are small, and on a shared machine thread oversubscription made
    # them 10x slower
    with threadpool_limits(limits=1):
        core_auc = core_only_auc(d["images"], y, seed)
        meta_auc = metadata_only_auc(meta, y, seed)
    gates = {
        "core_only": {"auc": core_auc, "max": core_auc_max, "passed": bool(core_auc <= core_auc_max),
                      "what": f"5-fold CV logistic regression on the central {CORE_PIX}x{CORE_PIX} "
                              "normalised pixels (g,r,z)"},
        "metadata_only": {"auc": meta_auc, "max": meta_auc_max, "passed": bool(meta_auc <= meta_auc_max),
                          "what": f"5-fold CV gradient boosting on {', '.join(META_COLUMNS)}"},
    }
    return {
        "data": str(data), "split": split, "n_rows": int(len(y)), "n_positives": n_pos, "n_controls": n_neg,
        "n_undecodable": d["n_undecodable"], "n_cutout_failed": d["n_cutout_failed"], "max_rows": max_rows,
        "core_only_auc": core_auc, "metadata_only_auc": meta_auc,
        "thresholds": {"core_auc_max": core_auc_max, "meta_auc_max": meta_auc_max},
        "gates": gates, "class_balance": class_balance(d, y),
        "passed": all(g["passed"] for g in gates.values()),
    }


def failure_warning(report: dict) -> str:
    failed = [name for name, g in report["gates"].items() if not g["passed"]]
    bar = "!" * 78
    lines = [bar, "WARNING: REALISM GATE(S) FAILED: " + ", ".join(failed)]
    for name in failed:
        g = report["gates"][name]
        lines.append(f"  {name}: AUC {g['auc']:.3f} > max {g['max']:.3f} ({g['what']})")
    lines += [f"  data {report['data']} split {report['split']} ({report['n_rows']} rows)",
              "  A classifier trained on this data may learn a shortcut instead of arcs.", bar]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="Phase 4c data directory (region_split=<split>/...)")
    parser.add_argument("--out", required=True, help="JSON report")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_rows", type=int, default=20000, help="seeded random subset size (0 = all)")
    parser.add_argument("--on_fail", choices=("warn", "stop"), default="warn")
    parser.add_argument("--core_auc_max", type=float, default=0.65)
    parser.add_argument("--meta_auc_max", type=float, default=0.55)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    refuse_overwrite(args.out, {"--data": args.data}, "--out")
    check_writable(args.out, "--out")  # before the work, not after it
    report = audit(args.data, args.split, args.max_rows or None, args.core_auc_max, args.meta_auc_max, args.seed)
    report["on_fail"] = args.on_fail
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"audit {args.split}: core-only AUC {report['core_only_auc']:.3f} (max {args.core_auc_max}), "
          f"metadata-only AUC {report['metadata_only_auc']:.3f} (max {args.meta_auc_max}), "
          f"{report['n_positives']} positives / {report['n_controls']} controls -> {args.out}")
    if not report["passed"]:
        if args.on_fail == "stop":
            failed = [f"{n} AUC {g['auc']:.3f} > {g['max']}" for n, g in report["gates"].items() if not g["passed"]]
            raise DHSError(f"realism gate failed: {'; '.join(failed)} (report written to {args.out})")
        print(failure_warning(report), file=sys.stderr)
    return 0
