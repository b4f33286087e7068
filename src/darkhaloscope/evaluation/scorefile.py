"""The one validator of a score parquet (written by ``dhs infer``, or by anyone), used by ``dhs eval``,
``dhs mine`` and the report: the same file is accepted or refused by all of them, with the same message.

A score file has ``is_control`` (integer 0/1; 1 = control), ``logit`` and/or ``score`` (finite), and
usually ``task_id`` (any integer or string type, unique), ``ra``/``dec`` (degrees), ``theta_e_arcsec``
(>= 0; 0.0 or null for controls), ``psf_fwhm_used_r``, ``psfsize_r``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.stamps import dataset


CHECKED_COLUMNS = ("is_control", "logit", "score", "ra", "dec", "theta_e_arcsec")


def open_score_file(path, required=("is_control",), flag: str = "score file") -> pq.ParquetFile:
    """Open ``path`` and check what its footer can tell: readable, the ``required`` columns, a logit or
    a score column, typed columns and at least one row. Streaming readers iterate the returned file."""
    path = Path(path)
    if path.is_dir():
        raise DHSError(f"{flag} {path} is a directory, not a parquet file")
    if not path.exists():
        raise DHSError(f"score file {path} does not exist")
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads ahead whole files
    except Exception as exc:
        raise DHSError(f"score file {path} is not a readable parquet file ({exc.__class__.__name__})") from None
    schema = pf.schema_arrow
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DHSError(f"score file {path} lacks column(s) {','.join(missing)}")
    if "logit" not in schema.names and "score" not in schema.names:
        raise DHSError(f"score file {path} has neither a logit nor a score column")
    if "is_control" in schema.names:
        t = schema.field("is_control").type
        if not (pa.types.is_integer(t) or pa.types.is_boolean(t)):
            raise DHSError(f"score file {path}: is_control has type {t}; expected an integer 0/1 flag")
    for c in ("logit", "score", "ra", "dec", "theta_e_arcsec", "psfsize_r", "psf_fwhm_used_r"):
        if c in schema.names:
            t = schema.field(c).type
            if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
                raise DHSError(f"score file {path}: column {c} has type {t}; expected numbers")
    if "task_id" in schema.names:
        dataset.task_id_kind(schema.field("task_id").type, f"score file {path}")
    if pf.metadata.num_rows == 0:
        raise DHSError(f"score file {path} has no rows (empty split?)")
    return pf


def check_rows(table, path) -> None:
    """Row-level checks of a batch or table of a score file (any subset of its columns)."""
    names = table.schema.names

    def col(c):
        return np.asarray(table.column(c).to_numpy(zero_copy_only=False), np.float64)

    if "is_control" in names:
        c = table.column("is_control")
        v = np.asarray(c.to_numpy(zero_copy_only=False), np.float64)
        if c.null_count or not np.isin(v, (0, 1)).all():
            raise DHSError(f"score file {path}: is_control must be 0 or 1 on every row")
    for key in ("logit", "score"):
        if key in names:
            v = col(key)
            bad = ~np.isfinite(v)
            if bad.any():
                raise DHSError(f"score file {path}: column {key} has {int(bad.sum())} non-finite value(s)")
    if "score" in names:
        v = col("score")
        if ((v < 0) | (v > 1)).any():
            raise DHSError(f"score file {path}: column score has values outside [0, 1]")
    if "dec" in names:
        v = col("dec")
        if (np.abs(v[np.isfinite(v)]) > 90).any():
            raise DHSError(f"score file {path}: dec outside [-90, 90] degrees (max |dec| {np.nanmax(np.abs(v)):g})")
    if "ra" in names:
        v = col("ra")
        v = v[np.isfinite(v)]
        if ((v < -360) | (v > 360)).any():
            raise DHSError(f"score file {path}: ra outside [-360, 360] degrees")
    if "theta_e_arcsec" in names:
        v = col("theta_e_arcsec")
        if (v[np.isfinite(v)] < 0).any():
            raise DHSError(f"score file {path}: theta_e_arcsec has negative values")


def task_ids(pf: pq.ParquetFile, path) -> np.ndarray | None:
    """All task ids of an opened score file (one column read), or None without a task_id column."""
    if "task_id" not in pf.schema_arrow.names:
        return None
    col = pa.chunked_array([b.column(0) for b in pf.iter_batches(columns=["task_id"], batch_size=1 << 20)],
                           pf.schema_arrow.field("task_id").type)
    return dataset.as_id_values(col, f"score file {path}")


def check_unique(pf: pq.ParquetFile, path) -> None:
    ids = task_ids(pf, path)
    if ids is not None:
        dataset.check_unique_ids(ids, f"score file {path}",
                                 "the scored split holds a task more than once (stale shards?)")


def read_checked(path, columns, required=("is_control",)) -> pa.Table:
    """The ``columns`` present in the score file at ``path`` (validated, ids unique) as one table."""
    pf = open_score_file(path, required)
    check_unique(pf, path)
    names = pf.schema_arrow.names
    wanted = [c for c in dict.fromkeys(columns) if c in names]
    checked = [c for c in CHECKED_COLUMNS if c in names and c not in wanted]  # read to check, then dropped
    table = pf.read(columns=wanted + checked)
    check_rows(table, path)
    return table.select(wanted)


