"""The Phase 4c table that ``dhs inject`` writes, simulated or on real hosts (``real_hosts``): its schema, the
shard layout (which tasks a shard renders, where its files go, which layout a file belongs to) and the one builder
of its rows (``batch_table``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.simulation.draws import CLUMP_COLUMNS
from darkhaloscope.simulation.physics.psf import PSF_MODELS
from darkhaloscope.simulation.scene import SceneBatch
from darkhaloscope.stamps.contract import BANDS, CONDITION_COLUMNS, encode_stamp


_F = pa.float64()


TRUTH_COLUMNS = ("lens_q", "lens_phi", "lens_x0", "lens_y0", "shear_g1", "shear_g2", "src_x", "src_y",
                 "src_reff", "src_n", "src_q", "src_phi", "src_mag_r") + tuple(f"src_flux_{b}" for b in BANDS)


PASS_COLUMNS = CONDITION_COLUMNS + ("host_mag_r", "host_reff")


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


def batch_table(rows: dict, batch: SceneBatch, psf_model: str, beta: float, write_arc: bool,
                extra: dict[str, pa.Array] | None = None, nan_as_null: bool = False) -> tuple[pa.Table, np.ndarray]:
    """Rendered batch -> (output table, region_split of each row). ``rows``: the manifest columns
    (``scene.column_arrays``); the simulator's, or a host manifest's (``real_hosts``: ``brickname`` and
    ``region_id`` may be null, no ``confuser_kind`` (null), PASS_COLUMNS that it lacks are null, and with
    ``nan_as_null`` a NaN among them too). ``extra``: more columns, appended after the schema's."""
    n = len(rows["task_id"])
    positive = np.asarray(rows["is_control"]) == 0
    region_id = rows["region_id"]
    cols = {
        "task_id": pa.array(rows["task_id"], pa.int64()),
        "ra": pa.array(rows["ra"], _F), "dec": pa.array(rows["dec"], _F),
        "brickname": pa.array([None if b is None else str(b) for b in rows["brickname"]], pa.string()),
        "region_id": (pa.array(region_id, pa.int64()) if region_id.dtype.kind in "iu" else
                      pa.array([None if r is None else int(r) for r in region_id], pa.int64())),
        "is_control": pa.array(np.asarray(rows["is_control"], np.int32)),
        "cutout_ok": pa.array(np.ones(n, np.int32)),
        "stamp_npz": pa.array([encode_stamp(im) for im in batch.image], pa.binary()),
    }
    for c in PASS_COLUMNS:
        if c not in rows:
            cols[c] = pa.nulls(n, _F)
        else:
            values = np.asarray(rows[c], np.float64)
            cols[c] = pa.array(values, _F, mask=~np.isfinite(values) if nan_as_null else None)
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
    cols["confuser_kind"] = (pa.array(np.asarray(rows["confuser_kind"]).astype(str).tolist(), pa.string())
                             if "confuser_kind" in rows else pa.nulls(n, pa.string()))  # unknown on a real host
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
    schema = output_schema(write_arc, n_clumps)
    for name, column in (extra or {}).items():
        cols[name] = column
        schema = schema.append(pa.field(name, column.type))
    return pa.table(cols, schema=schema), np.asarray(rows["region_split"]).astype(str)


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
