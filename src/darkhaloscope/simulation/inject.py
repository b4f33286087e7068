"""Phase 4c (``dhs inject``): render one shard of the manifest to Hive-partitioned parquet.

Shard assignment: rows are grouped in blocks of ``--batch_size`` consecutive task ids
(block = task_id // batch_size) and block k belongs to shard k % n_shards. A block is always rendered
as one batch, so a task's stamp does not depend on the number of shards (nor on which other tasks share
its shard): the same manifest, variant and batch size give byte-identical stamps for any n_shards.

Output: exactly one file per split, ``<out_dir>/region_split=<split>/part-<shard:05d>.parquet`` (zero
rows but the full schema when a split has no rows in the shard), zstd, row groups of ``ROW_GROUP`` rows,
written while rendering (memory stays flat) to temporary names that are renamed only at the end. Rows
are in seeded random order: blocks in a random order per shard, rows permuted within each block. The
``region_split`` value lives in the directory name (Hive partitioning), not inside the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output, check_writable_dir
from darkhaloscope.simulation.manifest import first_extra_test_id, read_manifest
from darkhaloscope.simulation.phase4c import (batch_table, check_args, check_stale_shards, clump_slots, layout_metadata,
                                              output_path, output_schema, shard_mask)
from darkhaloscope.simulation.real_hosts import is_host_manifest, run_inject
from darkhaloscope.simulation.scene import column_arrays, render_scenes
from darkhaloscope.stamps.contract import SPLITS

ROW_GROUP = 256
# Dictionary-encode only the repetitive strings: trying it on the stamp blobs costs time for nothing.
DICTIONARY_COLUMNS = ["brickname", "lens_model", "control_kind", "confuser_kind", "psf_model"]
# zstd level of the stamp blobs (the other columns keep the default level): noise-dominated float32 that
# the default level shrinks by only ~7% at ~90 us per row; level -1 writes them in about half the time
# and files ~7.5% larger (measured on 512 realistic rows, docs/benchmarks.md).
STAMP_ZSTD_LEVEL = -1


def render_shard(manifest: pa.Table, out_dir, psf_model: str, beta: float, shard: int, n_shards: int,
                 batch_size: int = 256, write_arc: bool = False, progress: bool = True) -> dict[str, int]:
    """Render the manifest rows of one shard and write one parquet file per split; returns row counts."""
    check_args(psf_model, beta, shard, n_shards, batch_size)
    check_stale_shards(out_dir, shard, n_shards, batch_size)
    return _render_checked(manifest, out_dir, psf_model, beta, shard, n_shards, batch_size, write_arc, progress)


def _render_checked(manifest: pa.Table, out_dir, psf_model: str, beta: float, shard: int, n_shards: int,
                    batch_size: int, write_arc: bool, progress: bool = True) -> dict[str, int]:
    """``render_shard`` once its arguments and ``out_dir`` have been checked."""
    _check_splits(manifest)
    task_id = manifest.column("task_id").to_numpy()
    if len(np.unique(task_id)) != len(task_id):
        raise DHSError("manifest has repeated task_id values")
    idx = np.nonzero(shard_mask(task_id, shard, n_shards, batch_size))[0]
    blocks = task_id[idx] // batch_size
    order_rng = np.random.default_rng([int(shard), 0x4C])
    block_ids = np.unique(blocks)
    block_ids = block_ids[order_rng.permutation(len(block_ids))]
    schema = output_schema(write_arc, clump_slots(manifest.schema)).with_metadata(layout_metadata(n_shards, batch_size))
    counts = {s: 0 for s in SPLITS}
    with contextlib.ExitStack() as stack:
        writers, buffers = {}, {s: [] for s in SPLITS}
        for split in SPLITS:
            tmp = stack.enter_context(atomic_output(output_path(out_dir, split, shard)))
            writers[split] = stack.enter_context(pq.ParquetWriter(
                tmp, schema, compression="zstd", compression_level={"stamp_npz": STAMP_ZSTD_LEVEL},
                use_dictionary=DICTIONARY_COLUMNS))

        def flush(split, final=False):
            buf = buffers[split]
            while buf and (final or sum(t.num_rows for t in buf) >= ROW_GROUP):
                table = pa.concat_tables(buf)
                take = table.num_rows if final else ROW_GROUP
                writers[split].write_table(table.slice(0, take), row_group_size=ROW_GROUP)
                rest = table.slice(take)
                buffers[split] = buf = [rest] if rest.num_rows else []

        for block in tqdm(block_ids, desc=f"inject shard {shard}", unit="batch", disable=not progress,
                          file=sys.stderr):
            sel = idx[blocks == block]
            sel = sel[np.argsort(task_id[sel])]
            rows = column_arrays(manifest.take(pa.array(sel)))
            batch = render_scenes(rows, psf_model, beta)
            # Rows in seeded random order, grouped by split (stable, so each split keeps that order):
            # reordering the arrays before building the table leaves zero-copy slices per split.
            perm = np.random.default_rng([int(block), 0x52]).permutation(len(sel))
            splits = np.asarray(rows["region_split"]).astype(str)
            order = perm[np.argsort(splits[perm], kind="stable")]
            rows = {k: v[order] for k, v in rows.items()}
            # (the noiseless arcs are reordered only when they are written: a 12 MB copy per batch otherwise)
            batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[order]
                                                  for f in dataclasses.fields(batch) if write_arc or f.name != "arc"})
            table, splits = batch_table(rows, batch, psf_model, beta, write_arc)
            for split in SPLITS:
                keep = np.nonzero(splits == split)[0]
                if len(keep):
                    buffers[split].append(table.slice(keep[0], len(keep)))
                    counts[split] += len(keep)
                    flush(split)
        for split in SPLITS:
            flush(split, final=True)
        # ExitStack closes the writers, then renames the temporary files (in reverse order of entry).
    return counts


def _check_splits(manifest: pa.Table) -> None:
    values = set(manifest.column("region_split").to_pylist())
    unknown = values - set(SPLITS)
    if unknown:
        raise DHSError(f"manifest region_split has unknown value(s) {sorted(map(str, unknown))}; expected {SPLITS}")


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True, help="Phase 4a manifest parquet")
    parser.add_argument("--out_dir", "--output-dir", "--out-dir", dest="out_dir", required=True,
                        help="data directory; writes region_split=<split>/part-<shard>.parquet")
    parser.add_argument("--variant", default=None, help="variant name (for the log; the PSF flags decide)")
    parser.add_argument("--psf-model", "--psf_model", dest="psf_model", default="moffat",
                        help="PSF model of the injected arc: gaussian or moffat")
    parser.add_argument("--moffat-beta", "--moffat_beta", dest="moffat_beta", type=float, default=3.5)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--n_shards", "--n-shards", dest="n_shards", type=int, default=1)
    parser.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=256,
                        help="stamps rendered together; also the block size of the shard assignment")
    parser.add_argument("--write_arc", "--write-arc", dest="write_arc", action="store_true",
                        help="also store the noiseless arc of each positive as arc_npz")
    parser.add_argument("--hosts", default=None,
                        help="real host stamps (dhs cutouts) of a dhs manifest --hosts manifest: arcs are added to them")
    parser.add_argument("--skip_extra_test_controls", "--skip-extra-test-controls", dest="skip_extra_test_controls",
                        action="store_true",
                        help="render none of the manifest's test-only controls (dhs manifest --extra_test_controls): "
                             "for a variant whose test split no model is scored on")


def run(args) -> int:
    if args.hosts is not None:
        return run_inject(args)  # checks the arguments before it writes (real_hosts.render_host_shard)
    check_args(args.psf_model, args.moffat_beta, args.shard, args.n_shards, args.batch_size)
    if Path(args.manifest).is_file() and is_host_manifest(args.manifest):
        raise DHSError(f"manifest {args.manifest} was written by dhs manifest --hosts: add --hosts DIR (the host "
                       "dataset it was drawn from)")
    check_stale_shards(args.out_dir, args.shard, args.n_shards, args.batch_size)
    first_extra = first_extra_test_id(args.manifest) if args.skip_extra_test_controls else None

    def rows(ids):
        mask = shard_mask(ids, args.shard, args.n_shards, args.batch_size)
        return mask if first_extra is None else mask & (ids < first_extra)

    manifest = read_manifest(args.manifest, rows)
    check_writable_dir(args.out_dir, "--out_dir")  # after the manifest checks: a bad manifest creates nothing
    counts = _render_checked(manifest, args.out_dir, args.psf_model, args.moffat_beta, args.shard, args.n_shards,
                             args.batch_size, args.write_arc)
    print(f"inject {args.variant or ''} shard {args.shard}/{args.n_shards} ({args.psf_model}"
          f"{', beta ' + str(args.moffat_beta) if args.psf_model == 'moffat' else ''}): "
          + ", ".join(f"{s} {n}" for s, n in counts.items()) + f" rows -> {args.out_dir}")
    return 0
