#!/usr/bin/env bash
# Run by Snakemake after it creates envs/evaluate.yaml (--sdm conda). lenscat is installed without its
# dependencies (the LIGO stack behind its skymap crossmatch): `dhs mine` only reads the catalogue CSV it ships.
# The pin is pyproject.toml's [tool.darkhaloscope] no_deps (tests/test_readme.py checks they agree).
set -euo pipefail
pip install --no-deps lenscat==1.1.3
