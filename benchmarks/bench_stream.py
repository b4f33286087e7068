"""Stamps/s through the data stream alone (decode + normalise + augment) vs the original per-row loop.

The baseline re-implements the seed's per-row reader: one ``np.load`` of the npz per row, a Python loop
over bands with ``np.median`` for the annulus median and MAD, per-row rot90/flip, one tensor per row
and a default collate per batch. Both run in this process, single-threaded, on the same blobs, batch
by batch (each batch is dropped after a checksum, as a training step would consume it), so the ratio
is a per-core figure. The baseline gets the blobs as a ready Python list (its ``to_pylist`` is not
timed: conservative); the stream gets the Arrow column that ``Split.iter_batches`` / the row reader
hand it; the stream is also timed on the Python list. Writes benchmarks/out/bench_stream.json.

    python benchmarks/bench_stream.py [--n 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factory import fake_rows  # noqa: E402

from darkhaloscope.learning import stream  # noqa: E402
from darkhaloscope.stamps import contract  # noqa: E402


def original_loop(blobs, rng, batch=256):
    """The per-row reader of the original training script (re-implemented as a baseline)."""
    total = 0.0
    for i in range(0, len(blobs), batch):
        tensors = []
        for blob in blobs[i:i + batch]:
            with np.load(io.BytesIO(blob)) as npz:
                img = np.stack([npz["image_g"], npz["image_r"], npz["image_z"]]).astype(np.float32)
            if img.shape != (3, 64, 64) or not np.isfinite(img).all():
                continue
            out = np.empty_like(img)
            for b in range(3):
                band = img[b]
                outer = band[contract.OUTER_ANNULUS]
                med = np.median(outer)
                mad = 1.4826 * np.median(np.abs(outer - med))
                out[b] = np.clip((band - med) / max(mad, 1e-8), -10, 10)
            k = int(rng.integers(0, 4))
            out = np.rot90(out, k, axes=(1, 2))
            if rng.random() < 0.5:
                out = out[:, :, ::-1]
            tensors.append(torch.from_numpy(np.ascontiguousarray(out)))
        total += float(torch.utils.data.default_collate(tensors)[:, 0, 0, 0].sum())
    return total


def vectorised(blobs, rng, batch=256):
    total = 0.0
    for i in range(0, len(blobs), batch):
        images, ok = stream.prepare_stamps(blobs[i:i + batch], rng)
        total += float(torch.from_numpy(images)[:, 0, 0, 0].sum())
    return total


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    column = fake_rows(args.n, "train", seed=1).column("stamp_npz").combine_chunks()
    blobs = column.to_pylist()
    # same answer first (augmentation off): the vectorised path against per-row np.load + np.median
    images, _ = stream.prepare_stamps(blobs[:64])
    plain = []
    for b in blobs[:64]:
        with np.load(io.BytesIO(b)) as npz:
            img = np.stack([npz[k] for k in contract.STAMP_KEYS]).astype(np.float32)
        outer = img[:, contract.OUTER_ANNULUS]
        med = np.median(outer, axis=-1)
        mad = np.maximum(np.median(np.abs(outer - med[:, None]), axis=-1) * 1.4826, 1e-8)
        plain.append(np.clip((img - med[:, None, None]) / mad[:, None, None], -10, 10))
    max_diff = float(np.abs(np.stack(plain) - images).max())
    # the machine is shared: interleave the contenders and keep each one's best time
    times = {"base": [], "vec": [], "vec_list": [], "dec": [], "norm": []}
    dec, _ = contract.decode_stamps(column[:256])
    for _ in range(args.repeat):
        times["base"].append(best_of(lambda: original_loop(blobs, np.random.default_rng(0)), 1))
        times["vec"].append(best_of(lambda: vectorised(column, np.random.default_rng(0)), 1))
        times["vec_list"].append(best_of(lambda: vectorised(blobs, np.random.default_rng(0)), 1))
        times["dec"].append(best_of(lambda: [contract.decode_stamps(column[i:i + 256])
                                             for i in range(0, args.n, 256)], 1))
        times["norm"].append(best_of(lambda: [contract.normalize_stamps(dec) for _ in range(0, args.n, 256)], 1))
    t_base, t_vec, t_list, t_dec, t_norm = (min(times[k]) for k in ("base", "vec", "vec_list", "dec", "norm"))
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "n_stamps": args.n,
        "baseline_stamps_per_s": args.n / t_base,
        "stream_stamps_per_s": args.n / t_vec,
        "speedup": t_base / t_vec,
        "stream_from_python_list_stamps_per_s": args.n / t_list,
        "speedup_from_python_list": t_base / t_list,
        "decode_us_per_stamp": 1e6 * t_dec / args.n,
        "normalise_us_per_stamp": 1e6 * t_norm / args.n,
        "max_abs_diff_vs_reference_normalisation": max_diff,
    }
    print(json.dumps(res, indent=2))
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_stream.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
