"""`dhs infer`: score one split with a checkpoint and write a score parquet.

The network, its meta columns and their standardisation come from the checkpoint alone
(``checkpoint.load_model``); stamps go through the training stream's decode + normalise + meta path
(``stream.decode_batch``), so training and inference cannot disagree on normalisation.

Memory is bounded: the split is streamed in record batches (``stamps.dataset.Split.iter_batches``), decoded one
batch at a time (a background thread or ``--num_workers`` processes prepare the next batches while the
network runs), and each scored batch is appended to a ``ParquetWriter`` on a temporary name that is
renamed only when the whole split is done. ``logit`` is float32 and computed in float32 even under
``--use_bf16`` (bf16 autocast covers the backbone; the model's head runs in float32), ``score`` =
sigmoid(logit). Declared cutout failures (``cutout_ok != 1``, ``stamps.dataset.cutout_usable``) are not
scored and counted on their own; stamps that do not decode, have the wrong shape or are not finite are
counted as skipped, and the run stops once those exceed ``--max_skip_frac`` of the rows with a cutout.
``task_id`` is copied with its own Arrow type (string ids stay strings). ``--split all`` scores every split
present into one file (a real-sky parent sample, whose rows fall in every split).

One scoring path: ``load_scorer`` (checkpoint, device, views, bf16) and ``score_batches`` (the batch loop) are
what ``dhs infer``, ``dhs recall`` and real-sky scoring all call, so a stamp gets the same logit whichever
command scores it. The score parquet records how it was scored in its schema metadata
(``darkhaloscope.scoring``: ``tta``, the view codes, ``use_bf16``, the checkpoint), read back by
``scoring_of``: ``dhs recall --scored_with`` scores the known lenses in the views its thresholds were set with.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output, file_sha256

log = logging.getLogger("dhs.infer")

# Copied from the data into the score file (those present), in this order, after task_id.
PASSTHROUGH_COLUMNS = ("ra", "dec", "brickname", "region_split", "is_control", "theta_e_arcsec", "psf_fwhm_used_r",
                       "psfsize_r", "psfdepth_r", "arc_snr", "control_kind", "confuser_kind")


# ----------------------------------------------------------------------------------------------------
# Batches: read -> decode/normalise -> (passthrough columns of the scored rows, images, meta, n_skipped)
# ----------------------------------------------------------------------------------------------------

def _prepare(batch: pa.RecordBatch, passthrough, meta_cols, meta_mean, meta_std, controls_only: bool = False,
             skip_nan_meta: bool = False, keep_unscored: bool = False) -> dict:
    from darkhaloscope.learning.stream import decode_batch
    from darkhaloscope.stamps.dataset import control_flags

    n_rows = batch.num_rows
    n_not_control = 0
    if controls_only:  # before decoding: the lenses' stamps are never decoded or scored
        control = control_flags(batch.column("is_control"), "--only_controls") == 1
        n_not_control = int((~control).sum())
        batch = batch.filter(pa.array(control))
    images, meta, ok, cutout = decode_batch(batch, meta_cols, meta_mean, meta_std)
    reason = np.full(batch.num_rows, None, object)
    n_no_meta = 0
    if skip_nan_meta and meta_cols:  # rows without the conditions the model needs are not scored (no imputation)
        raw = np.column_stack([np.asarray(batch.column(c).to_numpy(zero_copy_only=False), np.float64)
                               for c in meta_cols])
        no_meta = ok & ~np.isfinite(raw).all(axis=1)
        if no_meta.any():
            reason[no_meta] = "no_conditions:" + ",".join(meta_cols)
            n_no_meta = int(no_meta.sum())
            usable = ~no_meta[ok]
            images, meta, ok = images[usable], meta[usable], ok & ~no_meta
    table = pa.Table.from_batches([batch.select(["task_id", *passthrough])])
    item = {"table": table.filter(pa.array(ok)), "images": images, "meta": meta, "n_rows": n_rows,
            "n_not_control": n_not_control, "n_skipped": int((cutout & ~ok).sum()) - n_no_meta,
            "n_no_meta": n_no_meta, "n_no_cutout": int((~cutout).sum()), "unscored": None}
    if keep_unscored:
        declared = (batch.column("cutout_reason").to_pylist() if "cutout_reason" in batch.schema.names
                    else [None] * batch.num_rows)
        for i in np.flatnonzero(~ok):
            if reason[i] is None:
                reason[i] = (declared[i] or "no_cutout") if not cutout[i] else "unusable_stamp"
        bad = ~ok
        item["unscored"] = table.filter(pa.array(bad)).append_column("reason", pa.array(list(reason[bad]), pa.string()))
    return item


def _prepared_batches_class():
    """The iterable dataset class (built lazily so that importing this module does not import torch)."""
    from torch.utils.data import IterableDataset

    class PreparedBatches(_PreparedBatches, IterableDataset):
        pass

    return PreparedBatches


class _PreparedBatches:
    """Iterable of prepared batches in file order. Worker ``w`` of ``W`` reads and decodes batches ``i % W == w``
    (``Split.iter_batches(shard=...)``: only the row groups of its own batches), which a DataLoader's
    round-robin fetching returns in the original order."""

    def __init__(self, split, read_columns, batch_size, passthrough, ckpt, controls_only=False,
                 skip_nan_meta=False, keep_unscored=False):  # split: dataset.Split
        self.split, self.args = split, (read_columns, batch_size)
        self.passthrough = passthrough
        self.options = (controls_only, skip_nan_meta, keep_unscored)
        self.meta = (list(ckpt["meta_cols"]), ckpt["meta_mean"], ckpt["meta_std"])

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in self.split.iter_batches(*self.args, shard=(worker, n_workers)):
            yield _prepare(batch, self.passthrough, *self.meta, *self.options)


def _in_background(iterable, depth: int = 2):
    """Run ``iterable`` in a thread, ``depth`` items ahead (decoding overlaps the forward pass: numpy and
    torch release the GIL in their heavy loops). Exceptions are re-raised in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="dhs-infer-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def prepared_batches(split, read_columns, batch_size, passthrough, ckpt, num_workers: int = 0, controls_only=False,
                     skip_nan_meta=False, keep_unscored=False):
    """``split``: a ``stamps.dataset.Split``."""
    source = _prepared_batches_class()(split, read_columns, batch_size, passthrough, ckpt, controls_only,
                                       skip_nan_meta, keep_unscored)
    if num_workers <= 0:
        return _in_background(source)
    from torch.utils.data import DataLoader

    return DataLoader(source, batch_size=None, num_workers=num_workers, prefetch_factor=2, collate_fn=_as_is)


def _as_is(item):
    """DataLoader 'collate' that keeps numpy arrays and arrow tables as they are."""
    return item


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------

# Test-time augmentation: the views a stamp is scored in, as symmetry codes of the training augmentation
# (stream.draw_symmetries: rot90 k times, then a left-right flip if code >= 4). Each prefix of 1, 2, 4 or 8 is a
# subgroup of the square's 8 symmetries (identity; + flip; + rot180 and its flip; + the quarter turns), so the
# averaged logit is invariant under that subgroup whatever the stamp's orientation.
TTA_CODES = (0, 4, 2, 6, 1, 5, 3, 7)
TTA_CHOICES = (1, 2, 4, 8)


def symmetric_view(x, code: int):
    """One symmetry of a (..., H, W) torch batch, as ``contract.normalize_stamps`` applies augmentation codes."""
    import torch

    x = torch.rot90(x, code % 4, dims=(-2, -1)) if code % 4 else x
    return torch.flip(x, dims=(-1,)) if code >= 4 else x


def forward_logits(model, images: np.ndarray, meta: np.ndarray, device, use_bf16: bool = False,
                   tta: int = 1) -> np.ndarray:
    """float32 logits of one batch. bf16 autocast covers the backbone; the model's head runs in float32.
    ``tta`` > 1: the mean logit over the first ``tta`` views of ``TTA_CODES`` (test-time augmentation)."""
    import torch

    if tta not in TTA_CHOICES:
        raise DHSError(f"tta must be one of {', '.join(map(str, TTA_CHOICES))} views, got {tta!r}")
    x = torch.from_numpy(images).to(device, non_blocking=True)
    m = torch.from_numpy(meta).to(device, non_blocking=True) if meta.shape[1] else None
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(x, m)
        for code in TTA_CODES[1:tta]:
            logits = logits + model(symmetric_view(x, code), m)
        if tta > 1:
            logits = logits / tta
    if logits.dtype != torch.float32:
        raise DHSError(f"model returned {logits.dtype} logits; expected float32")
    out = logits.cpu().numpy()
    if not np.isfinite(out).all():
        raise DHSError(f"model produced {int((~np.isfinite(out)).sum())} non-finite logits in one batch (broken checkpoint?)")
    return out


def sigmoid32(logits: np.ndarray) -> np.ndarray:
    """sigmoid of float32 logits, evaluated in float64 without overflow, returned as float32."""
    z = np.asarray(logits, np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# The one scoring path: dhs infer, dhs recall and real-sky scoring all go through Scorer + score_batches
# ----------------------------------------------------------------------------------------------------

SCORING_METADATA_KEY = b"darkhaloscope.scoring"


@dataclass
class Scorer:
    """A checkpoint's network on a device with the views it is scored in (``tta``) and bf16 autocast or not."""

    model: object
    ckpt: dict
    device: object
    tta: int = 1
    use_bf16: bool = False

    @property
    def meta_cols(self) -> list[str]:
        return list(self.ckpt["meta_cols"])

    def logits(self, images: np.ndarray, meta: np.ndarray) -> np.ndarray:
        return forward_logits(self.model, images, meta, self.device, self.use_bf16, self.tta)

    def metadata(self) -> dict:
        """What a score file records about how it was scored (``scoring_of`` reads it back)."""
        return {"tta": self.tta, "use_bf16": self.use_bf16, "tta_codes": list(TTA_CODES[:self.tta])}


def load_scorer(ckpt_path, device: str = "auto", tta: int = 1, use_bf16: bool = False) -> Scorer:
    from darkhaloscope.learning.checkpoint import load_model

    if tta not in TTA_CHOICES:
        raise DHSError(f"tta must be one of {', '.join(map(str, TTA_CHOICES))} views, got {tta!r}")
    dev = resolve_device(device)
    model, ckpt = load_model(ckpt_path, map_location="cpu")
    model.to(dev)
    return Scorer(model, ckpt, dev, tta, use_bf16)


def scoring_of(score_file) -> dict:
    """The ``Scorer.metadata`` a score parquet was written with; DHSError if it has none."""
    import json

    try:
        meta = pq.read_schema(score_file).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise DHSError(f"score file {score_file} is not readable ({type(exc).__name__}: {exc})") from None
    if SCORING_METADATA_KEY not in meta:
        raise DHSError(f"score file {score_file} does not record the views it was scored with (written before dhs "
                       "infer recorded them: score it again, or pass the views explicitly)")
    return json.loads(meta[SCORING_METADATA_KEY])


def read_columns_for(split, scorer: Scorer, passthrough) -> list[str]:
    names = split.schema.names
    return list(dict.fromkeys(["task_id", "stamp_npz", *[c for c in ("cutout_ok", "cutout_reason") if c in names],
                               *passthrough, *scorer.meta_cols]))


def score_batches(split, scorer: Scorer, passthrough, batch_size: int, num_workers: int = 0,
                  controls_only: bool = False, skip_nan_meta: bool = False, keep_unscored: bool = False):
    """THE batch loop. Yields the prepared batches of ``split`` (``_prepare``'s dict) with the scored rows'
    ``logit`` (float32) and ``score`` columns appended to ``item["table"]``. ``skip_nan_meta``: rows whose
    meta columns are not finite are not scored (reason ``no_conditions:...``) instead of given the training
    mean; ``keep_unscored``: ``item["unscored"]`` holds the rows not scored with a ``reason``."""
    read_columns = read_columns_for(split, scorer, passthrough)
    split.require(read_columns)
    for item in prepared_batches(split, read_columns, batch_size, passthrough, scorer.ckpt, num_workers,
                                 controls_only, skip_nan_meta, keep_unscored):
        table = item["table"]
        if table.num_rows:
            logits = scorer.logits(item["images"], item["meta"])
            table = table.append_column("logit", pa.array(logits, pa.float32()))
            item["table"] = table.append_column("score", pa.array(sigmoid32(logits), pa.float32()))
        else:
            item["table"] = None
        yield item


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Phase 4c dataset root (local directory or s3://...)")
    parser.add_argument("--ckpt", required=True, help="checkpoint (best.pt) from dhs train")
    parser.add_argument("--out", required=True, help="score parquet to write")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="the split to score; all: every split present, into one file (e.g. a real-sky parent)")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--use_bf16", action="store_true", help="bf16 autocast for the backbone (logits stay float32)")
    parser.add_argument("--tta", type=int, default=1, choices=TTA_CHOICES,
                        help="test-time augmentation: mean logit over this many symmetric views of each stamp")
    parser.add_argument("--only_controls", action="store_true",
                        help="score only the controls (is_control == 1), e.g. for hard-negative mining")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="decoding processes (0: one background thread in this process)")
    parser.add_argument("--max_skip_frac", type=float, default=0.01,
                        help="stop with an error once more than this fraction of the split is unscorable")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")


def resolve_device(name: str):
    """``--device`` -> torch.device, refusing unknown names and CUDA devices this machine lacks."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DHSError(f"--device '{name}' is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DHSError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DHSError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise DHSError(f"--device '{name}' is not supported (auto, cpu, cuda, cuda:N)")
    return device


def scan_split(split, where: str) -> tuple[int, int]:
    """(rows, rows with a cutout) of a split; refuses repeated task ids (they would be scored and
    counted twice downstream) before any stamp is decoded."""
    from darkhaloscope.stamps import dataset

    cols = ["task_id", *(["cutout_ok"] if "cutout_ok" in split.schema.names else [])]
    ids, n_rows, n_cutout = [], 0, 0
    for batch in split.iter_batches(cols, batch_size=65536):
        ids.append(dataset.as_id_values(batch.column("task_id"), where))
        n_rows += batch.num_rows
        n_cutout += int(dataset.cutout_usable(batch).sum())
    if ids:
        dataset.check_unique_ids(np.concatenate(ids), where, dataset.STALE_SHARD_HINT)
    return n_rows, n_cutout


def _non_finite_meta(table: pa.Table, meta_cols) -> int:
    n = 0
    for c in meta_cols:
        v = np.asarray(table.column(c).to_numpy(zero_copy_only=False), np.float64)
        n += int((~np.isfinite(v)).sum())
    return n


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import json

    from tqdm import tqdm

    from darkhaloscope.io import check_writable, refuse_overwrite
    from darkhaloscope.learning.stream import open_split
    from darkhaloscope.stamps.dataset import splits_of

    if args.batch_size < 1:
        raise DHSError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.max_skip_frac <= 1.0:
        raise DHSError(f"--max_skip_frac must be in [0, 1], got {args.max_skip_frac}")
    if args.num_workers < 0:
        raise DHSError(f"--num_workers must be >= 0, got {args.num_workers}")
    refuse_overwrite(args.out, {"--data": args.data, "--ckpt": args.ckpt}, "--out")
    check_writable(args.out, "--out")
    scorer = load_scorer(args.ckpt, args.device, args.tta, args.use_bf16)
    names = splits_of(args.data) if args.split == "all" else [args.split]
    if not names:
        raise DHSError(f"{args.data} has no region_split=<split> partitions")
    splits = [open_split(args.data, name) for name in names]
    what = f"split '{args.split}'" if args.split != "all" else f"splits {', '.join(names)}"
    passthrough = [c for c in PASSTHROUGH_COLUMNS if c in splits[0].schema.names]
    if args.only_controls:
        for split in splits:
            split.require(["is_control"], f"--only_controls: {split.where}")
    n_total = n_cutout = 0
    for split in splits:
        split.require(read_columns_for(split, scorer, passthrough))
        rows, cut = scan_split(split, split.where)
        n_total, n_cutout = n_total + rows, n_cutout + cut
    if n_total == 0:
        raise DHSError(f"{what} of {args.data} has no rows (empty split)")
    if n_cutout == 0:
        raise DHSError(f"{what} of {args.data}: all {n_total} rows are declared cutout failures (cutout_ok != 1)")
    max_skipped = args.max_skip_frac * n_cutout
    meta_cols = scorer.meta_cols
    log.info("scoring %d rows of %s %s (%d declared cutout failures not scored) with %s (%s, meta %s) on %s, "
             "%d view(s)%s", n_cutout, args.data, what, n_total - n_cutout, args.ckpt,
             scorer.ckpt["model_kwargs"].get("arch"), ",".join(meta_cols) or "none", scorer.device, scorer.tta,
             " with bf16 autocast" if args.use_bf16 else "")
    n_rows = n_skipped = n_scored = n_no_cutout = n_meta_nan = n_not_control = 0
    metadata = {SCORING_METADATA_KEY: json.dumps({**scorer.metadata(), "ckpt": str(args.ckpt),
                                                  "ckpt_sha256": file_sha256(args.ckpt)}).encode()}
    with atomic_output(args.out) as tmp:
        writer = None
        bar = tqdm(total=n_total, unit="stamp", desc="dhs infer", leave=False)
        try:
            for split in splits:
                for item in score_batches(split, scorer, passthrough, args.batch_size, args.num_workers,
                                          args.only_controls):
                    n_rows += item["n_rows"]
                    n_not_control += item["n_not_control"]
                    n_skipped += item["n_skipped"]
                    n_no_cutout += item["n_no_cutout"]
                    bar.update(item["n_rows"])
                    if n_skipped > max_skipped:
                        raise DHSError(f"{n_skipped} stamps of {what} (of the first {n_rows} rows) are not scorable "
                                       f"(did not decode, not 3x64x64 float or not finite): above --max_skip_frac "
                                       f"{args.max_skip_frac} of the {n_cutout} rows with a cutout")
                    table = item["table"]
                    if table is None:
                        continue
                    n_meta_nan += _non_finite_meta(table, meta_cols) if meta_cols else 0
                    if writer is None:
                        table = table.replace_schema_metadata(metadata)
                        writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                    elif table.schema.remove_metadata() != writer.schema.remove_metadata():
                        try:
                            table = table.cast(writer.schema)
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                            raise DHSError(f"files of {what} of {args.data} disagree on column types "
                                           f"({table.schema} vs {writer.schema})") from None
                    writer.write_table(table.replace_schema_metadata(metadata))
                    n_scored += table.num_rows
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if writer is None:
            raise DHSError(f"no row of {what} could be scored ({n_skipped} bad stamps"
                           + (f", {n_not_control} rows not controls under --only_controls)" if args.only_controls else ")"))
    if n_meta_nan:
        log.warning("%d meta value(s) (%s) were NaN/inf and were replaced by the training mean", n_meta_nan,
                    ",".join(meta_cols))
    log.info("scored %d rows; %d declared cutout failures (cutout_ok != 1) not scored; skipped %d unscorable "
             "stamps (did not decode / not 3x64x64 / not finite, %.3g%% of %d rows with a cutout); wrote %s", n_scored,
             n_no_cutout, n_skipped, 100.0 * n_skipped / max(n_cutout, 1), n_cutout, args.out)
    if args.only_controls:
        log.info("--only_controls: %d rows that are not controls were not scored", n_not_control)
    return 0
