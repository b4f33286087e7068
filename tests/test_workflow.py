"""The whole DAG through the real `snakemake` command on a tiny configuration (minutes, marked slow).

One run directory is shared by the tests of this module (run them in one process: `--dist loadfile`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from workflow_helpers import REPO, snakemake, source_lock, write_config

pytestmark = pytest.mark.slow

TARGET = "gen3_stratified_fpr.csv"
REPORT = "report/gen3_report.html"


def jobs_planned(result) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("workflow")
    run_dir = base / "results"
    cfg = write_config(base / "tiny.yaml", run_dir)
    result = snakemake(TARGET, REPORT, "--configfile", str(cfg))
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return base, run_dir, cfg


def test_dry_run_plans_without_running(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "results")
    result = snakemake(TARGET, "-n", "--configfile", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    planned = jobs_planned(result)  # the table alone: Gen3's scores only, no report
    assert planned["inject"] == 4 and planned["train"] == 3 and planned["infer"] == 2
    assert planned["manifest"] == planned["mine"] == planned["evaluate"] == 1 and "report" not in planned
    planned = jobs_planned(snakemake("-n", "--configfile", str(cfg)))  # the default target: + the report
    assert planned["infer"] == 3 and planned["evaluate"] == 2 and planned["report"] == 1
    assert planned["realcheck"] == 1  # the real check set (docs/realcheck.md), run even when its data is absent
    run_dir = tmp_path / "results"
    produced = [p for p in run_dir.rglob("*") if p.is_file() and ".snakemake" not in p.parts] if run_dir.exists() else []
    assert produced == []  # only Snakemake's own bookkeeping (.snakemake/) may appear


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_whole_dag_outputs_are_real(run):
    _, run_dir, _ = run
    for path in ["manifest/manifest.parquet", "runs/gen2/best.pt", "scores/gen2_parent_scores.parquet",
                 "hard_negs/gen2_top50k.parquet", "runs/gen3_stageA1/best.pt", "runs/gen3_stageA2/best.pt",
                 "scores/gen3_test_scores.parquet", TARGET, "report/gen3_report.html",
                 "audit/v4_sota.json", "audit/v4_sota_moffat.json"]:
        assert (run_dir / path).stat().st_size > 0, path
    manifest = pq.read_table(run_dir / "manifest/manifest.parquet")
    assert manifest.num_rows == 720 + 300  # + simulation.extra_test_controls, all controls in test regions
    extra = manifest.to_pandas().query("task_id >= 720")
    assert (extra.region_split == "test").all() and (extra.is_control == 1).all()
    # rendered only where a model is scored on the test split (Moffat); the Gaussian variant skips them
    for variant, n_extra in (("v4_sota_moffat", 300), ("v4_sota", 0)):
        test_ids = pq.read_table(run_dir / f"data/{variant}/region_split=test", columns=["task_id"])
        assert (test_ids.column("task_id").to_numpy() >= 720).sum() == n_extra, variant
    scores = pd.read_parquet(run_dir / "scores/gen3_test_scores.parquet")
    assert set(scores["is_control"]) == {0, 1} and scores["logit"].dtype == "float32"
    assert scores["logit"].nunique() > len(scores) // 2  # not a constant or saturated model
    table = pd.read_csv(run_dir / TARGET)
    assert {"stratum", "metric", "target", "value", "n_pos", "n_neg"} <= set(table.columns)
    assert table["value"].notna().any()
    assert (table.stratum == "arc_snr").any() and table.loc[table.stratum == "all", "mf_value"].notna().all()
    assert (run_dir / "gen3_stratified_fpr_completeness_snr.csv").stat().st_size > 0
    a2 = torch.load(run_dir / "runs/gen3_stageA2/best.pt", map_location="cpu", weights_only=False)
    a1 = torch.load(run_dir / "runs/gen3_stageA1/best.pt", map_location="cpu", weights_only=False)
    assert a2["meta_cols"] == ["psfsize_r", "psfdepth_r"] and a2["variant"] == "v4_sota_moffat"
    changed = [k for k in a1["state_dict"] if not torch.equal(a1["state_dict"][k], a2["state_dict"][k])]
    assert changed, "stage A2 did not train (weights identical to A1)"
    for stage in ("gen2", "gen3_stageA1", "gen3_stageA2"):
        assert (run_dir / "logs/train" / f"{stage}.log").stat().st_size > 0
        history = json.loads((run_dir / "runs" / stage / "history.json").read_text())
        assert isinstance(history, dict) and len(history["epochs"]) >= 1  # one shape: {"epochs": [...], ...}
    html = (run_dir / "report/gen3_report.html").read_text()
    assert html.count("<img") >= 4


def test_second_run_does_nothing(run):
    _, _, cfg = run
    result = snakemake(TARGET, "-n", "--configfile", str(cfg))
    assert result.returncode == 0
    assert jobs_planned(result) == {}, result.stdout[-3000:]


def test_ablation_retrains_only_gen3_on_the_base_runs_data(run, tmp_path):
    # tools/ablate.py: hard negatives off (weight 1) in a copy of the finished run, with a simulator source
    # newer than the base run's stamps (a later checkout): the stamps must still be reused, never re-simulated.
    import subprocess
    import sys

    import yaml

    _, run_dir, cfg = run
    base_ckpt = (run_dir / "runs/gen3_stageA2/best.pt").read_bytes()
    out = tmp_path / "nohn"
    code = REPO / "src/darkhaloscope/simulation/physics/lens.py"
    times = code.stat()
    # a newer mtime with the same content (no source_lock needed: Snakemake compares checksums)
    os.utime(code, (times.st_atime, max(times.st_mtime, time.time()) + 5))
    try:
        result = subprocess.run([sys.executable, str(REPO / "tools/ablate.py"), "--run_dir", str(run_dir),
                                 "--out_dir", str(out), "--configfile", str(cfg), "--name", "nohn", "--cores", "2",
                                 "--set", "gen3_a1.hard_neg_weight=1", "--set", "gen3_a2.hard_neg_weight=1"],
                                capture_output=True, text=True, cwd=REPO, timeout=900)
    finally:
        os.utime(code, (times.st_atime, times.st_mtime))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ran = jobs_planned(result)
    assert ran.get("train") == 2 and ran.get("infer") == 1 and ran.get("evaluate") == 1, ran
    assert not {"manifest", "inject", "audit", "mine"} & set(ran)
    # the stamps are read in place from the base run; Gen2 and the mined negatives are its copies; Gen3 is new
    assert not (out / "data").exists()
    used = yaml.safe_load((out / "ablation_config.yaml").read_text())["variants"]
    assert {v: Path(used[v]["existing"]) for v in used} == {v: run_dir / "data" / v for v in used}
    for shared in ("runs/gen2/best.pt", "hard_negs/gen2_top50k.parquet"):
        assert (run_dir / shared).read_bytes() == (out / shared).read_bytes()
    for stage in ("gen3_stageA1", "gen3_stageA2"):
        hist = json.loads((out / f"runs/{stage}/history.json").read_text())
        assert hist["hard_negatives"]["weight"] == 1.0 and hist["hard_negatives"]["n_matched"] > 0
    assert (run_dir / "runs/gen3_stageA2/best.pt").read_bytes() == base_ckpt  # the base run is untouched ...
    assert jobs_planned(snakemake(TARGET, "-n", "--configfile", str(cfg))) == {}  # ... also in Snakemake's records
    table = (out / "ablation.md").read_text()
    assert "| base |" in table and "| nohn |" in table
    bad = subprocess.run([sys.executable, str(REPO / "tools/ablate.py"), "--run_dir", str(run_dir),
                          "--out_dir", str(tmp_path / "x"), "--configfile", str(cfg), "--set", "gen3_a1.nope=1"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "gen3_a1.nope: no such key" in bad.stderr and not (tmp_path / "x").exists()
    bad = subprocess.run([sys.executable, str(REPO / "tools/ablate.py"), "--run_dir", str(run_dir),
                          "--out_dir", str(tmp_path / "x"), "--configfile", str(cfg), "--set", "simulation.n_tasks=9"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "needs a new workflow run" in bad.stderr and not (tmp_path / "x").exists()


def test_changing_a2_reruns_only_a2_and_downstream(run):
    base, run_dir, _ = run
    cfg2 = write_config(base / "tiny_a2.yaml", run_dir, {"gen3_a2": {"lr": 5.0e-5}})
    planned = jobs_planned(snakemake(TARGET, "-n", "--configfile", str(cfg2)))
    assert planned.get("train") == 1 and planned.get("infer") == 1 and planned.get("evaluate") == 1
    assert not {"manifest", "inject", "audit", "mine"} & set(planned)


def test_changing_simulation_reruns_everything_downstream(run):
    base, run_dir, _ = run
    cfg2 = write_config(base / "tiny_sim.yaml", run_dir, {"simulation": {"confuser_frac": 0.2}})
    planned = jobs_planned(snakemake(TARGET, "-n", "--configfile", str(cfg2)))
    assert planned.get("manifest") == 1 and planned.get("inject") == 4 and planned.get("train") == 3


def test_changing_simulator_code_reruns_everything_downstream(run):
    _, _, cfg = run
    code = REPO / "src/darkhaloscope/simulation/physics/lens.py"
    stat, original = code.stat(), code.read_bytes()
    with source_lock(exclusive=True):  # no workflow of another test file (another xdist worker) sees the edit
        try:
            os.utime(code, None)  # newer but identical: Snakemake compares checksums, so nothing reruns
            assert jobs_planned(snakemake(TARGET, "-n", "--configfile", str(cfg))) == {}
            code.write_bytes(original + b"\n# an edit of the simulator's code\n")
            planned = jobs_planned(snakemake(TARGET, "-n", "--configfile", str(cfg)))
        finally:
            code.write_bytes(original)
            os.utime(code, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert planned.get("manifest") == 1 and planned.get("inject") == 4 and planned.get("train") == 3


def test_interrupted_training_rule_resumes(run):
    base, run_dir, _ = run
    # A2 with 2 epochs, interrupted after a few optimiser steps by the training loop's test hook.
    cfg2 = write_config(base / "tiny_resume.yaml", run_dir, {"gen3_a2": {"epochs": 2}})
    shutil.rmtree(run_dir / "state/gen3_stageA2", ignore_errors=True)
    a2 = "runs/gen3_stageA2/best.pt"
    first = snakemake(a2, "--configfile", str(cfg2), env={"DHS_TRAIN_STOP_AFTER_STEPS": "3"})
    assert first.returncode != 0
    assert not (run_dir / "runs/gen3_stageA2/best.pt").exists()
    assert (run_dir / "state/gen3_stageA2/last.pt").exists()
    second = snakemake(a2, "--configfile", str(cfg2))
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    log = (run_dir / "logs/train/gen3_stageA2.log").read_text()
    assert "continuing the interrupted run" in log and "batch 2" in log  # last saved at step 2 of 3
    assert (run_dir / "runs/gen3_stageA2/best.pt").exists()


def test_existing_real_data_skips_simulation(tmp_path):
    from factory import write_fake_phase4c

    real = write_fake_phase4c(tmp_path / "phase4c_v4_sota", {"train": 16, "val": 8, "test": 8})
    cfg = write_config(tmp_path / "real.yaml", tmp_path / "results",
                       {"variants": {"v4_sota": {"existing": str(real)}}})
    result = snakemake(TARGET, "-n", "--configfile", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    planned = jobs_planned(result)
    assert planned["inject"] == 2 and planned["audit"] == 1  # only v4_sota_moffat is simulated
    assert f"--data {real}" in result.stdout  # Gen2 trains on the existing directory
    missing = write_config(tmp_path / "missing.yaml", tmp_path / "results",
                           {"variants": {"v4_sota": {"existing": str(tmp_path / "nowhere")}}})
    result = snakemake(TARGET, "-n", "--configfile", str(missing))
    assert result.returncode != 0 and "variants.v4_sota.existing" in result.stdout + result.stderr


def test_existing_gen2_checkpoint_skips_gen2_training(tmp_path):
    ckpt = tmp_path / "gen2_best.pt"
    ckpt.write_bytes(b"placeholder: a dry run only checks the plan")
    cfg = write_config(tmp_path / "gen2.yaml", tmp_path / "results", {"gen2": {"checkpoint": str(ckpt)}})
    result = snakemake(TARGET, "-n", "--configfile", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    planned = jobs_planned(result)
    assert planned["train"] == 2 and planned["use_existing_gen2"] == 1


def test_whole_workflow_on_the_stage4c_layout_local_and_s3(run, tmp_path, moto_s3):
    """The original pipeline's layout (tests/phase4c_layout.py: string ids, gzip parts with uuids, _SUCCESS,
    failed-cutout rows, extra columns) as `variants.*.existing`, one variant on a local directory and one on
    s3:// (moto): the workflow runs through and the stratified table has the same rows as on the
    simulator's own layout."""
    from phase4c_layout import write_phase4c_layout

    _, run_dir, _ = run
    local = write_phase4c_layout(run_dir / "data/v4_sota", tmp_path / "phase4c_v4_sota")
    moffat = write_phase4c_layout(run_dir / "data/v4_sota_moffat", tmp_path / "phase4c_v4_sota_moffat")
    uri = moto_s3.upload_dir(moffat, "phase4c_v4_sota_moffat")
    results = tmp_path / "results"
    cfg = write_config(tmp_path / "phase4c.yaml", results,
                       {"variants": {"v4_sota": {"existing": str(local)}, "v4_sota_moffat": {"existing": uri}}})
    result = snakemake(TARGET, "--configfile", str(cfg))
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert not (results / "data").exists() and not (results / "manifest").exists()  # nothing simulated
    pd.testing.assert_frame_equal(pd.read_csv(results / TARGET), pd.read_csv(run_dir / TARGET))
    hard = pq.read_table(results / "hard_negs/gen2_top50k.parquet")
    assert str(hard.schema.field("task_id").type) == "string" and hard.num_rows > 0
    assert all(t.startswith("v4sm_") for t in hard.column("task_id").to_pylist())
    history = json.loads((results / "runs/gen3_stageA1/history.json").read_text())
    assert history["hard_negatives"]["n_matched"] == hard.num_rows  # matched by string id
    assert history["cutout_failed"] == {"train": 3, "val": 3}
    log = (results / "logs/infer/gen3_test.log").read_text()
    assert "3 declared cutout failures (cutout_ok != 1) not scored; skipped 0 unscorable" in log
