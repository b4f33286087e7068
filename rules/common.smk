# Helpers shared by the rules: config validation, run-directory layout, and argument builders.
# Rules stay declarative; anything computed from the config is computed here.
import os
import shlex
import sys
from pathlib import Path

import jsonschema
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(workflow.basedir)
sys.path.insert(0, str(REPO / "src"))  # the workflow's own package (also without an install)

from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation.strata import parse_bins
from darkhaloscope.learning.arguments import OPTIONAL_RESULT_ARGS
from darkhaloscope.simulation.draws import ClumpPrior, ClumpPriorError
from darkhaloscope.simulation.manifest import parse_split_fracs

SPLITS = ["train", "val", "test"]
VARIANTS = ["v4_sota", "v4_sota_moffat"]


def validate_config(cfg, schema_path):
    """Validate against the JSON schema and fill in its defaults (snakemake.utils.validate); the error names the
    offending key path."""
    try:
        validate(cfg, str(schema_path))
    except WorkflowError as exc:
        err = exc.__context__  # validate raises while handling jsonschema's error, which has the key path
        if not isinstance(err, jsonschema.ValidationError):
            raise
        key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        raise WorkflowError(f"invalid config key '{key}': {err.message}") from None
    for section in ("gen2", "gen3_a2"):
        if cfg[section].get("backbone_from_gen2"):
            raise WorkflowError(f"invalid config key '{section}.backbone_from_gen2': only gen3_a1 can start from Gen2's "
                                "backbone")
    # the cross-field rules are the package's own (one place, one behaviour): dhs eval and dhs manifest apply
    # the same ones to their flags
    for key in ("theta_bins", "res_bins", "snr_bins"):
        try:
            parse_bins(cfg["eval"].get(key) or [0, 1], "bins", open_top=key == "snr_bins")
        except DHSError as exc:
            raise WorkflowError(f"invalid config key 'eval.{key}': {exc}")
    try:
        parse_split_fracs(cfg["simulation"]["split_fracs"], "fractions")
    except DHSError as exc:
        raise WorkflowError(f"invalid config key 'simulation.split_fracs': {exc}")
    clumps = cfg["simulation"].get("source_clumps")
    if clumps:
        d = ClumpPrior()
        try:
            ClumpPrior(clumps.get("max", d.max), tuple(clumps.get("flux_frac", d.flux_frac)),
                       tuple(clumps.get("sigma_arcsec", d.sigma_arcsec)), clumps.get("radius_reff", d.radius_reff)).check()
        except ClumpPriorError as exc:
            raise WorkflowError(f"invalid config key 'simulation.source_clumps.{exc.field}': {exc}")


def check_config_files(cfg):
    """Keys that name files or models are checked now, at parse time, not by a job (or never)."""
    for section, key, what in (("gen2", "checkpoint", "an existing Gen2 checkpoint"),
                               ("mine", "known_lenses", "a known-lens catalogue")):
        path = cfg[section].get(key)
        if path is not None and not Path(path).is_file():
            raise WorkflowError(f"invalid config key '{section}.{key}': {path} is not a file ({what} is expected)")
    import timm  # the architecture is whatever timm knows; ask it

    arch = cfg["train"]["arch"]
    if not timm.is_model(arch):
        raise WorkflowError(f"invalid config key 'train.arch': '{arch}' is not a timm model name")


validate_config(config, REPO / "schemas" / "config.schema.yaml")
check_config_files(config)

RUN_DIR = config["run_dir"] if os.path.isabs(config["run_dir"]) else str(REPO / config["run_dir"])
N_SHARDS = config["simulation"]["n_shards"]
SHARDS = [f"{i:05d}" for i in range(N_SHARDS)]

# The simulator's code is an input of the simulation rules, so editing it reruns everything downstream.
# local(): with a default storage provider (object storage as the run directory) these stay repository files.
SIM_CODE = sorted(
    local(str(p))
    for p in [*(REPO / "src/darkhaloscope/simulation").rglob("*.py")]
    + [REPO / "src/darkhaloscope" / f
       for f in ("stamps/contract.py", "data/dr10_conditions.json", "data/dr10_parent_sample.json",
                 "data/dr10_noise_acf.json")]
    if p.exists()
)

# Training stages: run directory -> config section, data variant, extra inputs.
STAGES = {
    "gen2": {"section": "gen2", "variant": "v4_sota"},
    "gen3_stageA1": {"section": "gen3_a1", "variant": "v4_sota_moffat", "hard_negs": "hard_negs/gen2_top50k.parquet"},
    "gen3_stageA2": {"section": "gen3_a2", "variant": "v4_sota_moffat", "hard_negs": "hard_negs/gen2_top50k.parquet",
                     "init_from": "runs/gen3_stageA1/best.pt"},
}

# Demo budgets: Gen3 A1 may start its image backbone from Gen2's best.pt (gen3_a1.backbone_from_gen2); its
# meta MLP and head start fresh, since Gen2 has no meta inputs.
if config["gen3_a1"].get("backbone_from_gen2"):
    STAGES["gen3_stageA1"]["init_backbone_from"] = "runs/gen2/best.pt"
WARM_STARTS = ("hard_negs", "init_from", "init_backbone_from")

# Score files: name -> (checkpoint, variant, split).
SCORES = {
    "gen2_parent": ("runs/gen2/best.pt", "v4_sota", "train"),
    "gen2_test": ("runs/gen2/best.pt", "v4_sota_moffat", "test"),
    "gen3_test": ("runs/gen3_stageA2/best.pt", "v4_sota_moffat", "test"),
}
# Variants whose test split some model is scored on: only these render the manifest's extra test-only controls.
TEST_VARIANTS = sorted({variant for _, variant, split in SCORES.values() if split == "test"})
# Models evaluated on the test split (`dhs eval` -> <model>_stratified_fpr*.csv); the first is the report's primary.
MODELS = ["gen3", "gen2"]


def infer_flags(name):
    """`dhs infer` flags of a score file. Test-split scores (the models' evaluation): infer.tta views (1, the CLI
    default, is left out of the command line, which Snakemake compares, so runs made before the key existed
    stay up to date). The mining scores of the training split: one view, controls only (mining ranks controls)."""
    if SCORES[name][2] == "test":
        return flag("tta", config["infer"].get("tta"), default=1)
    return "--only_controls"


def existing(variant):
    return config["variants"][variant].get("existing")


def data_root(variant, input_files):
    """The Phase 4c root a job reads: the existing data's path, else the directory holding the job's shard inputs
    (`<root>/region_split=<split>/part-<shard>.parquet`). Taken from the job's input paths rather than written
    out, so it is right also when the run directory is object storage and the inputs are local copies
    under .snakemake/storage/."""
    if existing(variant):
        return existing(variant)
    return str(Path(input_files[0]).parents[1])


def data_files(variant, splits=SPLITS):
    """Files a job must wait for: the simulated shards, or nothing for existing data (local or s3://)."""
    path = existing(variant)
    if path:
        if not path.startswith("s3://") and not Path(path).is_dir():
            raise WorkflowError(f"invalid config key 'variants.{variant}.existing': no directory {path}")
        return []
    return expand("data/{variant}/region_split={split}/part-{shard}.parquet", variant=variant, split=splits, shard=SHARDS)


def audit_file(variant):
    return [] if existing(variant) else [f"audit/{variant}.json"]


def flag(name, value, default=None):
    """Render one CLI flag: booleans as switches, lists comma-joined, None omitted. The value is
    shell-quoted (shlex.quote): a config value is one argument, never a second word or command.
    ``default``: the CLI's own default of a flag added later, omitted when the value equals it, so the
    command lines (which Snakemake compares) of runs made before the flag existed stay the same."""
    if value is None or value is False or (default is not None and value == default):
        return ""
    if value is True:
        return f"--{name}"
    if isinstance(value, (list, tuple)):
        return f"--{name} {shlex.quote(','.join(str(v) for v in value))}" if value else ""
    return f"--{name} {shlex.quote(str(value))}"


def clump_args(sim):
    """`dhs manifest` flags of simulation.source_clumps; none when it is absent or off (max 0)."""
    c = sim.get("source_clumps") or {}
    if not c.get("max"):
        return []
    return [flag(f"source_clumps_{k}", c[k]) for k in ("max", "flux_frac", "sigma_arcsec", "radius_reff")]


def realism_args(sim):
    """`dhs manifest` flags of simulation.realism; none when it is absent (every effect off)."""
    r = sim.get("realism") or {}
    return [flag(k, r.get(k)) for k in ("companion_rate", "train_companion_rate", "correlated_noise", "psf_shape",
                                        "bad_pixel_rate", "train_centre_jitter_px")]


def train_args(stage):
    """All `dhs train` flags of a stage, from the shared `train` section and the stage's own section."""
    t, s = config["train"], config[STAGES[stage]["section"]]
    keys = ["arch", "stem_stride", "crop", "batch_size", "weight_decay", "dropout", "use_bf16", "augment", "num_workers", "seed", "save_every_steps",
            "val_every", "stretch", "rot180_residual"]
    # stem_stride, crop: optional (the CLI defaults). The flags added later (val_every, stretch, rot180_residual:
    # the schema's defaults fill them in) are left out at their CLI default, as the resume fingerprint leaves them
    # out, so that the command lines of runs made before them stay the same.
    args = [flag(k, t.get(k), default=OPTIONAL_RESULT_ARGS.get(k)) for k in keys]
    args += [flag(k, s.get(k)) for k in ("epochs", "lr", "loss", "focal_alpha", "focal_gamma",
                                          "min_theta_over_psf", "min_arc_snr", "meta_cols", "hard_neg_weight")]
    args.append(flag("variant", STAGES[stage]["variant"]))
    return " ".join(a for a in args if a)


def train_launcher():
    """`dhs train` on CPU or one GPU; torchrun (DDP, one process per GPU) when more than one GPU is given."""
    gpus = config["train"]["gpus"]
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m darkhaloscope train"
    return "dhs train"


def stage_inputs(wildcards):
    st = STAGES[wildcards.stage]
    inputs = {"data": data_files(st["variant"], ["train", "val"]), "audit": audit_file(st["variant"])}
    for key in WARM_STARTS:
        if key in st:
            inputs[key] = st[key]
    return inputs


def stage_extra(wildcards, input):
    st = STAGES[wildcards.stage]
    return " ".join(flag(k, input[k]) for k in WARM_STARTS if k in st)


# ----------------------------------------------------------------------------------------------------
# The real sky (config `real_sky`, e.g. config/real.yaml): DR10 cutouts of a host catalogue replace the
# simulated scenes (arcs are injected into the real pixels), and known-lens cutouts give `recall`.
# ----------------------------------------------------------------------------------------------------
REAL = config.get("real_sky") or None
SKY_SAMPLES = {"hosts": ("hosts_catalog", "hosts_id_column", "control"),
               "lenses": ("lenses_catalog", "lenses_id_column", "lens")}


def hosts_input():
    """The host cutouts that the manifest and inject rules read ([] for simulated hosts)."""
    return ["sky/hosts"] if REAL else []


def hosts_flag():
    return "--hosts sky/hosts" if REAL else ""


def known_lens_flags():
    """`dhs manifest --hosts`: the known lenses left out of the hosts, mining's catalogue (mine.known_lenses, else
    lenscat) and the real-sky lens catalogue, within mining's exclusion radius."""
    if not REAL:
        return ""
    known = [config["mine"].get("known_lenses") or "lenscat"]
    if REAL.get("lenses_catalog"):
        known.append(sky_catalog("lenses"))
    return " ".join([*(flag("known_lenses", k) for k in known),
                     flag("exclude_radius_arcsec", config["mine"]["exclude_radius_arcsec"])])


def sky_catalog(sample):
    """The catalogue of a sky sample as the job reads it: `dhs parent`'s output (run-directory relative) when the
    hosts come from sweep files, s3:// and other URIs unchanged, a local path absolute."""
    if sample == "hosts" and from_sweeps():
        return PARENT
    path = str(REAL[SKY_SAMPLES[sample][0]])
    if "://" in path:
        return path
    return os.path.normpath(path if os.path.isabs(path) else REPO / path)


def sky_catalog_input(sample):
    """The catalogue as a declared input (local files only: a URI is read by the job itself, not tracked)."""
    if sample == "hosts" and from_sweeps():
        return [PARENT]  # a job's output, tracked by the workflow
    path = sky_catalog(sample)
    return [] if "://" in path else [local(path)]


def check_sky_catalogs():
    """Every configured local catalogue exists, checked at parse time: `snakemake -n` fails in one line."""
    for sample, (key, _, _) in SKY_SAMPLES.items():
        if not REAL.get(key) or (sample == "hosts" and from_sweeps()):
            continue
        path = sky_catalog(sample)
        if "://" not in path and not Path(path).is_file():
            raise WorkflowError(f"invalid config key 'real_sky.{key}': {path} is not a file (a {sample} catalogue "
                                f"is expected; relative paths are read from {REPO})")


def manifest_args():
    sim = config["simulation"]
    if REAL:  # one task per usable host: no n_tasks; confusers and neighbours are whatever the sky has
        keys = ("control_frac", "source_priors")
    else:
        keys = ("n_tasks", "control_frac", "split_fracs", "source_priors", "host_priors", "confuser_frac")
    args = [flag(k, sim[k]) for k in keys] + [flag("seed", config["seed"])] + clump_args(sim) + [hosts_flag(), known_lens_flags()]
    if not REAL:  # test-only controls (the 1e-4 operating point needs >= 10^4 of them)
        args.append(flag("extra_test_controls", sim.get("extra_test_controls") or None))
        args.append(flag("train_confuser_frac", sim.get("train_confuser_frac")))
        args += realism_args(sim)
    return " ".join(a for a in args if a)


PARENT = "sky/parent.parquet"  # `dhs parent`'s output: the host catalogue when real_sky.sweeps is set


def from_sweeps():
    return bool(REAL and REAL.get("sweeps"))


def parent_args():
    """`dhs parent` flags: every sweep path or glob one shell-quoted argument."""
    sweeps = REAL["sweeps"] if isinstance(REAL["sweeps"], list) else [REAL["sweeps"]]
    return " ".join(["--sweeps", *(shlex.quote(str(s)) for s in sweeps), flag("selection", REAL.get("selection")),
                     flag("exclude_psf", REAL.get("exclude_psf"))])


def candidate_args():
    cand = REAL.get("candidates") or {}
    return " ".join(flag(k, cand.get(k)) for k in ("top_n", "dedup_arcsec", "match_arcsec", "known_lenses"))


def cutout_args(sample):
    """`dhs cutouts` flags of one sample (hosts or lenses)."""
    catalog_key, id_key, label = SKY_SAMPLES[sample]
    args = [flag("catalog", sky_catalog(sample)), flag("id_column", REAL.get(id_key)), flag("label", label),
            flag("base_url", REAL["base_url"]), flag("split_fracs", config["simulation"]["split_fracs"])]
    args += [flag(k, REAL[k]) for k in ("concurrency", "timeout", "retries", "max_fetch_fail_frac", "tractor_url")
             if k in REAL]
    return " ".join(a for a in args if a)


def real_targets():
    """Extra default targets of a real-sky run: the candidates of the parent sample to grade, and recall on
    known lenses when a lens catalogue is given."""
    targets = ["candidates/candidates.csv", "candidates/candidates.html"] if REAL else []
    if REAL and REAL.get("lenses_catalog"):
        targets += ["gen3_stratified_fpr_recall.csv", "report/recall.html"]
    return targets


# ----------------------------------------------------------------------------------------------------
# The real check set (config `realcheck`, docs/realcheck.md): real galaxies and lens candidates scored by every
# model at its simulated thresholds. The pixels are fetched (scripts/fetch_realcheck.py), not committed: when
# the directory is absent the rule still runs and its outputs say so. A relative path is the repository's.
# ----------------------------------------------------------------------------------------------------
REALCHECK = config.get("realcheck") or None


def realcheck_data():
    path = Path(REALCHECK["data"])
    return path if path.is_absolute() else REPO / path


def realcheck_input():
    """The check set as an input when it exists (so fetching it re-runs the rule), else nothing."""
    return [str(realcheck_data())] if realcheck_data().is_dir() else []


def realcheck_targets():
    return ["realcheck.csv", "report/realcheck.html"] if REALCHECK else []
