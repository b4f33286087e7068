"""Standardisation of the metadata inputs (observing conditions) of the network: statistics from the training rows,
applied by the stream (training and inference) with the checkpoint's mean and std. numpy only."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from darkhaloscope.errors import DHSError


def meta_statistics(values: np.ndarray) -> tuple[list[float], list[float]]:
    """Column means and standard deviations (NaN ignored; std 0 or undefined -> 1)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        return [], []
    mean, std = [], []
    for col in values.T:
        finite = col[np.isfinite(col)]
        m = float(finite.mean()) if finite.size else 0.0
        s = float(finite.std()) if finite.size > 1 else 1.0
        mean.append(m)
        std.append(s if s > 0 and math.isfinite(s) else 1.0)
    return mean, std


def standardize_meta(values, mean, std=None) -> np.ndarray:
    """(x - mean) / std per column, then NaN/inf -> 0 (the mean). ``mean`` may be a checkpoint dict,
    whose ``meta_mean`` / ``meta_std`` are then used. The one standardisation of training and inference."""
    if isinstance(mean, Mapping):
        mean, std = mean["meta_mean"], mean["meta_std"]
    values = np.asarray(values, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != mean.size:
        raise DHSError(f"meta values have shape {values.shape}, expected (N, {mean.size})")
    out = (values - mean) / std
    out[~np.isfinite(out)] = 0.0
    return out.astype(np.float32)
