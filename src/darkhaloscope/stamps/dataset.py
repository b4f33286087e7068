"""The one reader of a Phase 4c dataset, whoever wrote it.

Two writers exist: ``dhs inject`` (``region_split=<split>/part-<shard>.parquet``, zstd, int64 task ids)
and the original Spark pipeline's stage 4c (``region_split=<split>/part-00000-<uuid>.c000.gz.parquet``,
gzip, ``_SUCCESS`` markers, string task ids such as ``v4sm_0001234_r0``, ``region_split`` also stored as a
column, failed cutouts kept as rows with ``cutout_ok = 0`` and a null or all-NaN ``stamp_npz``). Training
(``learning.stream``), inference, the audit, recall on known lenses and the galleries of both reports
(``fetch_stamps``) all open a split here, so they agree on which files belong to it, which rows are
usable and what a task id is.

Rules that live only here:

* Files: every parquet file under ``<root>/region_split=<split>/`` in sorted path order; names starting
  with ``.`` or ``_`` (``_SUCCESS``, an interrupted writer's ``.part-....tmp-<pid>``) are not data.
* ``region_split`` as a column and as the partition key: the directory wins (the file's own column is
  not read), so both layouts give the same rows.
* Declared cutout failures: a row with ``cutout_ok != 1`` (or null) is excluded by ``cutout_usable`` and
  counted apart from stamps that fail to decode (those count against ``--max_skip_frac``).
* Task ids: any integer type (compared as int64) or string type (compared as str), carried into every
  output with the type they had (``task_id_array``, ``as_id_values``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.io import filesystem  # noqa: F401 (the datasets' location, local or a URI)
from darkhaloscope.stamps.contract import decode_stamp

PARTITION = "region_split"
TASK_ID = "task_id"
CUTOUT_OK = "cutout_ok"
# file names that are never data (pyarrow's defaults, spelled out because the messages name them)
IGNORE_PREFIXES = (".", "_")


# ----------------------------------------------------------------------------------------------------
# Task ids
# ----------------------------------------------------------------------------------------------------

def task_id_kind(arrow_type: pa.DataType, where: str) -> str:
    """'int' for any integer type, 'string' for string / large_string (dictionary-encoded too);
    anything else is refused naming ``where``."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_integer(arrow_type):
        return "int"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    raise DHSError(f"{where}: task_id has type {arrow_type}; expected an integer or a string type")


def as_id_values(column, where: str) -> np.ndarray:
    """An Arrow task_id column -> numpy values to compare and sort: int64 for integer ids, str objects
    for string ids. Null ids are refused (a row without an id cannot be joined)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    elif not isinstance(column, pa.Array):
        column = pa.array(column)
    kind = task_id_kind(column.type, where)
    if column.null_count:
        raise DHSError(f"{where}: {column.null_count} row(s) have a null task_id")
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if kind == "int":
        return column.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.asarray(column.to_pylist(), dtype=object)


def ids_compatible(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    """Integer ids and string ids never match each other: say so instead of matching nothing."""
    ka = "strings" if a.dtype == object else "integers"
    kb = "strings" if b.dtype == object else "integers"
    if len(a) and len(b) and ka != kb:
        raise DHSError(f"task ids of {what_a} are {ka} but those of {what_b} are {kb}: they come from "
                       "different datasets")


def duplicated_ids(ids: np.ndarray) -> tuple[int, list]:
    """(number of rows whose task_id repeats an earlier row's, up to 3 example ids)."""
    if len(ids) < 2:
        return 0, []
    uniq, counts = np.unique(ids, return_counts=True)
    rep = uniq[counts > 1]
    return int(len(ids) - len(uniq)), [x.item() if hasattr(x, "item") else x for x in rep[:3]]


def check_unique_ids(ids: np.ndarray, where: str, hint: str = "") -> None:
    n_dup, examples = duplicated_ids(ids)
    if n_dup:
        raise DHSError(f"{where}: {n_dup} row(s) repeat a task_id (e.g. {', '.join(map(str, examples))})"
                       + (f"; {hint}" if hint else ""))


STALE_SHARD_HINT = ("stale files of another run (e.g. shards of a different --n_shards) may sit beside the "
                    "current ones")


# ----------------------------------------------------------------------------------------------------
# Declared cutout failures
# ----------------------------------------------------------------------------------------------------

def cutout_usable(batch) -> np.ndarray:
    """True where the row has a cutout: ``cutout_ok == 1`` (null or any other value: a declared failure).
    A table without the column (not Phase 4c, e.g. a hand-made test table) counts every row usable."""
    n = batch.num_rows
    if CUTOUT_OK not in batch.schema.names:
        return np.ones(n, bool)
    col = batch.column(CUTOUT_OK)
    try:
        eq = pc.equal(col, pa.scalar(1, col.type))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        raise DHSError(f"cutout_ok has type {col.type}; expected an integer 0/1 flag") from None
    return np.asarray(pc.fill_null(eq, False).to_numpy(zero_copy_only=False), bool)


# ----------------------------------------------------------------------------------------------------
# Typed columns
# ----------------------------------------------------------------------------------------------------

def as_float(column, name: str = "column") -> np.ndarray:
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_null(column.type)):
        raise DHSError(f"column {name} has type {column.type}; expected numbers")
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


def control_flags(column, where: str) -> np.ndarray:
    """``is_control`` as int8 0/1; any other type or value (a string column, null, 2) is refused."""
    if not (pa.types.is_integer(column.type) or pa.types.is_boolean(column.type)):
        raise DHSError(f"{where}: is_control has type {column.type}; expected an integer 0/1 flag")
    if column.null_count:
        raise DHSError(f"{where}: is_control is null on {column.null_count} row(s)")
    v = np.asarray(column.to_numpy(zero_copy_only=False)).astype(np.int64)
    if v.size and ((v != 0) & (v != 1)).any():
        raise DHSError(f"{where}: is_control must be 0 or 1, found {sorted(set(v[(v != 0) & (v != 1)].tolist()))[:3]}")
    return v.astype(np.int8)


# ----------------------------------------------------------------------------------------------------
# Opening a split
# ----------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """The files of one ``region_split=<split>`` partition and the dataset's schema."""

    data: str
    split: str
    fs: pafs.FileSystem
    files: list[str]
    schema: pa.Schema

    def require(self, columns, where: str | None = None) -> None:
        """Every file of the split has ``columns`` (one footer read per file); else DHSError naming the
        file and the column."""
        columns = [c for c in dict.fromkeys(columns) if c != PARTITION]
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise DHSError(f"{where or self.where} lacks column(s) {','.join(missing)}")
        for path in self.files:
            names = self.file_schema(path).names
            missing = [c for c in columns if c not in names]
            if missing:
                raise DHSError(f"{path} (split '{self.split}' of {self.data}) lacks column(s) {','.join(missing)}")

    @property
    def where(self) -> str:
        return f"{self.data} split '{self.split}'"

    def file_schema(self, path: str) -> pa.Schema:
        with self.fs.open_input_file(path) as fh:
            return pq.ParquetFile(fh).schema_arrow

    def num_rows(self) -> int:
        total = 0
        for path in self.files:
            with self.fs.open_input_file(path) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    def _checked_columns(self, columns) -> tuple[list[str], list[str]]:
        columns = list(dict.fromkeys(columns))
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise DHSError(f"{self.where} lacks column(s) {','.join(missing)}")
        return columns, [c for c in columns if c != PARTITION]

    def _open_file(self, fh, path: str, file_columns) -> pq.ParquetFile:
        pf = pq.ParquetFile(fh, pre_buffer=False)
        lacking = [c for c in file_columns if c not in pf.schema_arrow.names]
        if lacking:
            raise DHSError(f"{path} (split '{self.split}' of {self.data}) lacks column(s) {','.join(lacking)}")
        return pf

    def _with_partition(self, batch: pa.RecordBatch, columns) -> pa.RecordBatch:
        if PARTITION in columns:
            batch = batch.append_column(PARTITION, pa.array([self.split] * batch.num_rows, pa.string()))
            batch = batch.select(columns)
        return batch

    def iter_batches(self, columns, batch_size: int = 1024, shard: tuple[int, int] | None = None
                     ) -> Iterator[pa.RecordBatch]:
        """RecordBatches (at most ``batch_size`` rows) of ``columns``, file by file in file order, one row
        group in memory at a time. ``region_split`` is filled from the partition, never read from a file.

        The batches are those of ``ParquetFile.iter_batches`` on each file: rows ``[k * batch_size, (k + 1) *
        batch_size)`` of the file, crossing row-group boundaries. ``shard=(w, n)``: only the batches whose index
        in the whole split is ``w`` modulo ``n``, reading only the row groups those batches cover (one
        DataLoader worker's part; the workers' batches taken round-robin are the unsharded sequence, equal
        byte for byte). Without it every reader of a worker would read (and decompress) the whole split.

        Why not ``Dataset.to_batches``: pyarrow's dataset scanner pre-buffers whole files and reads 16
        batches x 4 files ahead, i.e. ~3 GB at the seed's batch 1024 (measured: 119 MB at batch 32 on
        2.5 MB files). ``ParquetFile.iter_batches(pre_buffer=False)`` holds one row group at a time."""
        columns, file_columns = self._checked_columns(columns)
        if shard is not None and shard[1] > 1:
            yield from self._iter_shard(columns, file_columns, batch_size, *shard)
            return
        for path in self.files:
            with self.fs.open_input_file(path) as fh:
                pf = self._open_file(fh, path, file_columns)
                for batch in pf.iter_batches(batch_size=batch_size, columns=file_columns, use_threads=False):
                    if batch.num_rows:
                        yield self._with_partition(batch, columns)

    def _iter_shard(self, columns, file_columns, batch_size: int, worker: int, n_workers: int):
        """Batches ``worker`` (mod ``n_workers``) of the split, as ``iter_batches`` cuts them. Each is read from
        the row groups it covers only (``iter_batches(row_groups=...)``, one batch from the first covered row
        group's start, then a zero-copy slice); a row group that two batches straddle is read for both."""
        if not 0 <= worker < n_workers:
            raise DHSError(f"shard {worker} of {n_workers} does not exist")
        index = 0  # the batch's index in the whole split
        for path in self.files:
            with self.fs.open_input_file(path) as fh:
                pf = self._open_file(fh, path, file_columns)
                meta = pf.metadata
                starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
                n_rows = int(starts[-1])
                n_batches = -(-n_rows // batch_size)
                mine = [k for k in range(n_batches) if (index + k) % n_workers == worker]
                index += n_batches
                for k in mine:
                    lo, hi = k * batch_size, min((k + 1) * batch_size, n_rows)
                    first = int(np.searchsorted(starts, lo, side="right")) - 1
                    last = int(np.searchsorted(starts, hi, side="left")) - 1
                    start = int(starts[first])
                    batch = next(iter(pf.iter_batches(batch_size=hi - start, row_groups=list(range(first, last + 1)),
                                                      columns=file_columns, use_threads=False)))
                    yield self._with_partition(batch.slice(lo - start, hi - lo), columns)


def _leftovers(fs: pafs.FileSystem, root: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except Exception:
        return []
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(".") and ".tmp" in i.base_name)


def open_dataset(data: str) -> tuple[pafs.FileSystem, pads.Dataset]:
    fs, root = filesystem(data)
    fmt = pads.ParquetFileFormat(default_fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False))
    try:
        info = fs.get_file_info(root)
    except Exception as exc:
        raise DHSError(f"cannot open data location {data}: {type(exc).__name__}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise DHSError(f"data location {data} does not exist")
    if info.type != pafs.FileType.Directory:
        raise DHSError(f"data location {data} is not a directory of region_split=<split>/ partitions")
    try:
        dataset = pads.dataset(root, format=fmt, partitioning="hive", filesystem=fs,
                               ignore_prefixes=list(IGNORE_PREFIXES))
    except Exception as exc:
        raise DHSError(f"cannot read parquet dataset at {data}: {type(exc).__name__}: {exc}") from None
    if not dataset.files:
        leftovers = _leftovers(fs, root)
        extra = (f" (only {len(leftovers)} leftover temporary file(s) of an interrupted run, e.g. {leftovers[0]})"
                 if leftovers else "")
        raise DHSError(f"no parquet files under {data}{extra}")
    if PARTITION not in dataset.schema.names:
        raise DHSError(f"{data} is not Hive-partitioned by {PARTITION}=<split>")
    return fs, dataset


def open_split(data: str, split: str) -> Split:
    """The files of one Hive partition ``region_split=<split>`` (sorted) and the dataset schema."""
    fs, dataset = open_dataset(data)
    files = sorted(f.path for f in dataset.get_fragments(filter=pads.field(PARTITION) == split))
    if not files:
        raise DHSError(f"no parquet files for split '{split}' under {data}/{PARTITION}={split}")
    if TASK_ID in dataset.schema.names:
        task_id_kind(dataset.schema.field(TASK_ID).type, f"{data}")
    return Split(str(data), split, fs, files, dataset.schema)


def splits_of(data: str) -> list[str]:
    """Every split value present under ``data`` (sorted)."""
    fs, dataset = open_dataset(data)
    values = set()
    for frag in dataset.get_fragments():
        expr = pads.get_partition_keys(frag.partition_expression)
        if PARTITION in expr:
            values.add(str(expr[PARTITION]))
    return sorted(values)


def fetch_rows(data: str, task_ids, columns=()) -> dict:
    """task_id -> {column: value} of ``columns`` plus the decoded (3, 64, 64) ``stamp`` (None when it does not
    decode), scanning every split once; ids keep their kind (int or str). Declared cutout failures are left out."""
    wanted = [t.item() if hasattr(t, "item") else t for t in task_ids]
    if not wanted:
        return {}
    found: dict = {}
    for split in splits_of(data):
        sp = open_split(data, split)
        sp.require(["task_id", "stamp_npz", *columns])
        kind = task_id_kind(sp.schema.field("task_id").type, sp.where)
        try:
            value_set = pa.array(wanted, pa.int64() if kind == "int" else pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            raise DHSError(f"the score files' task ids are not the {kind} ids of {data}: different datasets") from None
        cols = list(dict.fromkeys(["task_id", "stamp_npz", *(["cutout_ok"] if "cutout_ok" in sp.schema.names else []),
                                   *columns]))
        for batch in sp.iter_batches(cols, batch_size=256):
            ids = batch.column("task_id")
            hit = pc.is_in(ids.cast(value_set.type), value_set=value_set)
            hit = pc.and_(hit, pa.array(cutout_usable(batch)))
            if not pc.any(hit).as_py():
                continue
            batch = batch.filter(hit)
            values = {c: batch.column(c).to_pylist() for c in columns}
            for i, (tid, blob) in enumerate(zip(as_id_values(batch.column("task_id"), sp.where),
                                                batch.column("stamp_npz").to_pylist())):
                row = {c: values[c][i] for c in columns}
                row["stamp"] = decode_stamp(blob) if blob is not None else None
                found[tid.item() if hasattr(tid, "item") else tid] = row
    return found


def fetch_stamps(data: str, task_ids) -> dict:
    """task_id -> decoded (3, 64, 64) stamp (``fetch_rows``); stamps that do not decode are left out. Used by the
    report's and the recall page's galleries."""
    return {t: row["stamp"] for t, row in fetch_rows(data, task_ids).items() if row["stamp"] is not None}


# Written into every output directory of `dhs cutouts`: only a directory holding it is ever replaced, and it
# records the dataset's content hash (``dataset_sha256``), which a host manifest is tied to.
MARKER = ".dhs-cutouts"


def parts_sha256(root, fs=None) -> str:
    """The content hash of a dataset: SHA-256 over the relative path and bytes of every parquet file under
    ``root`` (sorted by path). ``dhs cutouts`` stores it in its marker; a host manifest records it
    (simulation.real_hosts)."""
    if fs is None:
        fs, root = pafs.LocalFileSystem(), str(Path(root).resolve())
    root = str(root).rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not Path(i.path).name.startswith((".", "_")))
    h = hashlib.sha256()
    for path in files:
        h.update(path[len(root):].lstrip("/").encode() + b"\0")
        with fs.open_input_stream(path) as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def dataset_sha256(root) -> str:
    """``parts_sha256`` of a dataset written by this command, read from its marker (local or a pyarrow URI);
    computed from the files when the marker lacks it."""
    fs, path = filesystem(str(root))
    try:
        with fs.open_input_stream(f"{str(path).rstrip('/')}/{MARKER}") as fh:
            sha = json.loads(fh.read().decode()).get("sha256")
    except (OSError, ValueError, AttributeError):
        sha = None
    if sha:
        return sha
    return parts_sha256(path, fs) if "://" in str(root) else parts_sha256(root)
