"""The `dhs` console command: a thin dispatcher over the package's step modules.

Every subcommand lives in one module that exposes ``add_arguments(parser)`` and ``run(args)``.
Modules are imported lazily so that ``dhs eval`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from darkhaloscope.errors import DHSError

# subcommand -> (module, one-line help). The seed's scripts map onto these names:
# phase5_train_fullscale_gh200_v2.py -> train, phase5_infer_scores_v2.py -> infer,
# phase5_mine_hard_negatives.py -> mine, phase5_eval_stratified_fpr.py -> eval,
# spark_phase4_pipeline.py --stage 4a/4c -> manifest/inject.
COMMANDS: dict[str, tuple[str, str]] = {
    "manifest": ("darkhaloscope.simulation.manifest",
                 "Phase 4a: write the task manifest with every random draw frozen"),
    "inject": ("darkhaloscope.simulation.inject", "Phase 4c: render one shard of stamps to Hive-partitioned parquet"),
    "audit": ("darkhaloscope.simulation.audit", "Realism gates: core-only and metadata-only AUC before training"),
    "train": ("darkhaloscope.learning.train", "Train a lens classifier (Gen2 baseline or a Gen3 curriculum stage)"),
    "infer": ("darkhaloscope.evaluation.infer", "Score a split with a checkpoint and write a score parquet"),
    "mine": ("darkhaloscope.evaluation.mine", "Mine hard negatives from a score parquet, excluding known lenses"),
    "eval": ("darkhaloscope.evaluation.evaluate", "Stratified tpr@fpr / fpr@tpr table with confidence intervals"),
    "report": ("darkhaloscope.evaluation.report",
               "One offline HTML page (ROC curves, dhs eval's tables and completeness maps, galleries)"),
    "parent": ("darkhaloscope.sky.parent", "Phase 3: the LRG parent sample (v1..v5 selections) from DR10 sweep files"),
    "cutouts": ("darkhaloscope.sky.cutouts", "Phase 3 on the real sky: DR10 grz cutouts of a catalogue"),
    "recall": ("darkhaloscope.sky.recall", "Recall on real known lenses at the evaluation's thresholds"),
    "realcheck": ("darkhaloscope.sky.realcheck",
                  "The real check set (real galaxies and lens candidates) at the simulated thresholds"),
    "candidates": ("darkhaloscope.sky.candidates",
                   "The top-N real-sky scores as a CSV to grade and an HTML gallery; --grades reads the grades back"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dhs", description="darkhaloscope lens-finder workflow steps")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        rc = module.run(args)
    except DHSError as exc:
        print(f"dhs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: one line, no traceback; outputs are atomic, nothing half-written
        print(f"dhs {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
