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


def test_gpu_check_reduced_mode_runs_every_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    # its own process group, so that a timeout also ends the snakemake run it started
    with source_lock():  # it runs the workflow of this checkout (workflow_helpers.source_lock)
        proc = subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--workdir",
                                 str(tmp_path / "work"), "--reduced"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=2400)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 0, stdout[-5000:]
    res = json.loads(out.read_text())
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
