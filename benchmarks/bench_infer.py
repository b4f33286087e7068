"""Inference throughput: `dhs infer`'s whole pipeline (parquet read, npz decode, normalisation, meta
standardisation, forward, parquet write) against a bare timm forward pass of the same architecture on the
same batch shape, in the same run (the machine is shared, so only the ratio is comparable across runs).

    python benchmarks/bench_infer.py [--archs convnext_atto,convnext_tiny] [--n 2048] [--batch_size 256]
                                     [--num_workers 2]   # dhs infer's decoding processes (default 0: a thread)
                                     [--reader_workers 14]  # also: parquet reading work of 14 workers, sharded
                                                            # against each worker reading the whole split

Prints a table and writes benchmarks/out/bench_infer.json. Goal: pipeline >= 0.9x the bare forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from factory import write_fake_phase4c  # noqa: E402

from darkhaloscope import cli  # noqa: E402
from darkhaloscope.learning.checkpoint import save_checkpoint  # noqa: E402
from darkhaloscope.learning.model import build_model, model_kwargs  # noqa: E402


def make_ckpt(path: Path, arch: str) -> Path:
    kwargs = model_kwargs(arch, 2, 0.1)
    model = build_model(**kwargs)
    save_checkpoint(path, kind="best", arch=arch, model_kwargs=kwargs, state_dict=model.state_dict(),
                    meta_cols=["psfsize_r", "psfdepth_r"], meta_mean=[1.2, 24.3], meta_std=[0.2, 0.4],
                    variant="bench", args={}, epoch=0, metrics={}, finished=True)
    return path


def bare_forward(arch: str, n: int, batch_size: int) -> float:
    """Stamps/s of timm.create_model(arch) on random (batch, 3, 64, 64) float32 batches, no data."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=1).eval()
    x = torch.randn(batch_size, 3, 64, 64)
    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        done = 0
        while done < n:
            model(x)
            done += batch_size
    return done / (time.perf_counter() - start)


def pipeline(data: Path, ckpt: Path, out: Path, n: int, batch_size: int, extra=()) -> float:
    """Stamps/s of the whole `dhs infer` command (model load and setup included)."""
    start = time.perf_counter()
    rc = cli.main(["infer", "--data", str(data), "--ckpt", str(ckpt), "--out", str(out), "--split", "test",
                   "--batch_size", str(batch_size), *extra])
    elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"dhs infer failed with {rc}")
    return n / elapsed


def reading_work(data: Path, batch_size: int, workers: int, repeats: int = 3) -> dict:
    """Seconds of parquet reading (no decoding) that ``workers`` DataLoader workers of `dhs infer` do together:
    each reading only its shard of the batches (``Split.iter_batches(shard=...)``), against each reading the
    whole split and keeping 1/W of it (the reader before the shard, i.e. W sequential reads). Best of
    ``repeats``, measured back to back in one process, so the ratio holds on a loaded machine."""
    from darkhaloscope.evaluation.infer import PASSTHROUGH_COLUMNS
    from darkhaloscope.stamps.dataset import open_split

    split = open_split(str(data), "test")
    cols = [c for c in ("task_id", "stamp_npz", "cutout_ok", *PASSTHROUGH_COLUMNS, "psfsize_r", "psfdepth_r")
            if c in split.schema.names]
    whole = sharded = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        n_whole = sum(b.num_rows for b in split.iter_batches(cols, batch_size))
        whole = min(whole, time.perf_counter() - t)
        t = time.perf_counter()
        n_sharded = sum(b.num_rows for w in range(workers) for b in split.iter_batches(cols, batch_size, shard=(w, workers)))
        sharded = min(sharded, time.perf_counter() - t)
    assert n_whole == n_sharded
    return {"workers": workers, "batch_size": batch_size, "rows": n_whole, "one_sequential_read_s": whole,
            "all_workers_unsharded_s": whole * workers, "all_workers_sharded_s": sharded,
            "saving": whole * workers / sharded}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="convnext_atto,convnext_tiny")
    p.add_argument("--n", type=int, default=2048, help="stamps scored per measurement")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs of each")
    p.add_argument("--num_workers", type=int, default=0, help="dhs infer --num_workers (0: one background thread)")
    p.add_argument("--reader_workers", type=int, default=0,
                   help="also measure the parquet reading work of this many workers, sharded against unsharded")
    args = p.parse_args()
    out_dir = HERE / "out" / "bench_infer"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / f"data_{args.n}"
    if not data.exists():
        write_fake_phase4c(data, {"test": args.n}, files_per_split=max(1, args.n // 1024))
    small = out_dir / f"data_{args.batch_size}"  # one batch: the command's fixed cost (model load, setup)
    if not small.exists():
        write_fake_phase4c(small, {"test": args.batch_size}, files_per_split=1)
    results = []
    for arch in filter(None, args.archs.split(",")):  # --archs "": the reading work alone
        ckpt = make_ckpt(out_dir / f"{arch}.pt", arch)
        bare, piped, steady = [], [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            bare.append(bare_forward(arch, args.n, args.batch_size))
            extra = ("--num_workers", str(args.num_workers))
            t_small = args.batch_size / pipeline(small, ckpt, out_dir / f"{arch}_small.parquet", args.batch_size,
                                                 args.batch_size, extra)
            rate = pipeline(data, ckpt, out_dir / f"{arch}_scores.parquet", args.n, args.batch_size, extra)
            piped.append(rate)
            steady.append((args.n - args.batch_size) / max(args.n / rate - t_small, 1e-9))
        # ratios of each interleaved (bare, pipeline) pair, then their median: robust to load swings
        ratio = float(np.median(np.array(piped) / np.array(bare)))
        ratio_steady = float(np.median(np.array(steady) / np.array(bare)))
        row = {"arch": arch, "batch_size": args.batch_size, "num_workers": args.num_workers, "n": args.n, "bare_stamps_per_s": max(bare),
               "pipeline_stamps_per_s": max(piped), "pipeline_steady_stamps_per_s": max(steady),
               "ratio": ratio, "ratio_steady": ratio_steady, "bare_all": bare, "pipeline_all": piped,
               "steady_all": steady}
        results.append(row)
        print(f"{arch:16s} batch {args.batch_size}: bare timm forward {row['bare_stamps_per_s']:8.1f} stamps/s | "
              f"dhs infer whole command {row['pipeline_stamps_per_s']:8.1f} stamps/s (paired ratio {ratio:.2f}), "
              f"steady state {row['pipeline_steady_stamps_per_s']:8.1f} stamps/s (paired ratio {ratio_steady:.2f})",
              flush=True)
    reader = None
    if args.reader_workers:
        reader = reading_work(data, args.batch_size, args.reader_workers)
        print(f"reading work of {reader['workers']} workers, batch {reader['batch_size']}, {reader['rows']} rows: "
              f"{reader['all_workers_sharded_s']:.3f} s sharded against {reader['all_workers_unsharded_s']:.3f} s "
              f"(each worker reading the whole split): {reader['saving']:.1f}x less", flush=True)
    meta = {"machine": platform.platform(), "reader": reader, "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "results": results}
    (HERE / "out" / "bench_infer.json").write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
