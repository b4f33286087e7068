"""`dhs mine`: hard negatives from a score parquet, excluding known lenses.

Streams the score file in record batches and keeps a bounded top-K (memory independent of the number of
rows). Rules, applied in this order and each logged with the number of rows it removed:
1. not a control (``is_control != 1``);
2. ``score < --min_score``;
3. within ``--exclude_radius_arcsec`` of a known lens (BallTree on the sphere, haversine metric; the real
   ``lenscat`` catalogue by default, or ``--known_lenses`` CSV/parquet with ra/dec in degrees);
4. (with ``--per_psf_bin N``) ``psfsize_r`` outside ``--psf_bins``, or beyond the top N of its PSF bin;
5. beyond the ``--topk`` highest logits.
Ranking is by float32 ``logit`` descending, ties broken by ``task_id`` ascending; ``rank`` 1 is the most
lens-like control.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.catalogs import KnownLensIndex, load_known_lenses
from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation import scorefile  # the one score-file validator
from darkhaloscope.evaluation.strata import bin_index, parse_bins
from darkhaloscope.io import atomic_output, check_writable, refuse_overwrite
from darkhaloscope.stamps import dataset

log = logging.getLogger("dhs.mine")

OUTPUT_SCHEMA = pa.schema([("task_id", pa.int64()), ("ra", pa.float64()), ("dec", pa.float64()),
                           ("score", pa.float32()), ("logit", pa.float32()), ("psfsize_r", pa.float32()),
                           ("rank", pa.int64())])
DEFAULT_PSF_BINS = "0.5,1.1,1.3,1.5,1.7,3.0"


def output_schema(task_id_type: pa.DataType = pa.int64()) -> pa.Schema:
    """OUTPUT_SCHEMA with ``task_id`` of the score file's own type (string ids stay strings)."""
    return OUTPUT_SCHEMA.set(0, pa.field("task_id", task_id_type))
_COLUMNS = ("task_id", "ra", "dec", "score", "logit", "psfsize_r")


# ----------------------------------------------------------------------------------------------------
# Bounded top-K
# ----------------------------------------------------------------------------------------------------

class TopK:
    """The ``k`` rows with the highest logit (ties: lower task_id first) seen so far.

    "Lower" is numeric order for integer task ids and code-point order for string ids (Python's ``str``
    order, e.g. "a10" < "a9"); a row tied with a full top-K's floor still enters when its id is lower.

    Each push merges the kept rows with the new ones and truncates, so memory is O(k + batch) whatever
    the number of rows streamed (a numpy merge-and-truncate: vectorised, unlike a per-row heap)."""

    def __init__(self, k: int):
        self.k = int(k)
        self.cols: dict[str, np.ndarray] | None = None

    @property
    def floor(self) -> float:
        if self.cols is None or self.cols["logit"].size < self.k:
            return -math.inf
        return float(self.cols["logit"][-1])

    def push(self, cols: dict[str, np.ndarray]) -> None:
        keep = cols["logit"] >= self.floor  # rows strictly below a full top-K's floor cannot enter
        cols = {c: v[keep] for c, v in cols.items()}
        if self.cols is not None:
            cols = {c: np.concatenate([self.cols[c], cols[c]]) for c in cols}
        order = np.lexsort((cols["task_id"], -cols["logit"].astype(np.float64)))[: self.k]
        self.cols = {c: v[order] for c, v in cols.items()}

    def __len__(self) -> int:
        return 0 if self.cols is None else int(self.cols["logit"].size)


# ----------------------------------------------------------------------------------------------------
# Mining
# ----------------------------------------------------------------------------------------------------

def _batch_columns(batch: pa.RecordBatch, has_logit: bool, has_score: bool, has_psf: bool) -> dict:
    n = batch.num_rows
    get = batch.column
    out = {"task_id": dataset.as_id_values(get("task_id"), "score file"),
           "ra": get("ra").to_numpy(zero_copy_only=False).astype(np.float64),
           "dec": get("dec").to_numpy(zero_copy_only=False).astype(np.float64)}
    if has_logit:
        out["logit"] = get("logit").to_numpy(zero_copy_only=False).astype(np.float32)
    if has_score:
        out["score"] = get("score").to_numpy(zero_copy_only=False).astype(np.float32)
    if not has_logit:  # only probabilities: invert the sigmoid (saturated scores stay tied)
        p = np.clip(out["score"].astype(np.float64), 1e-12, 1 - 1e-12)
        out["logit"] = np.log(p / (1 - p)).astype(np.float32)
    if not has_score:
        out["score"] = (1.0 / (1.0 + np.exp(-out["logit"].astype(np.float64)))).astype(np.float32)
    out["psfsize_r"] = (get("psfsize_r").to_numpy(zero_copy_only=False).astype(np.float32) if has_psf
                        else np.full(n, np.nan, np.float32))
    return out


def mine(scores_path, topk: int, min_score: float, radius_arcsec: float = 3.0, known_lenses=None,
         per_psf_bin: int | None = None, psf_bins=None, batch_size: int = 65536) -> tuple[pa.Table, dict]:
    """Return (hard-negative table with OUTPUT_SCHEMA, counts removed by each rule)."""
    if topk < 1:
        raise DHSError(f"--topk must be >= 1, got {topk}")
    if not 0.0 <= min_score <= 1.0:
        raise DHSError(f"--min_score must be in [0, 1], got {min_score}")
    if radius_arcsec < 0:
        raise DHSError(f"--exclude_radius_arcsec must be >= 0, got {radius_arcsec}")
    if per_psf_bin is not None and per_psf_bin < 1:
        raise DHSError(f"--per_psf_bin must be >= 1, got {per_psf_bin}")
    scores_path = Path(scores_path)
    pf = scorefile.open_score_file(scores_path, ("task_id", "ra", "dec", "is_control"))
    names = set(pf.schema_arrow.names)
    has_logit, has_score, has_psf = "logit" in names, "score" in names, "psfsize_r" in names
    id_type = pf.schema_arrow.field("task_id").type
    if per_psf_bin is not None and not has_psf:
        raise DHSError(f"--per_psf_bin needs a psfsize_r column, which {scores_path} lacks")
    edges = None
    if per_psf_bin is not None:
        edges = parse_bins(psf_bins or DEFAULT_PSF_BINS, "--psf_bins")

    index = KnownLensIndex(*load_known_lenses(known_lenses)) if radius_arcsec > 0 else None
    counts = {"rows": 0, "not_control": 0, "below_min_score": 0, "no_position": 0, "near_known_lens": 0,
              "outside_psf_bins": 0,
              "beyond_topk": 0, "kept": 0}
    tops = [TopK(per_psf_bin) for _ in range(edges.size - 1)] if edges is not None else [TopK(topk)]
    # the validator's columns are read too, so that mine refuses what eval refuses
    columns = list(dict.fromkeys(["is_control", *[c for c in (*_COLUMNS, *scorefile.CHECKED_COLUMNS) if c in names]]))
    from tqdm import tqdm

    bar = tqdm(total=pf.metadata.num_rows, unit="row", desc="dhs mine", leave=False)
    candidates = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            bar.update(batch.num_rows)
            counts["rows"] += batch.num_rows
            scorefile.check_rows(batch, scores_path)
            is_control = batch.column("is_control").to_numpy(zero_copy_only=False)
            control = np.asarray(is_control == 1)
            counts["not_control"] += int((~control).sum())
            cols = _batch_columns(batch, has_logit, has_score, has_psf)
            cols = {c: v[control] for c, v in cols.items()}
            high = cols["score"] >= min_score
            counts["below_min_score"] += int((~high).sum())
            cols = {c: v[high] for c, v in cols.items()}
            if index is not None:
                # a control without a position cannot be cleared of being a known lens: it is not mined
                unplaced = ~(np.isfinite(cols["ra"]) & np.isfinite(cols["dec"]))
                counts["no_position"] += int(unplaced.sum())
                cols = {c: v[~unplaced] for c, v in cols.items()}
                near = index.near(cols["ra"], cols["dec"], radius_arcsec)
                counts["near_known_lens"] += int(near.sum())
                cols = {c: v[~near] for c, v in cols.items()}
            if edges is None:
                candidates += cols["logit"].size
                tops[0].push(cols)
                continue
            b = bin_index(cols["psfsize_r"].astype(np.float64), edges)
            counts["outside_psf_bins"] += int((b < 0).sum())
            for i, top in enumerate(tops):
                sel = b == i
                candidates += int(sel.sum())
                top.push({c: v[sel] for c, v in cols.items()})
    finally:
        bar.close()
    parts = [t.cols for t in tops if len(t)]
    if parts:
        merged = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        final = TopK(topk)
        final.push(merged)
        kept = final.cols
    else:
        kept = {c: np.zeros(0, object if c == "task_id" else OUTPUT_SCHEMA.field(c).type.to_pandas_dtype())
                for c in _COLUMNS}
    # bounded memory: repeated ids are looked for among the kept rows (where they would do harm: one task
    # mined twice); dhs infer and dhs eval refuse them in the whole file
    dataset.check_unique_ids(kept["task_id"], f"score file {scores_path}",
                             "the scored split holds a task more than once (stale shards?)")
    n_kept = int(kept["logit"].size)
    counts["beyond_topk"] = candidates - n_kept
    counts["kept"] = n_kept
    kept["rank"] = np.arange(1, n_kept + 1, dtype=np.int64)
    schema = output_schema(id_type)
    table = pa.table({f.name: pa.array(kept[f.name].tolist() if f.name == "task_id" else kept[f.name], f.type)
                      for f in schema}, schema=schema)
    return table, counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="score parquet from dhs infer")
    parser.add_argument("--out", required=True, help="hard-negative parquet (consumed by dhs train --hard_negs)")
    parser.add_argument("--topk", type=int, default=50000)
    parser.add_argument("--min_score", type=float, default=0.90)
    parser.add_argument("--exclude_radius_arcsec", type=float, default=3.0,
                        help="drop controls within this radius of a known lens (0 disables)")
    parser.add_argument("--known_lenses", default=None,
                        help="CSV/parquet with ra/dec (deg) of known lenses; default: the lenscat catalogue")
    parser.add_argument("--per_psf_bin", type=int, default=None, help="keep at most N per psfsize_r bin")
    parser.add_argument("--psf_bins", default=DEFAULT_PSF_BINS, help="psfsize_r bin edges (arcsec) for --per_psf_bin")
    parser.add_argument("--batch_size", type=int, default=65536, help="rows read per streamed batch")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.batch_size < 1:
        raise DHSError(f"--batch_size must be >= 1, got {args.batch_size}")
    refuse_overwrite(args.out, {"--scores": args.scores, "--known_lenses": args.known_lenses}, "--out")
    check_writable(args.out, "--out")
    table, counts = mine(args.scores, args.topk, args.min_score, args.exclude_radius_arcsec, args.known_lenses,
                         args.per_psf_bin, args.psf_bins, args.batch_size)
    log.info("%d rows read; removed: %d not controls, %d below min_score %g, %d without ra/dec (cannot be checked "
             "against known lenses), %d within %g arcsec of a known lens, %d outside psf bins, %d beyond top-k; "
             "kept %d", counts["rows"], counts["not_control"], counts["below_min_score"], args.min_score,
             counts["no_position"], counts["near_known_lens"], args.exclude_radius_arcsec,
             counts["outside_psf_bins"], counts["beyond_topk"], counts["kept"])
    if counts["kept"] == 0:
        log.warning("no control passed the rules: writing a zero-row %s", args.out)
    with atomic_output(args.out) as tmp:
        pq.write_table(table, tmp)
    return 0
