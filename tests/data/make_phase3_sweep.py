"""Rebuild phase3_sweep_v3.fits and phase3_flags.csv from the user's Phase 3 parquet (see README.md).

    git -C /work/.mirror/aditrivaishnavi+toy_glens_kinematics/repo show \
        51655e43c962367b48e033b2db98345bbc19afe3:dark_halo_scope/results/deprecated_phase3/v3_color_relaxed/density_v3/phase3_lrg_parent_catalog.parquet \
        > /tmp/phase3_lrg_parent_catalog.parquet
    python tests/data/make_phase3_sweep.py /tmp/phase3_lrg_parent_catalog.parquet
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits

HERE = Path(__file__).parent


def main(src: str) -> None:
    df = pd.read_parquet(src)
    n = len(df)
    # Columns from the parquet (exact values, the sweep's dtypes); the rest are placeholders (constant
    # observing conditions, round galaxies, no mask bits): the oracle file has none of them.
    cols = [
        fits.Column("RELEASE", "I", array=np.full(n, 10000, np.int16)),
        fits.Column("BRICKNAME", "8A", array=df["BRICKNAME"].to_numpy(str)),
        fits.Column("OBJID", "J", array=np.arange(n, dtype=np.int32)),
        fits.Column("TYPE", "3A", array=df["TYPE"].to_numpy(str)),
        fits.Column("RA", "D", array=df["RA"].to_numpy(np.float64)),
        fits.Column("DEC", "D", array=df["DEC"].to_numpy(np.float64)),
        fits.Column("EBV", "E", array=np.full(n, 0.03, np.float32)),
        *[fits.Column(f"FLUX_{b}", "E", array=df[f"FLUX_{b}"].to_numpy(np.float32)) for b in ("G", "R", "Z", "W1")],
        fits.Column("SHAPE_R", "E", array=np.full(n, 1.0, np.float32)),
        fits.Column("SHAPE_E1", "E", array=np.zeros(n, np.float32)),
        fits.Column("SHAPE_E2", "E", array=np.zeros(n, np.float32)),
        *[fits.Column(f"PSFSIZE_{b}", "E", array=np.full(n, s, np.float32)) for b, s in zip("GRZ", (1.4, 1.25, 1.15))],
        *[fits.Column(f"PSFDEPTH_{b}", "E", array=np.full(n, d, np.float32)) for b, d in zip("GRZ", (2400., 900., 150.))],
        fits.Column("MASKBITS", "J", array=np.zeros(n, np.int32)),
    ]
    fits.BinTableHDU.from_columns(cols).writeto(HERE / "phase3_sweep_v3.fits", overwrite=True)
    flags = df[[f"is_lrg_v{i}" for i in range(1, 6)]].astype(int).astype(str).agg("".join, axis=1)
    pd.DataFrame({"row": np.arange(n), "flags_v1_to_v5": flags}).to_csv(HERE / "phase3_flags.csv", index=False)


if __name__ == "__main__":
    main(sys.argv[1])
