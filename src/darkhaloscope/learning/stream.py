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
from darkhaloscope.learning.meta import standardize_meta
from darkhaloscope.learning.sampling import epoch_sequence, split_batches
from darkhaloscope.stamps import contract
from darkhaloscope.stamps import dataset
from darkhaloscope.stamps.dataset import PARTITION, open_split  # noqa: F401  (the one reader of a split)
from darkhaloscope.stamps.dataset import as_float as _as_float, control_flags


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
