#!/usr/bin/env python3
"""The seed's `phase5_infer_scores_v2.py` command line, unchanged: a thin entry point to `dhs infer`."""
import sys

from darkhaloscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
