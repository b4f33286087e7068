"""Runtime of a training process: ranks under torchrun (``Dist``), logging, the learning-rate schedule, the global
random generators' state, and whether bf16 autocast pays off on this device."""

from __future__ import annotations

import math
import os
import random
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm


class Dist:
    """Rank / world size from torchrun's environment; a no-op on a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def log(d: Dist, msg: str) -> None:
    if d.main:
        tqdm.write(f"[dhs train] {msg}", file=sys.stderr)


def lr_at(progress: float, base_lr: float, epochs: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` epochs, then cosine to 0 at ``epochs``; progress in epochs."""
    if warmup > 0 and progress < warmup:
        return base_lr * (progress + 1e-3) / warmup
    span = max(epochs - warmup, 1e-9)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress - warmup, 0.0) / span, 1.0)))


def rng_state() -> dict:
    """The global generators a training step may draw from: torch (dropout, drop path), CUDA, and Python's
    ``random``. Not numpy's global generator: nothing in a run draws from it (the stream and the augmentation
    use their own seeded generators; tests/test_train.py checks that a whole run leaves it untouched), so there
    is nothing of it to save or restore."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``; a checkpoint of an earlier version also holds a numpy entry, which nothing needs."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def bf16_enabled(requested: bool, device: torch.device) -> bool:
    if not requested:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # CPU bf16 autocast only pays off with native bf16 instructions
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False
