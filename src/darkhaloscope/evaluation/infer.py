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
``task_id`` is copied with its own Arrow type (string ids stay strings).
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output

log = logging.getLogger("dhs.infer")

# Copied from the data into the score file (those present), in this order, after task_id.
PASSTHROUGH_COLUMNS = ("ra", "dec", "brickname", "region_split", "is_control", "theta_e_arcsec", "psf_fwhm_used_r",
                       "psfsize_r", "psfdepth_r", "arc_snr", "control_kind", "confuser_kind")


# ----------------------------------------------------------------------------------------------------
# Batches: read -> decode/normalise -> (passthrough columns of the scored rows, images, meta, n_skipped)
# ----------------------------------------------------------------------------------------------------

def _prepare(batch: pa.RecordBatch, passthrough, meta_cols, meta_mean, meta_std, controls_only: bool = False) -> dict:
    from darkhaloscope.learning.stream import decode_batch
    from darkhaloscope.stamps.dataset import control_flags

    n_rows = batch.num_rows
    n_not_control = 0
    if controls_only:  # before decoding: the lenses' stamps are never decoded or scored
        control = control_flags(batch.column("is_control"), "--only_controls") == 1
        n_not_control = int((~control).sum())
        batch = batch.filter(pa.array(control))
    images, meta, ok, cutout = decode_batch(batch, meta_cols, meta_mean, meta_std)
    keep = pa.array(ok)
    table = pa.Table.from_batches([batch.select(["task_id", *passthrough])]).filter(keep)
    return {"table": table, "images": images, "meta": meta, "n_rows": n_rows, "n_not_control": n_not_control,
            "n_skipped": int((cutout & ~ok).sum()), "n_no_cutout": int((~cutout).sum())}


def _prepared_batches_class():
    """The iterable dataset class (built lazily so that importing this module does not import torch)."""
    from torch.utils.data import IterableDataset

    class PreparedBatches(_PreparedBatches, IterableDataset):
        pass

    return PreparedBatches


class _PreparedBatches:
    """Iterable of prepared batches in file order. Worker ``w`` of ``W`` decodes batches ``i % W == w``
    (each worker streams the split; only the decoding, the expensive part, is divided), which a
    DataLoader's round-robin fetching returns in the original order."""

    def __init__(self, split, read_columns, batch_size, passthrough, ckpt, controls_only=False):  # split: dataset.Split
        self.split, self.args = split, (read_columns, batch_size)
        self.passthrough, self.controls_only = passthrough, controls_only
        self.meta = (list(ckpt["meta_cols"]), ckpt["meta_mean"], ckpt["meta_std"])

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, batch in enumerate(self.split.iter_batches(*self.args)):
            if i % n_workers == worker:
                yield _prepare(batch, self.passthrough, *self.meta, self.controls_only)


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


def prepared_batches(split, read_columns, batch_size, passthrough, ckpt, num_workers: int = 0, controls_only=False):
    """``split``: a ``stamps.dataset.Split``."""
    source = _prepared_batches_class()(split, read_columns, batch_size, passthrough, ckpt, controls_only)
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
# CLI
# ----------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Phase 4c dataset root (local directory or s3://...)")
    parser.add_argument("--ckpt", required=True, help="checkpoint (best.pt) from dhs train")
    parser.add_argument("--out", required=True, help="score parquet to write")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
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
    from tqdm import tqdm

    from darkhaloscope.io import check_writable, refuse_overwrite
    from darkhaloscope.learning.checkpoint import load_model
    from darkhaloscope.learning.stream import open_split

    if args.batch_size < 1:
        raise DHSError(f"--batch_size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.max_skip_frac <= 1.0:
        raise DHSError(f"--max_skip_frac must be in [0, 1], got {args.max_skip_frac}")
    if args.num_workers < 0:
        raise DHSError(f"--num_workers must be >= 0, got {args.num_workers}")
    refuse_overwrite(args.out, {"--data": args.data, "--ckpt": args.ckpt}, "--out")
    check_writable(args.out, "--out")
    device = resolve_device(args.device)
    model, ckpt = load_model(args.ckpt, map_location="cpu")
    model.to(device)
    split = open_split(args.data, args.split)
    passthrough = [c for c in PASSTHROUGH_COLUMNS if c in split.schema.names]
    meta_cols = list(ckpt["meta_cols"])
    read_columns = list(dict.fromkeys(["task_id", "stamp_npz", *(["cutout_ok"] if "cutout_ok" in split.schema.names else []),
                                       *passthrough, *meta_cols]))
    if args.only_controls:
        split.require(["is_control"], f"--only_controls: {split.where}")
    split.require(read_columns)
    n_total, n_cutout = scan_split(split, split.where)
    if n_total == 0:
        raise DHSError(f"split '{args.split}' of {args.data} has no rows (empty split)")
    if n_cutout == 0:
        raise DHSError(f"split '{args.split}' of {args.data}: all {n_total} rows are declared cutout failures "
                       "(cutout_ok != 1)")
    max_skipped = args.max_skip_frac * n_cutout
    log.info("scoring %d rows of %s split '%s' (%d declared cutout failures not scored) with %s (%s, meta %s) on %s%s",
             n_cutout, args.data, args.split, n_total - n_cutout, args.ckpt, ckpt["model_kwargs"].get("arch"),
             ",".join(meta_cols) or "none", device, " with bf16 autocast" if args.use_bf16 else "")
    n_rows = n_skipped = n_scored = n_no_cutout = n_meta_nan = n_not_control = 0
    with atomic_output(args.out) as tmp:
        writer = None
        bar = tqdm(total=n_total, unit="stamp", desc="dhs infer", leave=False)
        try:
            for item in prepared_batches(split, read_columns, args.batch_size, passthrough, ckpt, args.num_workers,
                                         args.only_controls):
                n_rows += item["n_rows"]
                n_not_control += item["n_not_control"]
                n_skipped += item["n_skipped"]
                n_no_cutout += item["n_no_cutout"]
                bar.update(item["n_rows"])
                if n_skipped > max_skipped:
                    raise DHSError(f"{n_skipped} stamps of split '{args.split}' (of the first {n_rows} rows) are not "
                                   f"scorable (did not decode, not 3x64x64 float or not finite): above "
                                   f"--max_skip_frac {args.max_skip_frac} of the {n_cutout} rows with a cutout")
                table = item["table"]
                if table.num_rows:
                    n_meta_nan += _non_finite_meta(table, meta_cols) if meta_cols else 0
                    logits = forward_logits(model, item["images"], item["meta"], device, args.use_bf16, args.tta)
                    table = table.append_column("logit", pa.array(logits, pa.float32()))
                    table = table.append_column("score", pa.array(sigmoid32(logits), pa.float32()))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
                    elif table.schema != writer.schema:
                        try:
                            table = table.cast(writer.schema)
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                            raise DHSError(f"files of split '{args.split}' of {args.data} disagree on column types "
                                           f"({table.schema} vs {writer.schema})") from None
                    writer.write_table(table)
                    n_scored += table.num_rows
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if writer is None:
            raise DHSError(f"no row of split '{args.split}' could be scored ({n_skipped} bad stamps"
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
