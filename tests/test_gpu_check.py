"""benchmarks/gpu_check.py runs unchanged on a machine without a GPU, in its reduced mode, and says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from workflow_helpers import REPO, source_lock

pytestmark = pytest.mark.slow


def _gpu_check(tmp_path, *extra) -> tuple[dict, str]:
    out = tmp_path / "gpu_check.json"
    # its own process group, so that a timeout also ends the snakemake run it started
    with source_lock():  # it runs the workflow of this checkout (workflow_helpers.source_lock)
        proc = subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--workdir",
                                 str(tmp_path / "work"), "--reduced", *extra], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=2400)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, stdout[-5000:]
    return json.loads(out.read_text()), stdout


def test_gpu_check_reduced_mode_runs_every_step(tmp_path):
    res, stdout = _gpu_check(tmp_path)
    assert res["mode"] == "reduced" and res["sizes"]["arch"] == "convnext_atto"

    e2e = res["e2e"]
    assert e2e["ok"] and e2e["stamps_per_variant"] == 480
    run = tmp_path / "work/e2e"
    for target in e2e["targets"]:
        assert (run / target).stat().st_size > 0, target
    assert {"train/gen2", "train/gen3_stageA2", "evaluate/gen3"} <= set(e2e["rule_seconds"])
    # the throughput steps ran on the stamps the end-to-end run simulated
    assert res["data"] == str(run / "data/v4_sota_moffat")

    for key in ("train", "infer"):
        r = res[key]
        assert r["ok"] and r["pipeline_images_per_s"] > 0 and r["bare_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["pipeline_images_per_s"] / r["bare_images_per_s"], rel=0.01)
    assert res["infer"]["stamps"] > 0
    # two split sizes give the command's fixed cost and its per-stamp rate: t = fixed + n / rate, both splits
    inf = res["infer"]
    assert inf["train_split_stamps"] > inf["stamps"]
    if "marginal_images_per_s" in inf:  # absent only where the larger split did not take longer (noise)
        for n, t in ((inf["stamps"], inf["stamps"] / inf["pipeline_images_per_s"]),
                     (inf["train_split_stamps"], inf["train_split_s"])):
            assert inf["fixed_s"] + n / inf["marginal_images_per_s"] == pytest.approx(t, rel=0.02, abs=0.02)

    if not res["machine"]["gpus"]:
        assert res["torchrun"]["ok"] and "needs 2" in res["torchrun"]["skipped"]

    p = res["projection"]
    # config/full.yaml: 1.4M stamps x 0.7 train split, 6 epochs per stage, in the 6-hour budget
    assert p["full_recipe_train_stamps"] == 980_000
    assert p["images_per_s_needed"] == pytest.approx(6 * 980_000 / (6 * 3600), abs=0.1)
    # timm's ConvNeXt-Tiny is 4.5 GMAC at 224x224; at 64x64 that scales by (64/224)^2, and a training step
    # (forward + backward) costs ~3 forwards: ~2.2 GFLOP per image
    assert 1.5e9 < p["train_flops_per_image_convnext_tiny"] < 3.0e9
    assert p["hours_per_stage_at_measured_rate"] > 0 and p["meets_budget"] is False  # atto on CPU is no answer
    # the printed table names every step
    for label in ("end to end", "train images/s", "infer images/s", "torchrun", "needed for the budget"):
        assert label in stdout


def test_gpu_check_quality_mode_reduced_prints_the_seeds_headline(tmp_path):
    """--quality: config/full.yaml (grid_sota, focal Gen3, curriculum) trained, scored and evaluated; the headline
    is the 'all' rows of Gen3's and Gen2's stratified tables, the learning-curve point the training split's size."""
    import pandas as pd
    import pyarrow.parquet as pq

    res, stdout = _gpu_check(tmp_path, "--quality")
    assert res["mode"] == "quality reduced" and "e2e" not in res and "train" not in res
    q = res["quality"]
    assert q["ok"] and q["stamps_per_variant"] == 600 and q["extra_test_controls"] == 400
    assert q["epochs_per_stage"] == {"gen2": 1, "gen3_a1": 1, "gen3_a2": 1}
    run = tmp_path / "work/quality"
    cfg = (tmp_path / "work/quality.yaml").read_text()
    assert "source_priors: grid_sota" in cfg and "loss: focal" in cfg and "arch: convnext_atto" in cfg
    h = q["headline"]
    assert set(h) == {"tpr@fpr0.0001", "fpr@tpr0.85"}
    for model in ("gen3", "gen2"):
        df = pd.read_csv(run / f"{model}_stratified_fpr.csv")
        row = df[(df["stratum"] == "all") & (df["metric"] == "fpr@tpr") & (df["target"] == 0.85)].iloc[0]
        got = h["fpr@tpr0.85"][model]
        assert (got["value"], got["ci_low"], got["ci_high"]) == (row["value"], row["ci_low"], row["ci_high"])
        assert got["ci_low"] <= got["value"] <= got["ci_high"] and got["n_neg"] == row["n_neg"] < 10_000
        # fewer than 10^4 test controls cannot resolve FPR 1e-4: no value, said so, never a made-up number
        assert h["tpr@fpr0.0001"][model]["value"] is None and h["tpr@fpr0.0001"]["gen3_meets_claim"] is None
        assert h["fpr@tpr0.85"]["matched_filter"] == row["mf_value"]  # ~0 on grid_sota's bright arcs
    assert 0 <= h["fpr@tpr0.85"]["matched_filter"] < 1 and 0 < h["tpr@fpr0.0001"]["matched_filter"] <= 1
    assert h["fpr@tpr0.85"]["seed_claim_gen3"] == "< 0.001" and h["tpr@fpr0.0001"]["seed_gen2"] == 0.778
    lc = q["learning_curve"]
    n_train = sum(pq.ParquetFile(f).metadata.num_rows for f in (run / "data/v4_sota_moffat/region_split=train").glob("*.parquet"))
    assert lc["train_stamps_per_variant"] == n_train > 0 and lc["ci_low"] <= lc["gen3_auroc"] <= lc["ci_high"]
    for text in ("seed headline", "fpr@tpr0.85", "tpr@fpr0.0001", "not resolvable", "learning-curve point"):
        assert text in stdout
