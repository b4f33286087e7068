"""Small Phase 4c-contract tables for unit tests of the readers (training, inference, mining, eval).

These tables follow the column contract in ``darkhaloscope.stamps.contract`` but draw their stamps from a
deliberately simple model (a Gaussian host plus, for positives, a blurred ring of radius theta_E) so
that reader tests do not depend on the simulator. The simulator's own tests use the real renderer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from darkhaloscope.stamps.contract import PIXEL_SCALE_ARCSEC, STAMP_SIZE, encode_stamp

_yy, _xx = np.mgrid[:STAMP_SIZE, :STAMP_SIZE] - (STAMP_SIZE - 1) / 2.0
_rr = np.hypot(_xx, _yy)


def fake_rows(n: int, split: str, pos_frac: float = 0.5, seed: int = 0, arc_amp: float = 0.05,
              start_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    is_control = (rng.random(n) >= pos_frac).astype(np.int8)
    psfsize_r = rng.uniform(0.9, 1.6, n)
    psfdepth_r = rng.uniform(23.6, 25.0, n)
    theta_e = np.where(is_control == 1, np.nan, rng.uniform(0.5, 2.5, n))
    sigma_pix = 10 ** (-0.4 * (psfdepth_r - 22.5)) / 5 * 0.6
    blobs = []
    for i in range(n):
        host = 0.1 * np.exp(-0.5 * (_rr / 3.0) ** 2)
        img = np.repeat(host[None], 3, axis=0)
        if is_control[i] == 0:
            r_pix = theta_e[i] / PIXEL_SCALE_ARCSEC
            img = img + arc_amp * np.exp(-0.5 * ((_rr - r_pix) / 1.5) ** 2)[None]
        img = img + rng.normal(0, sigma_pix[i], img.shape)
        blobs.append(encode_stamp(img.astype(np.float32)))
    ids = np.arange(start_id, start_id + n)
    ra = rng.uniform(150, 160, n)
    dec = rng.uniform(0, 10, n)
    used = np.where(is_control == 1, np.nan, psfsize_r)
    return pa.table({
        "task_id": pa.array(ids, pa.int64()),
        "ra": ra, "dec": dec,
        "brickname": [f"{r * 10:04.0f}p{d * 10:03.0f}" for r, d in zip(ra, dec)],
        "region_id": pa.array((ra // 1).astype(np.int64)),
        "region_split": [split] * n,
        "is_control": pa.array(is_control.astype(np.int32)),
        "cutout_ok": pa.array(np.ones(n, np.int32)),
        "stamp_npz": pa.array(blobs, pa.binary()),
        "psfsize_r": psfsize_r, "psfdepth_r": psfdepth_r,
        "psf_fwhm_used_r": pa.array(used, from_pandas=True),
        "theta_e_arcsec": pa.array(theta_e, from_pandas=True),
        "arc_snr": pa.array(np.where(is_control == 1, np.nan, rng.uniform(1, 30, n)), from_pandas=True),
        "lens_model": ["none" if c else "SIE" for c in is_control],
        "control_kind": ["unpaired" if c else "" for c in is_control],
        "confuser_kind": ["none"] * n,
    })


def write_fake_phase4c(root: str | Path, sizes: dict[str, int], pos_frac: float = 0.5, seed: int = 0,
                       files_per_split: int = 2, arc_amp: float = 0.05) -> Path:
    """Write ``root/region_split=<split>/part-<k>.parquet`` with the given number of rows per split."""
    root = Path(root)
    next_id = 0
    for s_i, (split, n) in enumerate(sizes.items()):
        d = root / f"region_split={split}"
        d.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, n, files_per_split + 1).astype(int)
        for k in range(files_per_split):
            m = int(bounds[k + 1] - bounds[k])
            table = fake_rows(m, split, pos_frac, seed * 1000 + s_i * 100 + k, arc_amp, next_id)
            next_id += m
            pq.write_table(table.drop(["region_split"]), d / f"part-{k:04d}.parquet", row_group_size=64)
    return root
