#!/usr/bin/env python3
"""The seed's Phase 4 command line (`--stage 4a|4c ...`) mapped onto `dhs manifest` / `dhs inject`.

Spark/EMR-only options of the original (`--output-s3`, `--manifests-subdir`, `--experiment-id`) are
accepted and ignored here; rendering runs locally, one shard per process (the Snakemake `inject` rule).
"""
import sys

from darkhaloscope.cli import main

SPARK_ONLY = {"--output-s3", "--manifests-subdir", "--experiment-id"}


def translate(argv):
    stage, out = None, []
    it = iter(argv)
    for arg in it:
        if arg == "--stage":
            stage = next(it, None)
        elif arg in SPARK_ONLY:
            next(it, None)
        else:
            out.append(arg)
    if stage not in ("4a", "4c"):
        sys.exit("spark_phase4_pipeline.py: error: --stage must be 4a or 4c")
    return ["manifest" if stage == "4a" else "inject", *out]


if __name__ == "__main__":
    sys.exit(main(translate(sys.argv[1:])))
