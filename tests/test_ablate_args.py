"""tools/ablate.py's --set parsing (the workflow run it drives is tested in test_workflow.py)."""

import importlib.util
import math

import pytest

from workflow_helpers import REPO

spec = importlib.util.spec_from_file_location("ablate", REPO / "tools" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)


def test_set_key_parses_yaml_values_and_bare_exponent_numbers():
    cfg = {"gen2": {"lr": 1.0e-3, "loss": "bce", "meta_cols": []}, "train": {"arch": "convnext_atto"}}
    for assignment in ("gen2.lr=2e-3", "gen2.loss=focal", "gen2.meta_cols=[psfsize_r]", "train.arch=resnet10t"):
        ablate.set_key(cfg, assignment)
    # YAML 1.1 alone reads "2e-3" as a string, which the config schema refuses
    assert cfg["gen2"]["lr"] == 2e-3 and isinstance(cfg["gen2"]["lr"], float)
    assert cfg["gen2"]["loss"] == "focal" and cfg["gen2"]["meta_cols"] == ["psfsize_r"]
    assert cfg["train"]["arch"] == "resnet10t"
    ablate.set_key(cfg, "gen2.lr=.inf")
    assert math.isinf(cfg["gen2"]["lr"])


@pytest.mark.parametrize("assignment, message", [("gen2.lr", "is not KEY=VALUE"), ("gen9.lr=1", "'gen9' is not a section"),
                                                 ("gen2.epochs=3", "no such key")])
def test_set_key_refuses_what_is_not_in_the_config(assignment, message):
    with pytest.raises(SystemExit, match=message):
        ablate.set_key({"gen2": {"lr": 1e-3}}, assignment)


def test_model_label_never_holds_an_equals_sign():
    assert ablate.model_label(["gen2.lr=2e-3", "train.batch_size=128"]) == "gen2.lr:2e-3+train.batch_size:128"
    assert ablate.model_label(["gen2.lr=2e-3"], "fast") == "fast"
    with pytest.raises(SystemExit, match="contains '='"):
        ablate.model_label(["gen2.lr=2e-3"], "lr=2e-3")


def _finished_run(root):
    run = root / "results"
    (run / "scores").mkdir(parents=True)
    (run / "gen3_stratified_fpr.csv").write_text("x\n")
    (run / "scores" / "gen3_test_scores.parquet").write_bytes(b"x")
    (run / "data" / "v4_sota").mkdir(parents=True)
    (run / "data" / "v4_sota_moffat").mkdir(parents=True)
    return run


@pytest.mark.parametrize("case, message", [
    ("inside", "lies inside --run_dir"),
    ("bad_value", "gen3_a1.loss"),
    ("no_config", "--configfile"),
])
def test_ablate_refuses_before_copying(tmp_path, capsys, case, message):
    """Refused in one line before anything is copied: an --out_dir inside the base run (which would copy the run
    into itself), a --set value the config schema refuses, a missing --configfile."""
    run = _finished_run(tmp_path)
    out, argv = tmp_path / "ablate", ["--set", "gen3_a1.loss=bce"]
    if case == "inside":
        out = run / "ablation"
    elif case == "bad_value":
        argv = ["--set", "gen3_a1.loss=softmax"]
    else:
        argv += ["--configfile", str(tmp_path / "nope.yaml")]
    with pytest.raises(SystemExit) as exc:
        ablate.main(["--run_dir", str(run), "--out_dir", str(out), *argv])
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in run.iterdir()) == ["data", "gen3_stratified_fpr.csv", "scores"]
