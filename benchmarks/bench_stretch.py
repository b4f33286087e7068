#!/usr/bin/env python3
"""Cost of the network's input stretch (learning.model.stretch) per training batch, against the clip.

    python benchmarks/bench_stretch.py [--batch 128] [--crop 32] [--threads 1,2] [--repeat 200]

Times ``stretch(x, "clip")``, ``torch.asinh`` (the obvious implementation) and ``stretch(x, "asinh")`` (what
the model runs: numpy's vectorised arcsinh on CPU) on a (batch, 3, crop, crop) float32 tensor, best of 3
rounds of ``--repeat`` calls, per torch thread count; prints milliseconds per batch and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from darkhaloscope.learning.model import STRETCH_SCALE, stretch


def per_call_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t) / repeat * 1e3)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args(argv)
    x = torch.randn(args.batch, 3, args.crop, args.crop) * 50
    print(f"| threads | clip ms | torch.asinh ms | stretch asinh ms | torch.asinh / stretch asinh |")
    print("|---|---|---|---|---|")
    for n in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(n)
        clip = per_call_ms(lambda: stretch(x, "clip"), args.repeat)
        plain = per_call_ms(lambda: torch.asinh(x / STRETCH_SCALE) * STRETCH_SCALE, args.repeat)
        used = per_call_ms(lambda: stretch(x, "asinh"), args.repeat)
        print(f"| {n} | {clip:.2f} | {plain:.2f} | {used:.2f} | {plain / used:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
