"""Streaming Phase 4c parquet into training and inference batches.

A split is opened by the one Phase 4c reader (``stamps.dataset``: files, partition, task ids, declared
cutout failures). Two consumers share one decode + normalise + meta path (``decode_batch`` /
``prepare_stamps``):

* ``Split.iter_batches`` + ``decode_batch``: a plain sequential read of one split (``evaluation.infer``,
  ``sky.recall``).
* ``StampStream``: the training/validation stream. It first reads the split's small scalar columns
  into an index (about 40 bytes per row; the stamps are never held beyond one shuffle window), applies
  the curriculum cuts, the control matching and the hard-negative weights, and then, every epoch, builds
  a deterministic *plan* from (seed, epoch):

  1. draws: every kept row once, except controls with a sampling weight w, which are drawn
     floor(w) or floor(w)+1 times (stochastic rounding, fresh each epoch; mean weight 1 over controls);
  2. order: row groups in a random order, cut into windows of ``window`` draws, each window shuffled at
     row level (repeated draws of a row are spread evenly through their window, so hard negatives land in
     different batches);
  3. batches: the sequence is cut into world_size x lanes x n contiguous, near-equal batches (sizes
     differ by at most one and never exceed batch_size), so every rank gets the same number of batches
     and every draw goes to exactly one (rank, lane). A lane is one DataLoader worker (or the main
     process); the rank's batches are delivered lane-interleaved, which is exactly the DataLoader's
     round-robin order, so the training order does not depend on worker timing.

  The epoch and the mid-epoch start position live in shared memory (``torch.multiprocessing.Value``),
  so persistent workers see ``set_epoch`` too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.multiprocessing as tmp
from torch.utils.data import IterableDataset, get_worker_info

from darkhaloscope.errors import DHSError
from darkhaloscope.learning.model import standardize_meta
from darkhaloscope.stamps import contract
from darkhaloscope.stamps import dataset
from darkhaloscope.stamps.dataset import PARTITION, open_split  # noqa: F401  (the one reader of a split)
from darkhaloscope.stamps.dataset import as_float as _as_float, control_flags

CUT_COLUMNS = ("theta_e_arcsec", "arc_snr", "psf_fwhm_used_r", "psfsize_r")
MATCH_COLUMNS = ("psfsize_r", "psfdepth_r")


# ----------------------------------------------------------------------------------------------------
# Decode + normalise + augment (shared by training and inference)
# ----------------------------------------------------------------------------------------------------

def draw_symmetries(rng: np.random.Generator, n: int) -> np.ndarray:
    """Augmentation draws: per stamp a random rot90 (k = 0..3) and a left-right flip with probability
    1/2, i.e. one of the 8 symmetries of the square pixel grid, as codes k + 4 * flip."""
    k = rng.integers(0, 4, n)
    flip = rng.random(n) < 0.5
    return k + 4 * flip


def prepare_stamps(blobs, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """npz blobs (pyarrow binary column or sequence of bytes/None) -> (normalised (N_ok, 3, 64, 64)
    float32, ok mask (N,)); augmented by ``draw_symmetries`` when ``rng`` is given (the symmetry is
    applied while normalising, in place). Sky-normalised and not clipped: the network applies its input
    stretch (``model.stretch``), so a bright host's core keeps the arc on top of it for a stretch that can
    show it."""
    images, ok = contract.decode_stamps(blobs)
    codes = draw_symmetries(rng, len(images)) if rng is not None else None
    if len(images):
        contract.normalize_stamps(images, codes, out=images, clip=None)
    return images, ok


def decode_batch(batch, meta_cols=(), meta_mean=None, meta_std=None, rng=None):
    """A RecordBatch/Table with ``stamp_npz`` (and ``cutout_ok``, meta columns if present) ->
    (images (N_ok, 3, 64, 64) normalised, meta (N_ok, k) standardised float32, ok (N,) bool,
    cutout (N,) bool).

    ``cutout`` is False for declared cutout failures (``dataset.cutout_usable``: cutout_ok != 1), which
    are never decoded; ok is False for those and where the stamp does not decode / is not 3x64x64 / is
    not finite. ``meta_mean``/``meta_std`` are the checkpoint's (``model.standardize_meta``)."""
    n = batch.num_rows
    blobs = batch.column("stamp_npz")
    cutout = dataset.cutout_usable(batch)
    if not cutout.all():  # rows without a cutout become nulls: not decoded, not ok
        blobs = pc.if_else(pa.array(cutout), blobs, pa.nulls(n, blobs.type))
    images, ok = prepare_stamps(blobs, rng)
    meta_cols = list(meta_cols)
    if meta_cols:
        raw = np.column_stack([_as_float(batch.column(c), c) for c in meta_cols])[ok]
        meta = standardize_meta(raw, meta_mean, meta_std)
    else:
        meta = np.zeros((int(ok.sum()), 0), np.float32)
    return images, meta, ok, cutout


# ----------------------------------------------------------------------------------------------------
# Index of a split: scalars only
# ----------------------------------------------------------------------------------------------------

@dataclass
class SplitIndex:
    """One entry per row with cutout_ok == 1: where it lives and its scalar columns."""

    files: list[str]
    file_id: np.ndarray  # int32
    row_group: np.ndarray  # int32
    row: np.ndarray  # int32, row within its row group
    task_id: np.ndarray  # int64, or str objects for string ids (dataset.as_id_values)
    label: np.ndarray  # int8: 1 = lens (positive), 0 = control
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # float64 scalars
    n_cutout_failed: int = 0

    def __len__(self) -> int:
        return len(self.task_id)

    def take(self, keep: np.ndarray) -> SplitIndex:
        return SplitIndex(self.files, self.file_id[keep], self.row_group[keep], self.row[keep],
                          self.task_id[keep], self.label[keep], {k: v[keep] for k, v in self.columns.items()},
                          self.n_cutout_failed)


def build_index(fs, files: list[str], scalar_columns) -> SplitIndex:
    """Read only the scalar columns of every row group (streaming) into a SplitIndex of the rows with a
    cutout (``dataset.cutout_usable``); the others are counted in ``n_cutout_failed``."""
    scalar_columns = list(dict.fromkeys(scalar_columns))
    parts = {k: [] for k in ("file_id", "row_group", "row", "task_id", "label", "ok")}
    cols = {c: [] for c in scalar_columns}
    read = list(dict.fromkeys(["task_id", "is_control", "cutout_ok", *scalar_columns]))
    for f_id, path in enumerate(files):
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            lacking = [c for c in read if c not in pf.schema_arrow.names]
            if lacking:
                raise DHSError(f"{path} lacks column(s) {','.join(lacking)}")
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=read)
                n = t.num_rows
                parts["file_id"].append(np.full(n, f_id, np.int32))
                parts["row_group"].append(np.full(n, rg, np.int32))
                parts["row"].append(np.arange(n, dtype=np.int32))
                parts["task_id"].append(dataset.as_id_values(t.column("task_id"), path))
                parts["label"].append(1 - control_flags(t.column("is_control"), path))
                parts["ok"].append(dataset.cutout_usable(t))
                for c in scalar_columns:
                    cols[c].append(_as_float(t.column(c), f"{c} of {path}"))
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    ok = cat["ok"].astype(bool)
    index = SplitIndex(files, cat["file_id"].astype(np.int32), cat["row_group"].astype(np.int32),
                       cat["row"].astype(np.int32), cat["task_id"], cat["label"].astype(np.int8),
                       {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in cols.items()})
    index = index.take(ok)
    index.n_cutout_failed = int((~ok).sum())
    return index


# ----------------------------------------------------------------------------------------------------
# Curriculum, control matching, hard negatives
# ----------------------------------------------------------------------------------------------------

def curriculum_mask(index: SplitIndex, min_theta_over_psf: float | None, min_arc_snr: float | None) -> np.ndarray:
    """True for rows kept by the cuts: every control, and positives with theta_E / PSF >=
    min_theta_over_psf and arc_snr >= min_arc_snr (PSF: contract.resolution_psf). NaN fails a cut."""
    keep = np.ones(len(index), bool)
    pos = index.label == 1
    if min_theta_over_psf:
        psf = contract.resolution_psf(index.columns["psf_fwhm_used_r"], index.columns["psfsize_r"])
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = index.columns["theta_e_arcsec"] / psf
        keep &= ~pos | (ratio >= min_theta_over_psf)
    if min_arc_snr:
        keep &= ~pos | (index.columns["arc_snr"] >= min_arc_snr)
    return keep


def cuts_active(min_theta_over_psf, min_arc_snr) -> bool:
    return bool(min_theta_over_psf) or bool(min_arc_snr)


def _cell_ids(cond: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """2-D histogram cell of each row; a NaN coordinate gets its own bin along that axis."""
    ids = np.zeros(len(cond), np.int64)
    for d, e in enumerate(edges):
        x = cond[:, d]
        b = np.clip(np.searchsorted(e, x, side="right") - 1, 0, len(e) - 2)
        b = np.where(np.isfinite(x), b, len(e) - 1)
        ids = ids * len(e) + b
    return ids


def control_match_weights(pos_cond: np.ndarray, ctrl_cond: np.ndarray, base_weight: np.ndarray,
                          n_bins: int | None = None) -> np.ndarray:
    """Importance weights that make the (base-weighted) controls' distribution of the condition columns
    (psfsize_r, psfdepth_r) equal to the kept positives' on a 2-D histogram with quantile bins:
    w_i = base_i * p_pos(cell_i) / p_ctrl(cell_i), scaled to mean 1 over the controls.
    Controls in cells without positives get weight 0 (they would tell the classes apart)."""
    n_pos, n_ctrl = len(pos_cond), len(ctrl_cond)
    if n_pos == 0 or n_ctrl == 0:
        return base_weight.astype(np.float64)
    if n_bins is None:  # about 20 rows per cell of the smaller class, 2..10 bins per axis
        n_bins = int(np.clip(math.sqrt(min(n_pos, n_ctrl) / 20.0), 2, 10))
    edges = []
    for d in range(pos_cond.shape[1]):
        both = np.concatenate([pos_cond[:, d], ctrl_cond[:, d]])
        both = both[np.isfinite(both)]
        e = np.unique(np.quantile(both, np.linspace(0, 1, n_bins + 1))) if both.size else np.array([0.0, 1.0])
        if len(e) < 2:
            e = np.array([e[0], e[0] + 1.0])
        edges.append(e)
    cells_p = _cell_ids(pos_cond, edges)
    cells_c = _cell_ids(ctrl_cond, edges)
    n_cells = int(np.prod([len(e) for e in edges]))
    p_pos = np.bincount(cells_p, minlength=n_cells) / n_pos
    p_ctrl = np.bincount(cells_c, weights=base_weight, minlength=n_cells) / base_weight.sum()
    ratio = np.divide(p_pos, p_ctrl, out=np.zeros(n_cells), where=p_ctrl > 0)
    w = base_weight * ratio[cells_c]
    return w * (n_ctrl / w.sum()) if w.sum() > 0 else w


def metadata_auc(cond: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None, seed: int = 0) -> float:
    """How well the conditions alone predict the label: 2-fold cross-validated logistic regression on
    quadratic features, (sample-)weighted AUC on the held-out folds. ~0.5 = no leak."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    weight = np.ones(len(label)) if weight is None else np.asarray(weight, float)
    use = weight > 0
    x = np.nan_to_num(np.asarray(cond, float)[use], nan=0.0)
    y, w = np.asarray(label)[use], weight[use]
    if len(np.unique(y)) < 2 or len(y) < 8:
        return math.nan
    fold = np.random.default_rng(seed).integers(0, 2, len(y))
    scores = np.zeros(len(y))
    for f in (0, 1):
        tr, te = fold != f, fold == f
        if len(np.unique(y[tr])) < 2:
            return math.nan
        clf = make_pipeline(StandardScaler(), PolynomialFeatures(2), LogisticRegression(max_iter=500))
        clf.fit(x[tr], y[tr], logisticregression__sample_weight=w[tr])
        scores[te] = clf.decision_function(x[te])
    return float(roc_auc_score(y, scores, sample_weight=w))


def read_hard_negatives(path: str) -> np.ndarray:
    """task_ids of a mined hard-negative parquet (int64 or str, as ``dataset.as_id_values``); a missing
    or unreadable file is an error."""
    import os

    if not os.path.exists(path):
        raise DHSError(f"hard-negative file {path} does not exist")
    if os.path.isdir(path):
        raise DHSError(f"hard-negative file {path} is a directory")
    try:
        table = pq.read_table(path, columns=["task_id"])
    except Exception as exc:
        raise DHSError(f"hard-negative file {path} is unreadable or has no task_id column: {exc}") from None
    return np.unique(dataset.as_id_values(table.column("task_id"), f"hard-negative file {path}"))


# ----------------------------------------------------------------------------------------------------
# The epoch plan
# ----------------------------------------------------------------------------------------------------

def draw_counts(weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """How often each row is drawn this epoch: floor(w) plus one with probability frac(w)."""
    base = np.floor(weight)
    return (base + (rng.random(len(weight)) < weight - base)).astype(np.int64)


def epoch_sequence(index: SplitIndex, weight: np.ndarray | None, seed: int, epoch: int, shuffle: bool,
                   window: int) -> np.ndarray:
    """The epoch's global sequence of index positions (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch, 7919])
    n = len(index)
    counts = np.ones(n, np.int64) if weight is None else draw_counts(weight, rng)
    rows = np.repeat(np.arange(n), counts)
    if not shuffle:
        return rows
    rg_global = index.file_id.astype(np.int64) * (1 << 32) + index.row_group
    uniq, rg_of_row = np.unique(rg_global, return_inverse=True)
    rg_rank = rng.permutation(len(uniq))[rg_of_row]
    # row groups in a random order; the rows of one row group stay together (I/O locality) until the
    # window shuffle mixes them with the other row groups of their window
    seq = rows[np.argsort(rg_rank[rows], kind="stable")]
    return _shuffle_windows(seq, counts, rng, window)


def _shuffle_windows(seq: np.ndarray, counts: np.ndarray, rng: np.random.Generator, window: int) -> np.ndarray:
    """Shuffle ``seq`` within consecutive windows; the m copies of a row get keys (j + u) / m, which
    spreads them evenly through the window instead of letting them cluster in one batch."""
    n = len(seq)
    if n == 0:
        return seq
    # copy index of each occurrence of a row within seq
    order = np.argsort(seq, kind="stable")
    sorted_rows = seq[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
    run_len = np.diff(np.r_[starts, n])
    copy_sorted = np.arange(n) - np.repeat(starts, run_len)
    copy = np.empty(n, np.int64)
    copy[order] = copy_sorted
    u_row = rng.random(len(counts))
    mult = counts[seq]
    single = mult == 1
    key = np.where(single, rng.random(n), (copy + u_row[seq]) / np.maximum(mult, 1))
    win = np.arange(n) // max(int(window), 1)
    return seq[np.lexsort((key, win))]


def split_batches(n_draws: int, world_size: int, lanes: int, batch_size: int) -> np.ndarray:
    """Boundaries of world_size*lanes*k near-equal contiguous batches (k the same for all)."""
    per = world_size * lanes
    k = max(1, math.ceil(n_draws / (per * batch_size)))
    return np.linspace(0, n_draws, per * k + 1).round().astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# The training / validation stream
# ----------------------------------------------------------------------------------------------------

class StampStream(IterableDataset):
    """Yields dict batches: images (n,3,64,64) float32, meta (n,k) float32, label (n,) float32 (1 = lens),
    task_id (n,) (int64 tensor, or a list of str for string ids), row (n,) int64 positions in the index,
    n_bad (stamps that did not decode, were not 3x64x64 or not finite), n_planned,
    batch_index (position in this rank's epoch order). Use with DataLoader(batch_size=None,
    num_workers=num_workers) and call ``set_epoch`` before each epoch."""

    def __init__(self, index: SplitIndex, fs, meta_cols=(), meta_mean=None, meta_std=None,
                 weight: np.ndarray | None = None, batch_size: int = 256, shuffle: bool = True,
                 augment: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, window: int | None = None):
        super().__init__()
        if len(index) == 0:
            raise DHSError("no usable rows to stream (all filtered out or cutout_ok != 1)")
        self.index = index
        self.fs = fs
        self.meta_cols = list(meta_cols)
        self.meta = (standardize_meta(np.column_stack([index.columns[c] for c in self.meta_cols]), meta_mean, meta_std)
                     if self.meta_cols else np.zeros((len(index), 0), np.float32))
        self.weight = weight
        self.batch_size = int(batch_size)
        self.shuffle, self.augment, self.seed = shuffle, augment, int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.lanes = max(1, int(num_workers))
        # shuffle window (draws): large enough that a row drawn m times gets m well separated slots and
        # that a window mixes at least 4 row groups (memory: one window of stamp blobs per lane)
        max_w = float(np.max(weight)) if weight is not None and len(weight) else 1.0
        rg_key = index.file_id.astype(np.int64) * (1 << 32) + index.row_group
        mean_rg = len(index) / max(len(np.unique(rg_key)), 1)
        self.window = int(window or max(2048, 8 * self.batch_size, 2 * self.batch_size * math.ceil(max_w),
                                        4 * math.ceil(mean_rg)))
        self._epoch = tmp.Value("q", 0)
        self._start = tmp.Value("q", 0)

    # -- shared state (survives persistent workers) --------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch.value = int(epoch)
        self._start.value = int(start_batch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    # -- plan -------------------------------------------------------------------------------------------
    def rank_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches (index positions) in delivery order for ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        seq = epoch_sequence(self.index, self.weight, self.seed, epoch, self.shuffle, self.window)
        bounds = split_batches(len(seq), self.world_size, self.lanes, self.batch_size)
        per_rank = (len(bounds) - 1) // self.world_size
        per_lane = per_rank // self.lanes
        first = self.rank * per_rank
        out = []
        for i in range(per_lane):  # lane-interleaved = DataLoader round-robin order
            for lane in range(self.lanes):
                b = first + lane * per_lane + i
                out.append(seq[bounds[b]:bounds[b + 1]])
        return out

    def __len__(self) -> int:
        """Batches per rank this epoch (same on every rank)."""
        return len(self.rank_batches())

    def __iter__(self):
        info = get_worker_info()
        epoch, start = self.epoch, int(self._start.value)
        batches = self.rank_batches(epoch)
        order = list(range(start, len(batches)))
        if info is None:
            mine = order
        else:
            if info.num_workers != self.lanes:
                raise DHSError(f"StampStream built for {self.lanes} lanes but the DataLoader has "
                               f"{info.num_workers} workers")
            mine = order[info.id::info.num_workers]
        reader = _RowReader(self.fs, self.index)
        reader.plan([batches[i] for i in mine])
        for i in mine:
            yield self._make_batch(batches[i], i, epoch, reader)
        reader.close()

    def _make_batch(self, rows: np.ndarray, batch_index: int, epoch: int, reader: _RowReader) -> dict:
        blobs = reader.take(rows)
        rng = np.random.default_rng([self.seed, epoch, batch_index, self.rank, 104729]) if self.augment else None
        images, ok = prepare_stamps(blobs, rng)
        good = rows[ok]
        return {
            "images": torch.from_numpy(images),
            "meta": torch.from_numpy(self.meta[good]),
            "label": torch.from_numpy(self.index.label[good].astype(np.float32)),
            "task_id": (torch.from_numpy(self.index.task_id[good]) if self.index.task_id.dtype != object
                        else self.index.task_id[good].tolist()),
            "row": torch.from_numpy(good.astype(np.int64)),
            "n_bad": int((~ok).sum()),
            "n_planned": int(len(rows)),
            "batch_index": int(batch_index),
        }


class _RowReader:
    """Reads the stamp blobs of planned rows, one row group at a time, keeping a row group's needed
    blobs only until its last planned draw in this lane is delivered (memory ~ one shuffle window)."""

    def __init__(self, fs, index: SplitIndex):
        self.fs, self.index = fs, index
        self.files: dict[int, pq.ParquetFile] = {}
        self.cache: dict[tuple[int, int], tuple[np.ndarray, pa.Array]] = {}
        self.remaining: dict[tuple[int, int], int] = {}
        self.needed: dict[tuple[int, int], np.ndarray] = {}

    def plan(self, batches: list[np.ndarray]) -> None:
        """Count, per row group, the draws this lane will take, and which rows it needs from it."""
        self.remaining, self.needed = {}, {}
        if not batches:
            return
        rows = np.concatenate(batches)
        key = self.index.file_id[rows].astype(np.int64) * (1 << 32) + self.index.row_group[rows]
        order = np.argsort(key, kind="stable")
        key_s, rows_s = key[order], rows[order]
        starts = np.r_[0, np.flatnonzero(np.diff(key_s)) + 1]
        for a, b in zip(starts, np.r_[starts[1:], len(key_s)]):
            k = (int(key_s[a] >> 32), int(key_s[a] & 0xFFFFFFFF))
            self.remaining[k] = int(b - a)
            self.needed[k] = np.unique(self.index.row[rows_s[a:b]])

    def _load(self, key: tuple[int, int], rows_in_group: np.ndarray) -> None:
        f, g = key
        if f not in self.files:
            self.files[f] = pq.ParquetFile(self.fs.open_input_file(self.index.files[f]))
        col = self.files[f].read_row_group(g, columns=["stamp_npz"]).column(0)
        wanted = np.unique(rows_in_group)
        # kept as one Arrow array (no Python bytes per row): ``take`` gathers a batch in C++
        self.cache[key] = (wanted, col.take(pa.array(wanted)).combine_chunks())

    def take(self, rows: np.ndarray) -> pa.Array:
        """The stamp_npz blobs of ``rows`` (in that order), as one Arrow binary array."""
        fids, rgs, rws = self.index.file_id[rows], self.index.row_group[rows], self.index.row[rows]
        keys = list(dict.fromkeys(zip(fids.tolist(), rgs.tolist())))
        for key in keys:
            if key not in self.cache:
                # every row this lane still needs from this group (later batches included)
                self._load(key, self._needed_rows(key))
        # Gather each group's rows from its own cached array, then restore the batch order. (A ``take`` on a
        # ChunkedArray of binaries concatenates every chunk first: it copied the whole cached window for each
        # batch and cost more than decoding the stamps.)
        parts = []
        position = np.empty(len(rows), np.int64)  # of each row in the concatenated parts
        base = 0
        for key in keys:
            wanted, blobs = self.cache[key]
            sel = np.flatnonzero((fids == key[0]) & (rgs == key[1]))
            parts.append(blobs.take(pa.array(np.searchsorted(wanted, rws[sel]))))
            position[sel] = base + np.arange(len(sel))
            base += len(sel)
            self.remaining[key] -= len(sel)
        out = pa.concat_arrays(parts).take(pa.array(position))
        for key in keys:
            if self.remaining[key] <= 0:
                del self.cache[key]
        return out

    def _needed_rows(self, key):
        return self.needed[key]

    def close(self) -> None:
        self.files.clear()
        self.cache.clear()
