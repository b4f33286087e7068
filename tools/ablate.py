"""One Gen3 ablation from a finished workflow run: the same workflow, one configuration change, the rest reused.

    python tools/ablate.py --run_dir results --out_dir results_ablate/bce \\
        --set gen3_a1.loss=bce --set gen3_a2.loss=bce [--configfile config.yaml] [--cores 2]

The finished run directory is copied without its simulated stamps and the Gen3 training state (as real
copies, so the base run is never written), and Snakemake is run in the copy with the base configuration plus
the ``--set`` changes, each variant's ``existing:`` pointing at the base run's stamps (read in place, never
re-simulated: Snakemake reruns a rule whose inputs are newer than its outputs, and a checkout newer than the
base run has newer simulator sources). Snakemake's own rerun rules then retrain exactly what the changes
touch (e.g. Gen3 A1 and A2, their test scores and the tables): the simulated data, Gen2 and the mined hard
negatives are the base run's, so the ablation and the base share their data, their test split and their
seeds. Changes to ``simulation.*`` or ``variants.*`` need a new workflow run and are refused. Ablations of the
seed's Gen3 ingredients at the demo budget (docs/finder.md):

    focal vs BCE         --set gen3_a1.loss=focal --set gen3_a2.loss=focal   (or =bce)
    curriculum off       --set gen3_a1.min_theta_over_psf=0 --set gen3_a1.min_arc_snr=0
                         --set gen3_a2.min_theta_over_psf=0 --set gen3_a2.min_arc_snr=0
    hard negatives off   --set gen3_a1.hard_neg_weight=1 --set gen3_a2.hard_neg_weight=1

(weight 1 makes the mined controls ordinary training controls). Prints the finder tables of the base and
the ablated Gen3 (tools/finder_table.py) and saves them as ``<out_dir>/ablation.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGET = "gen3_stratified_fpr.csv"
# Gen2's tables too: a change to Gen2 (train.*, gen2.*) retrains it for the mining that Gen3 reads, and its own
# test scores must follow, or the copy keeps the base run's Gen2 tables beside the new Gen2 (nothing when
# only Gen3 changes: Snakemake finds them up to date).
TARGETS = (TARGET, "gen2_stratified_fpr.csv")
GEN3_SCORES = "scores/gen3_test_scores.parquet"
# Not carried into the copy: Gen3's resumable training state (an ablation trains Gen3 afresh) and
# Snakemake's locks and incomplete-job markers.
SKIP = ("data", "state/gen3_stageA1", "state/gen3_stageA2", ".snakemake/locks", ".snakemake/incomplete")
# The data's sections: an ablation reuses the base run's stamps, so these cannot change.
DATA_SECTIONS = ("simulation", "variants")


def set_key(cfg: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML; a number such as 2e-3 is a number) to the nested config, in place."""
    if "=" not in assignment:
        sys.exit(f"ablate: error: --set {assignment!r} is not KEY=VALUE")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        if not isinstance(node.get(part), dict):
            sys.exit(f"ablate: error: --set {key}: '{part}' is not a section of the configuration")
        node = node[part]
    if leaf not in node:
        sys.exit(f"ablate: error: --set {key}: no such key in the configuration")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads 2e-3 (no dot) as a string; the config schema wants a number
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    node[leaf] = parsed


def check_config(cfg: dict) -> None:
    """The changed configuration against the workflow's schema (schemas/config.schema.yaml), before anything is
    copied: a value Snakemake would refuse is one line now, not a copied run and a failed workflow later."""
    import jsonschema

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(e.path))
    if errors:
        key = ".".join(str(p) for p in errors[0].absolute_path) or "(top level)"
        sys.exit(f"ablate: error: invalid config key '{key}': {errors[0].message}")


def read_config(path: str) -> dict:
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        sys.exit(f"ablate: error: --configfile {path} cannot be read: {exc.strerror or type(exc).__name__}")
    except yaml.YAMLError as exc:
        sys.exit(f"ablate: error: --configfile {path} is not YAML ({type(exc).__name__})")
    if not isinstance(cfg, dict):
        sys.exit(f"ablate: error: --configfile {path} is not a configuration (a YAML mapping)")
    return cfg


def copy_run(src: Path, dst: Path) -> None:
    """Copy the run directory without ``SKIP`` (the stamps are read in place through ``existing:``), as real
    copies, because Snakemake edits some files in place (its ``.snakemake`` metadata, logs and benchmark
    tables), which must not reach the base run. ``shutil.copy2`` keeps file times, which Snakemake compares."""

    def ignore(folder, names):
        rel = Path(folder).relative_to(src)
        return [n for n in names if str(rel / n) in SKIP]

    shutil.copytree(src, dst, copy_function=shutil.copy2, ignore=ignore, symlinks=True)


def reuse_base_data(cfg: dict, run_dir: Path) -> None:
    """Point every simulated variant at the base run's stamps (``existing:``); real data stays where it is."""
    for name, variant in cfg["variants"].items():
        if not variant.get("existing"):
            path = run_dir / "data" / name
            if not path.is_dir():
                sys.exit(f"ablate: error: {run_dir} has no simulated data for variant {name} ({path})")
            variant["existing"] = str(path)


def model_label(sets, name=None) -> str:
    """The ablated model's label in the tables: --name, else the changes as key:value joined by "+".
    finder_table reads LABEL=PATH, so a label holds no "="."""
    if name and "=" in name:
        sys.exit(f"ablate: error: --name {name!r} contains '='; the tables read LABEL=PATH")
    return name or "+".join(s.replace("=", ":", 1) for s in sets)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", required=True, help="a finished workflow run directory (the base)")
    p.add_argument("--out_dir", required=True, help="new directory for the ablated run (must not exist)")
    p.add_argument("--configfile", default=str(REPO / "config.yaml"), help="the base run's configuration")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="configuration change, e.g. gen3_a1.loss=bce (repeatable)")
    p.add_argument("--name", default=None, help="label of the ablated model in the tables")
    p.add_argument("--cores", default="all")
    args = p.parse_args(argv)

    run_dir, out_dir = Path(args.run_dir).resolve(), Path(args.out_dir).resolve()
    if not (run_dir / TARGET).is_file() or not (run_dir / GEN3_SCORES).is_file():
        sys.exit(f"ablate: error: {run_dir} is not a finished run (no {TARGET} or {GEN3_SCORES})")
    if out_dir.exists():
        sys.exit(f"ablate: error: {out_dir} exists; give a new --out_dir")
    if run_dir in out_dir.parents:  # the copy would copy itself, recursively
        sys.exit(f"ablate: error: --out_dir {out_dir} lies inside --run_dir {run_dir}; put the ablation beside it")
    name = model_label(args.sets, args.name)
    if not args.sets:
        sys.exit("ablate: error: nothing to ablate: give at least one --set KEY=VALUE")
    cfg = read_config(args.configfile)
    for s in args.sets:
        if s.split(".", 1)[0] in DATA_SECTIONS:
            sys.exit(f"ablate: error: --set {s}: an ablation reuses the base run's data; a change to "
                     f"{'/'.join(DATA_SECTIONS)} needs a new workflow run")
        set_key(cfg, s)
    reuse_base_data(cfg, run_dir)
    cfg["run_dir"] = str(out_dir)
    check_config(cfg)

    copy_run(run_dir, out_dir)
    config_path = out_dir / "ablation_config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    # Only configuration changes rerun a job (and what consumes its outputs): a checkout newer than the base
    # run (the simulator's sources are inputs of the simulation rules) must not re-simulate the base's data.
    cmd = [snakemake, *TARGETS, "--configfile", str(config_path), "--cores", str(args.cores), "--rerun-triggers", "params"]
    print("ablate:", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        sys.exit(f"ablate: error: snakemake failed (exit {rc}); see {out_dir}/logs")

    spec = importlib.util.spec_from_file_location("finder_table", REPO / "tools" / "finder_table.py")
    finder_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finder_table)
    return finder_table.main(["--scores", f"base={run_dir / GEN3_SCORES}", "--scores", f"{name}={out_dir / GEN3_SCORES}",
                              "--json", str(out_dir / "ablation.json"), "--md", str(out_dir / "ablation.md")])


if __name__ == "__main__":
    sys.exit(main())
