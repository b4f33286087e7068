#!/usr/bin/env python3
"""The seed's `phase5_mine_hard_negatives.py` command line, unchanged: a thin entry point to `dhs mine`."""
import sys

from darkhaloscope.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
