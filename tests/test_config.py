"""The config is validated against schemas/config.schema.yaml at parse time, with errors naming the key."""

import pytest
import yaml

from workflow_helpers import REPO, deep_update, snakemake, write_config


@pytest.mark.parametrize(
    "override, key",
    [
        ({"gen3_a1": {"focal_alpha": 2.0}}, "gen3_a1.focal_alpha"),
        ({"train": {"batch_size": "big"}}, "train.batch_size"),
        ({"gen3_a2": {"meta_cols": ["arc_snr"]}}, "gen3_a2.meta_cols.0"),
        ({"variants": {"v4_sota_moffat": {"psf_model": "airy"}}}, "variants.v4_sota_moffat.psf_model"),
        ({"eval": {"theta_bins": [1.0, 0.5, 2.0]}}, "eval.theta_bins"),
        ({"eval": {"snr_bins": [0, 20, 5]}}, "eval.snr_bins"),
        ({"simulation": {"extra_test_controls": -5}}, "simulation.extra_test_controls"),
        ({"simulation": {"split_fracs": [0.5, 0.3, 0.3]}}, "simulation.split_fracs"),
        ({"simulation": {"host_priors": "real"}}, "simulation.host_priors"),
        ({"mine": {"top_k": 5}}, "mine"),
        ({"simulation": {"source_clumps": {"max": -1}}}, "simulation.source_clumps.max"),
        ({"simulation": {"source_clumps": {"max": 4, "flux_frac": [0.1, 0.4]}}}, "simulation.source_clumps.flux_frac"),
        ({"simulation": {"source_clumps": {"sigma_arcsec": [0.1, 0.05]}}}, "simulation.source_clumps.sigma_arcsec"),
        ({"simulation": {"source_clumps": {"sigma_arcsec": [0.01, 0.05]}}}, "simulation.source_clumps.sigma_arcsec.0"),
        # files and models named by the config are checked at parse time (issue 9, defect 3)
        ({"gen2": {"checkpoint": "/nonexistent/gen2_best.pt"}}, "gen2.checkpoint"),
        ({"mine": {"known_lenses": "/nonexistent/lenses.csv"}}, "mine.known_lenses"),
        ({"train": {"arch": "convnext_atto --timm_kwargs {}"}}, "train.arch"),
        ({"train": {"arch": "no_such_net"}}, "train.arch"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(tmp_path, override, key):
    cfg = write_config(tmp_path / "bad.yaml", tmp_path / "run", override)
    result = snakemake("-n", "--configfile", str(cfg))
    assert result.returncode != 0
    assert f"invalid config key '{key}" in result.stderr + result.stdout
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_shipped_configs_are_valid(tmp_path):
    # medium and the seed_grid pair: overlays of config.yaml
    for name in ("config.yaml", "config/full.yaml", "config/medium.yaml", "config/seed_grid.yaml",
                 "config/seed_grid_exact.yaml"):
        cfg = yaml.safe_load((REPO / name).read_text())
        cfg["run_dir"] = str(tmp_path / name.replace("/", "_"))
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = snakemake("gen3_stratified_fpr.csv", "-n", "--configfile", str(path))
        assert result.returncode == 0, result.stderr[-2000:]


def test_full_config_is_the_seeds_recipe():
    full = yaml.safe_load((REPO / "config/full.yaml").read_text())
    assert full["train"]["arch"] == "convnext_tiny" and full["train"]["batch_size"] == 256
    assert full["train"]["use_bf16"] is True and full["train"]["dropout"] == 0.10
    assert full["train"].get("crop", 64) == 64 and full["train"].get("stem_stride", 4) == 4  # whole 64x64 stamps
    assert full["train"].get("rot180_residual", False) is False  # the seed's three bands, nothing more
    a1, a2 = full["gen3_a1"], full["gen3_a2"]
    assert (a1["epochs"], a1["lr"], a1["min_theta_over_psf"], a1["min_arc_snr"]) == (6, 3e-4, 0.80, 7.0)
    assert (a2["epochs"], a2["lr"], a2["min_theta_over_psf"], a2["min_arc_snr"]) == (6, 1e-4, 0.50, 3.0)
    assert a1["loss"] == a2["loss"] == "focal" and (a1["focal_alpha"], a1["focal_gamma"]) == (0.25, 2.0)
    assert a1["meta_cols"] == a2["meta_cols"] == ["psfsize_r", "psfdepth_r"]
    assert full["mine"]["topk"] == 50000 and full["mine"]["min_score"] == 0.90
    assert full["eval"]["theta_bins"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5]
    assert full["eval"]["res_bins"] == [0.5, 0.7, 0.9, 1.1, 1.4, 2.0]
    assert full["eval"]["fpr_targets"] == [1e-5, 1e-4, 1e-3, 1e-2]
    assert full["variants"]["v4_sota_moffat"] == {"psf_model": "moffat", "moffat_beta": 3.5, "existing": None}
    # the seed's data: grid_sota injections into the seed's n ~ 4 hosts (the demo draws DR10-like hosts)
    assert full["simulation"]["source_priors"] == "grid_sota" and full["simulation"]["host_priors"] == "sota"
    # one confuser rate in every split: the overlay must undo the demo's richer training split explicitly
    assert "train_confuser_frac" in full["simulation"] and full["simulation"]["train_confuser_frac"] is None


def test_seed_grid_overlays_are_the_seeds_population_under_two_recipes():
    """config/seed_grid.yaml: the demo's recipe on the seed's grid_sota sources, n ~ 4 hosts, bins and targets;
    config/seed_grid_exact.yaml: the same stamps under the seed's recipe scaled to the CPU (issue 30)."""
    load = lambda name: yaml.safe_load((REPO / name).read_text())  # noqa: E731
    demo, full = load("config.yaml"), load("config/full.yaml")
    grid = deep_update(demo, load("config/seed_grid.yaml"))
    exact = deep_update(demo, load("config/seed_grid_exact.yaml"))
    for cfg in (grid, exact):
        assert cfg["simulation"]["source_priors"] == full["simulation"]["source_priors"] == "grid_sota"
        assert cfg["simulation"]["host_priors"] == full["simulation"]["host_priors"] == "sota"
        assert cfg["eval"] == full["eval"] and cfg["variants"] == full["variants"]
        assert cfg["run_dir"] not in (demo["run_dir"], full["run_dir"])
    assert grid["simulation"] == exact["simulation"] and grid["seed"] == exact["seed"]  # the same stamps
    # the demo's recipe and budget, unchanged
    for key in ("train", "gen2", "gen3_a1", "gen3_a2", "infer", "mine"):
        assert grid[key] == demo[key], key
    seeds_own = ("source_priors", "host_priors", "realism")
    assert {k: v for k, v in grid["simulation"].items() if k not in seeds_own} == \
        {k: v for k, v in demo["simulation"].items() if k not in seeds_own}
    # the seed's own world: none of the real-sky effects the demo draws (docs/realism.md), as its claim was made
    assert demo["simulation"]["realism"] and grid["simulation"]["realism"] is None
    # the seed's recipe: whole stamps, the +-10 clip, three bands, a ConvNeXt, focal Gen3, independent Gen3, 1 view
    t = exact["train"]
    assert t["arch"].startswith("convnext") and t["crop"] == 64 and t["stretch"] == "clip"
    assert t["rot180_residual"] is False and exact["infer"]["tta"] == 1
    assert exact["gen3_a1"]["backbone_from_gen2"] is False and exact["gen2"]["loss"] == "bce"
    for stage in ("gen3_a1", "gen3_a2"):
        for key in ("loss", "focal_alpha", "focal_gamma", "min_theta_over_psf", "min_arc_snr", "meta_cols"):
            assert exact[stage][key] == full[stage][key], (stage, key)
    assert exact["gen3_a2"]["lr"] / exact["gen3_a1"]["lr"] == pytest.approx(full["gen3_a2"]["lr"] / full["gen3_a1"]["lr"],
                                                                           rel=0.02)


def test_config_values_reach_the_shell_quoted(tmp_path):
    """A value with a space and a ';' is one argument of the command, not two words and a second command."""
    known = tmp_path / "x y.csv; touch injected"
    known.write_text("ra,dec\n1.0,2.0\n")
    cfg = write_config(tmp_path / "q.yaml", tmp_path / "run", {"mine": {"known_lenses": str(known)}})
    result = snakemake("gen3_stratified_fpr.csv", "-n", "-p", "--configfile", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in (result.stdout + result.stderr).splitlines() if "dhs mine" in ln)
    assert f"--known_lenses '{known}'" in line


def test_schema_meta_cols_enum_is_the_contracts_allow_list():
    """The config schema lists the allowed meta columns so that a bad one is refused at parse time naming
    the key; `dhs train` refuses by stamps.contract.ALLOWED_META_COLUMNS. The two lists must be one."""
    from darkhaloscope.stamps.contract import ALLOWED_META_COLUMNS

    schema = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())
    enum = schema["$defs"]["meta_cols"]["items"]["enum"]
    assert len(enum) == len(set(enum)) and set(enum) == ALLOWED_META_COLUMNS


def test_the_schema_holds_the_late_flags_defaults_of_dhs_train():
    """The flags `dhs train` gained later are filled in from the schema's defaults (snakemake.utils.validate), left
    out of the command line at their CLI default, and out of the resume fingerprint: one set of defaults, in the
    schema, equal to the CLI's (learning.arguments, which the workflow imports without torch)."""
    import argparse

    from darkhaloscope.learning import train
    from darkhaloscope.learning.arguments import OPTIONAL_RESULT_ARGS

    schema = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())["properties"]["train"]["properties"]
    assert {k: schema[k]["default"] for k in OPTIONAL_RESULT_ARGS} == OPTIONAL_RESULT_ARGS
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    assert {k: parser.get_default(k) for k in OPTIONAL_RESULT_ARGS} == OPTIONAL_RESULT_ARGS
    assert "OPTIONAL_RESULT_ARGS" in (REPO / "rules/common.smk").read_text()
