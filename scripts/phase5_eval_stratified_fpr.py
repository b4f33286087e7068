#!/usr/bin/env python3
"""The seed's `phase5_eval_stratified_fpr.py` command line, unchanged: a thin entry point to `dhs eval`."""
import sys

from darkhaloscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
