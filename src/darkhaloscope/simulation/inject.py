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
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output
from darkhaloscope.simulation.draws import CLUMP_COLUMNS
from darkhaloscope.simulation.manifest import first_extra_test_id, read_manifest
from darkhaloscope.simulation.physics.psf import PSF_MODELS
from darkhaloscope.simulation.scene import column_arrays, render_scenes
from darkhaloscope.stamps.contract import BANDS, SPLITS, encode_stamp

ROW_GROUP = 256
# Dictionary-encode only the repetitive strings: trying it on the stamp blobs costs time for nothing.
DICTIONARY_COLUMNS = ["brickname", "lens_model", "control_kind", "confuser_kind", "psf_model"]
# zstd level of the stamp blobs (the other columns keep the default level): noise-dominated float32 that
# the default level shrinks by only ~7% at ~90 us per row; level -1 writes them in about half the time
# and files ~7.5% larger (measured on 512 realistic rows, docs/benchmarks.md).
STAMP_ZSTD_LEVEL = -1
_F = pa.float64()
TRUTH_COLUMNS = ("lens_q", "lens_phi", "lens_x0", "lens_y0", "shear_g1", "shear_g2", "src_x", "src_y",
                 "src_reff", "src_n", "src_q", "src_phi", "src_mag_r") + tuple(f"src_flux_{b}" for b in BANDS)
PASS_COLUMNS = (tuple(f"psfsize_{b}" for b in BANDS) + tuple(f"psfdepth_{b}" for b in BANDS)
                + ("host_mag_r", "host_reff"))


def output_schema(write_arc: bool = False, n_clumps: int = 0) -> pa.Schema:
    """The Phase 4c schema; with ``n_clumps`` K > 0 (a manifest with source clumps) also the
    ``src_clump_*`` truth columns, fixed-size lists of K float64 (null for controls)."""
    fields = [
        ("task_id", pa.int64()), ("ra", _F), ("dec", _F), ("brickname", pa.string()), ("region_id", pa.int64()),
        ("is_control", pa.int32()), ("cutout_ok", pa.int32()), ("stamp_npz", pa.binary()),
        *[(c, _F) for c in PASS_COLUMNS],
        *[(f"sky_ivar_{b}", _F) for b in BANDS],
        *[(f"psf_fwhm_used_{b}", _F) for b in BANDS],
        ("theta_e_arcsec", _F), ("arc_snr", _F), ("arc_snr_peak", _F), ("magnification", _F),
        ("lens_model", pa.string()), ("control_kind", pa.string()), ("confuser_kind", pa.string()),
        ("psf_model", pa.string()), ("moffat_beta", _F),
        *[(c, _F) for c in TRUTH_COLUMNS],
        *[(c, pa.list_(_F, n_clumps)) for c in (CLUMP_COLUMNS if n_clumps else ())],
    ]
    if write_arc:
        fields.append(("arc_npz", pa.binary()))
    return pa.schema(fields)


def shard_mask(task_id: np.ndarray, shard: int, n_shards: int, batch_size: int) -> np.ndarray:
    return (np.asarray(task_id, np.int64) // batch_size) % n_shards == shard


def check_args(psf_model: str, beta: float, shard: int, n_shards: int, batch_size: int) -> None:
    if psf_model not in PSF_MODELS:
        raise DHSError(f"unknown --psf-model '{psf_model}' (choose from {', '.join(PSF_MODELS)})")
    if not np.isfinite(beta) or beta <= 1.0:
        raise DHSError(f"--moffat-beta must be > 1 (a Moffat with beta <= 1 has infinite flux), got {beta}")
    if n_shards < 1:
        raise DHSError(f"--n_shards must be >= 1, got {n_shards}")
    if not 0 <= shard < n_shards:
        raise DHSError(f"--shard {shard} is out of range for --n_shards {n_shards} (0..{n_shards - 1})")
    if batch_size < 1:
        raise DHSError(f"--batch_size must be >= 1, got {batch_size}")


def _nullable(values, positive):
    return pa.array(np.asarray(values, np.float64), _F, mask=~positive)


def batch_table(rows: dict, batch, psf_model: str, beta: float, write_arc: bool) -> tuple[pa.Table, np.ndarray]:
    """Rendered batch -> (output table, region_split of each row)."""
    n = len(rows["task_id"])
    positive = np.asarray(rows["is_control"]) == 0
    cols = {
        "task_id": pa.array(rows["task_id"], pa.int64()),
        "ra": pa.array(rows["ra"], _F), "dec": pa.array(rows["dec"], _F),
        "brickname": pa.array(rows["brickname"].astype(str), pa.string()),
        "region_id": pa.array(rows["region_id"], pa.int64()),
        "is_control": pa.array(np.asarray(rows["is_control"], np.int32)),
        "cutout_ok": pa.array(np.ones(n, np.int32)),
        "stamp_npz": pa.array([encode_stamp(im) for im in batch.image], pa.binary()),
    }
    for c in PASS_COLUMNS:
        cols[c] = pa.array(rows[c], _F)
    for i, b in enumerate(BANDS):
        cols[f"sky_ivar_{b}"] = pa.array(1.0 / batch.sky_sigma[:, i] ** 2, _F)
    for i, b in enumerate(BANDS):
        cols[f"psf_fwhm_used_{b}"] = _nullable(batch.arc_fwhm[:, i], positive)
    cols["theta_e_arcsec"] = _nullable(rows["theta_e_arcsec"], positive)
    cols["arc_snr"] = _nullable(batch.arc_snr, positive)
    cols["arc_snr_peak"] = _nullable(batch.arc_snr_peak, positive)
    cols["magnification"] = _nullable(batch.magnification, positive)
    cols["lens_model"] = pa.array(np.where(positive, "SIE+SHEAR", "none").tolist(), pa.string())
    cols["control_kind"] = pa.array([None if p else "unpaired" for p in positive], pa.string())
    cols["confuser_kind"] = pa.array(np.asarray(rows["confuser_kind"]).astype(str).tolist(), pa.string())
    cols["psf_model"] = pa.array([psf_model] * n, pa.string())
    cols["moffat_beta"] = pa.array(np.full(n, beta), _F, mask=np.full(n, psf_model != "moffat"))
    for c in TRUTH_COLUMNS:
        cols[c] = _nullable(rows[c], positive)
    n_clumps = rows[CLUMP_COLUMNS[0]].shape[1] if CLUMP_COLUMNS[0] in rows else 0
    for c in CLUMP_COLUMNS if n_clumps else ():
        cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(rows[c], np.float64).ravel(), _F), n_clumps,
                                                    mask=pa.array(~positive))
    if write_arc:
        cols["arc_npz"] = pa.array([encode_stamp(a) if p else None for a, p in zip(batch.arc, positive)],
                                   pa.binary())
    return pa.table(cols, schema=output_schema(write_arc, n_clumps)), np.asarray(rows["region_split"]).astype(str)


def clump_slots(schema: pa.Schema) -> int:
    """K of a manifest's ``src_clump_*`` columns (0 when it has none)."""
    name = CLUMP_COLUMNS[0]
    return schema.field(name).type.list_size if name in schema.names else 0


def output_path(out_dir, split: str, shard: int) -> Path:
    return Path(out_dir) / f"region_split={split}" / f"part-{shard:05d}.parquet"


LAYOUT_KEY = b"dhs_inject_layout"
_PART = re.compile(r"^part-(\d{5})\.parquet$")


def layout_metadata(n_shards: int, batch_size: int) -> dict[bytes, bytes]:
    """Parquet key-value metadata naming the shard layout a file belongs to."""
    return {LAYOUT_KEY: json.dumps({"n_shards": int(n_shards), "batch_size": int(batch_size)}).encode()}


def check_stale_shards(out_dir, shard: int, n_shards: int, batch_size: int) -> None:
    """Refuse to write into ``out_dir`` when it holds data files of another shard layout (another
    --n_shards or --batch_size, or not written by dhs inject): beside the new shards they would repeat
    task ids, and every reader would count those rows twice."""
    out_dir = Path(out_dir)
    stale = []
    for path in sorted(out_dir.glob("region_split=*/*.parquet")):
        if path.name.startswith((".", "_")):
            continue
        m = _PART.match(path.name)
        if m is None:
            stale.append((path, "not written by dhs inject"))
            continue
        if int(m.group(1)) == shard:
            continue  # this shard's own file: replaced by this run
        if int(m.group(1)) >= n_shards:
            stale.append((path, f"shard {int(m.group(1))} of a layout with more than {n_shards} shards"))
            continue
        try:
            meta = pq.read_schema(path).metadata or {}
            layout = json.loads(meta[LAYOUT_KEY]) if LAYOUT_KEY in meta else None
        except Exception:
            stale.append((path, "unreadable"))
            continue
        if layout is not None and (layout["n_shards"], layout["batch_size"]) != (n_shards, batch_size):
            stale.append((path, f"written with --n_shards {layout['n_shards']} --batch_size {layout['batch_size']}"))
    if stale:
        path, why = stale[0]
        raise DHSError(f"--out_dir {out_dir} holds {len(stale)} file(s) of another shard layout (e.g. {path}: {why}); "
                       f"this run is --n_shards {n_shards} --batch_size {batch_size}. Their rows would repeat task "
                       "ids: remove them (or the directory) or write to another --out_dir")


def render_shard(manifest: pa.Table, out_dir, psf_model: str, beta: float, shard: int, n_shards: int,
                 batch_size: int = 256, write_arc: bool = False, progress: bool = True) -> dict[str, int]:
    """Render the manifest rows of one shard and write one parquet file per split; returns row counts."""
    check_args(psf_model, beta, shard, n_shards, batch_size)
    check_stale_shards(out_dir, shard, n_shards, batch_size)
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
        from darkhaloscope.simulation.real_hosts import run_inject

        check_args(args.psf_model, args.moffat_beta, args.shard, args.n_shards, args.batch_size)
        return run_inject(args)
    check_args(args.psf_model, args.moffat_beta, args.shard, args.n_shards, args.batch_size)
    from darkhaloscope.io import check_writable_dir

    check_stale_shards(args.out_dir, args.shard, args.n_shards, args.batch_size)
    first_extra = first_extra_test_id(args.manifest) if args.skip_extra_test_controls else None

    def rows(ids):
        mask = shard_mask(ids, args.shard, args.n_shards, args.batch_size)
        return mask if first_extra is None else mask & (ids < first_extra)

    manifest = read_manifest(args.manifest, rows)
    check_writable_dir(args.out_dir, "--out_dir")  # after the manifest checks: a bad manifest creates nothing
    counts = render_shard(manifest, args.out_dir, args.psf_model, args.moffat_beta, args.shard, args.n_shards,
                          args.batch_size, args.write_arc)
    print(f"inject {args.variant or ''} shard {args.shard}/{args.n_shards} ({args.psf_model}"
          f"{', beta ' + str(args.moffat_beta) if args.psf_model == 'moffat' else ''}): "
          + ", ".join(f"{s} {n}" for s, n in counts.items()) + f" rows -> {args.out_dir}")
    return 0
