"""Training images/s through the full pipeline vs a bare timm forward/backward loop.

Pipeline: parquet -> StampStream (decode + normalise + augment, DataLoader workers) -> LensClassifier
(timm backbone + meta fusion head) -> focal loss -> AdamW step, i.e. the code ``dhs train`` runs.
Bare: ``timm.create_model(arch, num_classes=1)`` on a fixed random tensor of the same shape, BCE, AdamW.
Both in the same process, interleaved, best of ``--repeat``; the ratio is pipeline / bare.
``--crops 64,32`` also runs the pipeline with ``--crop`` (the network sees the central crop x crop pixels)
and reports each crop's speed-up over 64 measured in the same run. ``--layouts`` also times the bare loop
at each crop size with NCHW and with channels-last (NHWC) weights and inputs, interleaved: the speed-up of
the layout ``LensClassifier`` uses.
Writes benchmarks/out/bench_train.json.

    python benchmarks/bench_train.py [--archs convnext_atto,convnext_tiny] [--batch 64] [--steps 4]
        [--threads 1] [--workers 0] [--bf16] [--crops 64,32] [--layouts] [--batches 64,128] [--bf16_vs_fp32]
        [--residual]

``--batches`` times the bare channels-last loop at each batch size (interleaved; speed-up over the first),
``--bf16_vs_fp32`` the same loop with and without bf16 autocast (on a CPU: does its native bf16 pay?).
``--residual`` times the pipeline (last crop, asinh stretch) with and without the rot180 residual channels
(``--rot180_residual``), interleaved: what the three extra input channels cost per stamp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from factory import write_fake_phase4c  # noqa: E402

from darkhaloscope.learning import stream, train  # noqa: E402
from darkhaloscope.learning.losses import bce_loss, make_loss  # noqa: E402
from darkhaloscope.learning.model import build_model  # noqa: E402


def bare_loop(arch, batch, steps, device, bf16, size=64, channels_last=False):
    import timm

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(arch, pretrained=False, num_classes=1).to(device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, device=device) < 0.5).float()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x).squeeze(-1)
        loss = bce_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def pipeline_loop(arch, batch, steps, device, bf16, data, workers, crop=64, **model_options):
    sp = stream.open_split(str(data), "train")
    fs, files = sp.fs, sp.files
    index = stream.build_index(fs, files, ["psfsize_r", "psfdepth_r"])
    ds = stream.StampStream(index, fs, ["psfsize_r", "psfdepth_r"], [1.25, 24.3], [0.2, 0.4], batch_size=batch,
                            shuffle=True, augment=True, seed=0, num_workers=workers)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                     pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    model = build_model(arch, 2, 0.1, crop=crop, **model_options).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = make_loss("focal")
    done, t, epoch = -1, None, 0
    while done < steps:
        ds.set_epoch(epoch)
        for b in dl:
            train._train_step(model, model, opt, loss_fn, b, device, bf16, 1.0)
            done += 1
            if done == 0:  # the first step is the warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
            if done == steps:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="convnext_atto,convnext_tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 = a per-core figure, robust to a shared machine's load)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--crops", default="64", help="comma-separated --crop values for the pipeline (64 = whole stamp)")
    ap.add_argument("--layouts", action="store_true", help="also time the bare loop NCHW vs channels-last per crop")
    ap.add_argument("--batches", default="",
                    help="comma-separated batch sizes: also time the bare channels-last loop at each (last crop), "
                         "interleaved, as stamps/s and speed-up over the first")
    ap.add_argument("--bf16_vs_fp32", action="store_true",
                    help="also time the bare channels-last loop (last crop, --batch) with and without bf16 autocast")
    ap.add_argument("--residual", action="store_true",
                    help="also time the pipeline (last crop, asinh stretch) with and without the rot180 residual")
    args = ap.parse_args()
    crops = [int(c) for c in args.crops.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU'}",
               "batch": args.batch, "steps": args.steps, "bf16": args.bf16, "workers": args.workers,
               "threads": torch.get_num_threads(), "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_fake_phase4c(tmp, {"train": args.rows}, files_per_split=4)
        for arch in args.archs.split(","):
            bare, pipe = [], {c: [] for c in crops}
            layout = {(c, cl): [] for c in crops for cl in (False, True)} if args.layouts else {}
            sizes = {b: [] for b in ([int(b) for b in args.batches.split(",")] if args.batches else [])}
            dtypes = {False: [], True: []} if args.bf16_vs_fp32 else {}
            residual = {False: [], True: []} if args.residual else {}
            for _ in range(args.repeat):
                bare.append(bare_loop(arch, args.batch, args.steps, device, args.bf16))
                for c, cl in layout:
                    layout[(c, cl)].append(bare_loop(arch, args.batch, args.steps, device, args.bf16, c, cl))
                for c in crops:
                    pipe[c].append(pipeline_loop(arch, args.batch, args.steps, device, args.bf16, data, args.workers, c))
                for b in sizes:
                    sizes[b].append(bare_loop(arch, b, args.steps, device, args.bf16, crops[-1], True))
                for bf in dtypes:
                    dtypes[bf].append(bare_loop(arch, args.batch, args.steps, device, bf, crops[-1], True))
                for on in residual:
                    residual[on].append(pipeline_loop(arch, args.batch, args.steps, device, args.bf16, data,
                                                      args.workers, crops[-1], stretch="asinh", rot180_residual=on))
            first = max(pipe[crops[0]])
            results["archs"][arch] = {"bare_images_per_s": max(bare), "pipeline_images_per_s": first,
                                      "ratio": first / max(bare)}
            for c in crops[1:]:
                results["archs"][arch][f"pipeline_crop{c}_images_per_s"] = max(pipe[c])
                results["archs"][arch][f"crop{c}_speedup_over_crop{crops[0]}"] = max(pipe[c]) / first
            for c in crops if layout else []:
                nchw, nhwc = max(layout[(c, False)]), max(layout[(c, True)])
                results["archs"][arch][f"bare_crop{c}_nchw_images_per_s"] = nchw
                results["archs"][arch][f"bare_crop{c}_channels_last_images_per_s"] = nhwc
                results["archs"][arch][f"bare_crop{c}_channels_last_speedup"] = nhwc / nchw
            for b in sizes:
                results["archs"][arch][f"bare_crop{crops[-1]}_batch{b}_images_per_s"] = max(sizes[b])
                results["archs"][arch][f"bare_crop{crops[-1]}_batch{b}_speedup"] = max(sizes[b]) / max(sizes[next(iter(sizes))])
            if dtypes:
                results["archs"][arch][f"bare_crop{crops[-1]}_bf16_over_fp32"] = max(dtypes[True]) / max(dtypes[False])
            if residual:
                results["archs"][arch][f"pipeline_crop{crops[-1]}_asinh_images_per_s"] = max(residual[False])
                results["archs"][arch][f"pipeline_crop{crops[-1]}_asinh_rot180_residual_images_per_s"] = max(residual[True])
                results["archs"][arch]["rot180_residual_over_plain"] = max(residual[True]) / max(residual[False])
            print(arch, json.dumps(results["archs"][arch]), flush=True)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
