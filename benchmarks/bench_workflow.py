#!/usr/bin/env python3
"""Time the demo workflow end to end and per rule (from Snakemake's benchmark files).

    python benchmarks/bench_workflow.py                 # runs the README's demo targets in a fresh run dir
    python benchmarks/bench_workflow.py --run_dir results --no-run   # only summarise an existing run

Prints a per-rule table (wall seconds summed over the rule's jobs, max RSS) and the end-to-end wall time, and
saves them to benchmarks/out/workflow.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def per_rule(run_dir: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted((run_dir / "benchmarks").rglob("*.tsv")):
        rel = tsv.relative_to(run_dir / "benchmarks")
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        bench = pd.read_csv(tsv, sep="\t")
        rows.append({"rule": rule, "job": str(rel.with_suffix("")), "s": float(bench["s"].iloc[0]),
                     "max_rss_mb": float(pd.to_numeric(bench["max_rss"], errors="coerce").iloc[0])})
    jobs = pd.DataFrame(rows)
    return jobs.groupby("rule").agg(jobs=("job", "count"), wall_s=("s", "sum"), max_rss_mb=("max_rss_mb", "max"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", default=str(REPO / "benchmarks/out/demo_run"))
    ap.add_argument("--configfile", default=str(REPO / "config.yaml"))
    ap.add_argument("--no-run", dest="run", action="store_false")
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    total = None
    if args.run:
        cfg = yaml.safe_load(Path(args.configfile).read_text())
        cfg["run_dir"] = str(run_dir)
        cfg_path = REPO / "benchmarks/out/bench_config.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        snakemake = str(Path(sys.executable).with_name("snakemake"))
        subprocess.run([snakemake, "gen3_stratified_fpr.csv", "report/gen3_report.html", "--cores", "all",
                        "--configfile", str(cfg_path)], cwd=REPO, check=True)
        total = time.perf_counter() - t0
    table = per_rule(run_dir)
    print(table.to_string(float_format=lambda v: f"{v:.1f}"))
    if total is not None:
        print(f"end to end: {total:.0f} s")
    out = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
           "end_to_end_s": total, "per_rule": table.reset_index().to_dict(orient="records")}
    (REPO / "benchmarks/out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks/out/workflow.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
