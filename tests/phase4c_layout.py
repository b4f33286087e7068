"""Rewrite a ``dhs inject`` directory into the layout of the original Spark pipeline's stage 4c.

The facts of that layout (from the stage-4c output schema of ``spark_phase4_pipeline.py``, issue 9):
Hive partitions ``region_split=<split>/`` holding ``part-<k:05d>-<uuid>.c000.gz.parquet`` files (gzip),
Spark's ``_SUCCESS`` marker and hidden ``.crc`` checksums; ``task_id`` a string such as
``v4sm_0001234_r0``; ``region_id``, ``is_control``, ``cutout_ok`` int32; ``region_split`` stored as a
column too; ``theta_e_arcsec`` 0.0 for controls; ``arc_snr`` and ``psf_fwhm_used_*`` null for controls;
``stamp_npz`` written by ``np.savez_compressed`` (deflate members); failed cutouts kept as rows with
``cutout_ok = 0`` and a null stamp or a stamp full of NaN; many extra columns.

The usable rows keep their values, their files' order and their row groups, so every reader must give
the same results on both layouts; the failed-cutout rows go into one more file per split, sorted last.
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ID_PREFIX = "v4sm"


def string_id(task_id: int, prefix: str = ID_PREFIX) -> str:
    return f"{prefix}_{int(task_id):07d}_r0"


def savez_compressed(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, image_g=image[0], image_r=image[1], image_z=image[2])
    return buf.getvalue()


def _restamp(blobs: pa.Array) -> pa.Array:
    """The same pixels, re-encoded the way stage 4c did (np.savez_compressed)."""
    out = []
    for blob in blobs.to_pylist():
        with np.load(io.BytesIO(blob)) as npz:
            out.append(savez_compressed(np.stack([npz[k] for k in ("image_g", "image_r", "image_z")])))
    return pa.array(out, pa.binary())


def _extra_columns(n: int, is_control: np.ndarray, rng: np.random.Generator) -> dict:
    """The stage-4c columns that no reader of this project uses, with plausible types and values."""
    ctrl = is_control == 1

    def nullable(values):
        return pa.array(np.asarray(values, np.float64), pa.float64(), mask=ctrl)

    return {
        "experiment_id": pa.array(["phase4c_v4_sota"] * n), "selection_set_id": pa.array(["lrg_v3"] * n),
        "ranking_mode": pa.array(["density"] * n), "selection_strategy": pa.array(["stratified"] * n),
        "stamp_size": pa.array(np.full(n, 64, np.int32)), "bandset": pa.array(["grz"] * n),
        "config_id": pa.array([f"cfg_{i % 7}" for i in range(n)]),
        "src_dmag": nullable(rng.uniform(1, 3, n)), "src_reff_arcsec": nullable(rng.uniform(0.1, 0.5, n)),
        "src_e": nullable(rng.uniform(0, 0.5, n)), "shear": nullable(rng.uniform(0, 0.1, n)),
        "replicate": pa.array(np.zeros(n, np.int32)),
        "task_seed64": pa.array(rng.integers(0, 2**62, n, dtype=np.int64)),
        "src_x_arcsec": nullable(rng.normal(0, 0.2, n)), "src_y_arcsec": nullable(rng.normal(0, 0.2, n)),
        "src_phi_rad": nullable(rng.uniform(0, np.pi, n)), "shear_phi_rad": nullable(rng.uniform(0, np.pi, n)),
        "src_gr": nullable(rng.normal(0.5, 0.2, n)), "src_rz": nullable(rng.normal(0.3, 0.2, n)),
        "psf_bin": pa.array(rng.integers(0, 4, n).astype(np.int32)),
        "depth_bin": pa.array(rng.integers(0, 4, n).astype(np.int32)),
        "ab_zp_nmgy": pa.array(np.full(n, 22.5)), "pipeline_version": pa.array(["4c-2024.11"] * n),
        "ebv": pa.array(rng.uniform(0.01, 0.1, n)), "bad_pixel_frac": pa.array(rng.uniform(0, 0.01, n)),
        "wise_brightmask_frac": pa.array(np.zeros(n)), "metrics_ok": pa.array(np.ones(n, np.int32)),
        "metrics_only": pa.array(np.zeros(n, np.int32)),
        "lens_e": nullable(rng.uniform(0, 0.4, n)), "lens_phi_rad": nullable(rng.uniform(0, np.pi, n)),
        "tangential_stretch": nullable(rng.uniform(1, 5, n)), "radial_stretch": nullable(rng.uniform(0.5, 1.5, n)),
        "expected_arc_radius": nullable(rng.uniform(0.5, 2.5, n)),
        "physics_valid": pa.array(np.ones(n, np.int32)),
        "physics_warnings": pa.array([None if c else "" for c in ctrl], pa.string()),
    }


def convert(table: pa.Table, split: str, rng: np.random.Generator, prefix: str = ID_PREFIX) -> pa.Table:
    """One simulator table (no region_split column) -> the stage-4c schema."""
    n = table.num_rows
    is_control = np.asarray(table.column("is_control").to_numpy(zero_copy_only=False), np.int32)
    ctrl = is_control == 1
    theta = np.asarray(table.column("theta_e_arcsec").to_numpy(zero_copy_only=False), np.float64)
    cols = {
        "task_id": pa.array([string_id(t, prefix) for t in table.column("task_id").to_pylist()], pa.string()),
        "region_split": pa.array([split] * n, pa.string()),
        "region_id": pa.array(np.asarray(table.column("region_id").to_numpy(), np.int32)),
        "is_control": pa.array(is_control),
        "cutout_ok": pa.array(np.ones(n, np.int32)),
        "stamp_npz": _restamp(table.column("stamp_npz").combine_chunks()),
        "theta_e_arcsec": pa.array(np.where(ctrl, 0.0, theta)),  # non-null: 0.0 for controls
        "lens_model": pa.array(np.where(ctrl, "CONTROL", "SIE").tolist(), pa.string()),
    }
    for name in table.column_names:
        if name not in cols and name not in ("arc_npz",):
            cols[name] = table.column(name)
    for name in ("arc_snr", "psf_fwhm_used_g", "psf_fwhm_used_r", "psf_fwhm_used_z"):
        if name not in cols:
            continue
        col = cols[name]
        cols[name] = pc.if_else(pa.array(ctrl), pa.nulls(n, col.type), col)  # null for controls
    cols.update(_extra_columns(n, is_control, rng))
    return pa.table(cols)


def failed_rows(template: pa.Table, split: str, n: int, rng: np.random.Generator, first: int,
                prefix: str = ID_PREFIX) -> pa.Table:
    """``n`` declared cutout failures shaped like ``template``'s rows: cutout_ok 0 and, alternately, a
    null stamp_npz or a stamp full of NaN."""
    rows = template.slice(0, n)
    nan_stamp = savez_compressed(np.full((3, 64, 64), np.nan, np.float32))
    blobs = [None if i % 2 == 0 else nan_stamp for i in range(n)]
    rows = rows.set_column(rows.schema.get_field_index("stamp_npz"), "stamp_npz", pa.array(blobs, pa.binary()))
    rows = rows.set_column(rows.schema.get_field_index("cutout_ok"), "cutout_ok", pa.array(np.zeros(n, np.int32)))
    ids = [f"{prefix}_{first + i:07d}_r0" for i in range(n)]
    return rows.set_column(0, "task_id", pa.array(ids, pa.string()))


def _part_name(k: int) -> str:
    return f"part-{k:05d}-{uuid.uuid4()}.c000.gz.parquet"


def write_phase4c_layout(src: str | Path, dst: str | Path, n_failed: int = 3, prefix: str = ID_PREFIX,
                         seed: int = 0) -> Path:
    """Rewrite the simulator's ``src`` directory into the stage-4c layout at ``dst``; returns ``dst``."""
    src, dst = Path(src), Path(dst)
    rng = np.random.default_rng(seed)
    first_failed = 9_000_000
    for split_dir in sorted(src.glob("region_split=*")):
        split = split_dir.name.split("=", 1)[1]
        out = dst / split_dir.name
        out.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in split_dir.glob("*.parquet") if not p.name.startswith((".", "_")))
        template = None
        for k, path in enumerate(files):
            pf = pq.ParquetFile(path)
            target = out / _part_name(k)
            writer = None
            for rg in range(pf.num_row_groups):
                table = convert(pf.read_row_group(rg), split, rng, prefix)
                if writer is None:
                    writer = pq.ParquetWriter(target, table.schema, compression="gzip")
                writer.write_table(table, row_group_size=max(table.num_rows, 1))  # row groups kept as they were
                template = table if template is None or template.num_rows < n_failed else template
            if writer is None:  # an empty file keeps the schema
                table = convert(pf.schema_arrow.empty_table(), split, rng, prefix)
                writer = pq.ParquetWriter(target, table.schema, compression="gzip")
                writer.write_table(table)
            writer.close()
            (out / f".{target.name}.crc").write_bytes(b"crc\0")  # Spark's hidden checksum files
        if n_failed and template is not None and template.num_rows >= n_failed:
            failed = failed_rows(template, split, n_failed, rng, first_failed, prefix)
            first_failed += n_failed
            pq.write_table(failed, out / _part_name(len(files)), compression="gzip")
    (dst / "_SUCCESS").write_bytes(b"")
    return dst
