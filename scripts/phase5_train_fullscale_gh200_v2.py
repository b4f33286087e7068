#!/usr/bin/env python3
"""The seed's `phase5_train_fullscale_gh200_v2.py` command line, unchanged: a thin entry point to `dhs train`."""
import sys

from darkhaloscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
