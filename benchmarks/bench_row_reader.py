"""The training stream on a real run's split: stamps/s of ``StampStream`` with its row reader, with the
previous gather (one ``take`` on a ChunkedArray of the whole cached window), and from memory.

    python benchmarks/bench_row_reader.py --data results/data/v4_sota_moffat [--batches 100] [--repeat 3]

All three deliver the same shuffled, augmented batches of 64 that ``dhs train`` reads (in-process, one thread):

* ``stream``: parquet row groups -> per-window blob cache -> a batch's blobs gathered group by group ->
  decode + normalise + augment (``StampStream`` as it is);
* ``chunked_take``: the same with the previous gather, re-implemented here as the baseline: Arrow's
  ChunkedArray ``take`` of binaries concatenates every cached chunk first, so each batch copied the window;
* ``floor``: the batches' blobs gathered into memory beforehand, then only decoded + normalised + augmented.

Interleaved, best of ``--repeat``. It needs a split of the real size: with a few hundred rows (the tests'
fake splits, ``bench_train.py``) the cached window is small and the gather's cost does not show.
Writes benchmarks/out/bench_row_reader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from darkhaloscope.learning import stream


class ChunkedTakeReader(stream._RowReader):
    """The previous gather (baseline): positions into the concatenation of the cached arrays, one take."""

    def take(self, rows):
        fids, rgs, rws = self.index.file_id[rows], self.index.row_group[rows], self.index.row[rows]
        keys = list(dict.fromkeys(zip(fids.tolist(), rgs.tolist())))
        for key in keys:
            if key not in self.cache:
                self._load(key, self._needed_rows(key))
        position, base = np.empty(len(rows), np.int64), 0
        for key in keys:
            wanted = self.cache[key][0]
            sel = np.flatnonzero((fids == key[0]) & (rgs == key[1]))
            position[sel] = base + np.searchsorted(wanted, rws[sel])
            base += len(wanted)
            self.remaining[key] -= len(sel)
        out = pa.chunked_array([self.cache[key][1] for key in keys]).take(pa.array(position))
        for key in keys:
            if self.remaining[key] <= 0:
                del self.cache[key]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a Phase 4c variant directory (region_split=... partitions)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sp = stream.open_split(args.data, args.split)
    index = stream.build_index(sp.fs, sp.files, [])
    plan = stream.StampStream(index, sp.fs, batch_size=64, seed=0).rank_batches(0)[: args.batches]
    n = sum(len(rows) for rows in plan)

    def run(reader_cls):
        reader = reader_cls(sp.fs, index)
        reader.plan(plan)
        for i, rows in enumerate(plan):
            stream.prepare_stamps(reader.take(rows), np.random.default_rng([0, i]))
        reader.close()

    blobs = _gather_all(stream._RowReader, sp.fs, index, plan)

    def floor():
        for i, b in enumerate(blobs):
            stream.prepare_stamps(b, np.random.default_rng([0, i]))

    baseline = _gather_all(ChunkedTakeReader, sp.fs, index, plan)
    same = all(a.to_pylist() == b.to_pylist() for a, b in zip(blobs, baseline))
    best = {"stream": 0.0, "chunked_take": 0.0, "floor": 0.0}
    for _ in range(args.repeat):
        for name, fn in (("stream", lambda: run(stream._RowReader)), ("chunked_take", lambda: run(ChunkedTakeReader)),
                         ("floor", floor)):
            t = time.perf_counter()
            fn()
            best[name] = max(best[name], n / (time.perf_counter() - t))
    out = {"data": args.data, "split": args.split, "rows": len(index),
           "row_groups": len(set(zip(index.file_id.tolist(), index.row_group.tolist()))), "stamps": n,
           "same_blobs_as_baseline": same, **{f"{k}_stamps_per_s": round(v, 1) for k, v in best.items()},
           "stream_over_chunked_take": round(best["stream"] / best["chunked_take"], 2),
           "stream_over_floor": round(best["stream"] / best["floor"], 2),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
           "load_1min": round(os.getloadavg()[0], 2)}
    print(json.dumps(out, indent=1))
    path = Path(__file__).resolve().parent / "out" / "bench_row_reader.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def _gather_all(reader_cls, fs, index, plan):
    reader = reader_cls(fs, index)
    reader.plan(plan)
    return [reader.take(rows) for rows in plan]


if __name__ == "__main__":
    main()
