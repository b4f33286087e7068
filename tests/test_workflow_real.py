"""config/real.yaml end to end through the real `snakemake` against the local fake cutout service
(127.0.0.1, simulator stamps as the 'real' sky; no network). Slow: it trains the three stages."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from fake_cutouts import FakeCutoutService, simulated_sky
from test_workflow import jobs_planned
from workflow_helpers import REPO, snakemake, write_config

pytestmark = pytest.mark.slow


def _real_config(tmp_path, **real_sky):
    real = yaml.safe_load((REPO / "config/real.yaml").read_text())
    real["real_sky"].update(real_sky)
    real["run_dir"] = str(tmp_path / "results")
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(real))
    return path


def test_real_config_dry_run_needs_no_network(tmp_path):
    real = yaml.safe_load((REPO / "config/real.yaml").read_text())
    assert real["real_sky"]["base_url"] == "https://www.legacysurvey.org"
    # the shipped paths name catalogues the user has to provide: the dry run says so in one line
    result = snakemake("-n", "--configfile", "config/real.yaml")
    assert result.returncode != 0
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if "invalid config key" in ln]
    assert len(lines) == 1 and "real_sky.hosts_catalog" in lines[0] and "catalogs/lrg_parent.parquet" in lines[0]
    # relative catalogue paths are read from the repository (where config.yaml and run_dir are resolved), never
    # from the run directory
    hosts, lenses = simulated_sky(4, seed=1)[0], simulated_sky(4, seed=2)[0]
    pq.write_table(hosts, tmp_path / "lrg.parquet")
    pq.write_table(lenses, tmp_path / "lenses.parquet")
    rel = os.path.relpath(tmp_path, REPO)
    cfg = _real_config(tmp_path, hosts_catalog=f"{rel}/lrg.parquet", lenses_catalog=f"{rel}/lenses.parquet")
    result = snakemake("-n", "-p", "--configfile", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    planned = jobs_planned(result)
    assert planned["cutouts"] == 2 and planned["recall"] == 1 and planned["manifest"] == 1
    assert planned["sky_scores"] == 1 and planned["candidates"] == 1 and "parent" not in planned  # no sweeps set
    assert f"--catalog {tmp_path / 'lrg.parquet'}" in result.stdout


def test_a_changed_catalogue_reruns_its_cutouts(tmp_path):
    """The catalogue is an input of the cutouts rule: new content at the same path reruns the job (and so
    everything downstream); an unchanged catalogue does not."""
    hosts, images, _, _ = simulated_sky(6, seed=4)
    pq.write_table(hosts, tmp_path / "lrg.parquet")
    pq.write_table(hosts.slice(0, 2), tmp_path / "lenses.parquet")
    with FakeCutoutService(images) as svc:
        cfg = _real_config(tmp_path, hosts_catalog=str(tmp_path / "lrg.parquet"), hosts_id_column="objid",
                           lenses_catalog=str(tmp_path / "lenses.parquet"), base_url=svc.base_url, retries=1)
        first = snakemake("sky/hosts", "--configfile", str(cfg))
        assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert jobs_planned(snakemake("-n", "sky/hosts", "--configfile", str(cfg))) == {}
    time.sleep(1.1)  # a later mtime, as a real re-fetch of the catalogue gives
    pq.write_table(hosts.slice(1), tmp_path / "lrg.parquet")  # other content at the same path
    again = snakemake("-n", "sky/hosts", "--configfile", str(cfg))
    assert again.returncode == 0 and jobs_planned(again) == {"cutouts": 1}, again.stdout[-2000:]


def test_real_sky_workflow_end_to_end(tmp_path):
    hosts, host_images, host_rows, _ = simulated_sky(400, seed=11)  # simulator controls as the parent sample
    lenses, lens_images, _, _ = simulated_sky(20, seed=12, control_frac=0.0)  # simulator lenses as known lenses
    lenses = lenses.rename_columns(["name", *lenses.column_names[1:]])
    lenses = lenses.append_column("grading", pa.array(["confident", "probable"] * 10))
    pq.write_table(hosts, tmp_path / "lrg.parquet")
    lens_path = tmp_path / "lenses.csv"
    lenses.to_pandas().to_csv(lens_path, index=False)
    run_dir = tmp_path / "results"
    with FakeCutoutService({**host_images, **lens_images}) as svc:
        real = yaml.safe_load((REPO / "config/real.yaml").read_text())["real_sky"]
        real.update(hosts_catalog=str(tmp_path / "lrg.parquet"), hosts_id_column="objid",
                    lenses_catalog=str(lens_path), base_url=svc.base_url, timeout=10, retries=2)
        cfg = write_config(tmp_path / "real.yaml", run_dir, {"real_sky": real, "train": {"batch_size": 64},
                                                                   "eval": {"fpr_targets": [0.01, 0.1]}})
        result = snakemake("--configfile", str(cfg), timeout=3000)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        n_requests = len(svc.requests)
    assert n_requests == 420  # one request per object
    # hosts: every catalogue row accounted for, ids kept
    sky = pads.dataset(run_dir / "sky/hosts", partitioning="hive").to_table()
    assert sky.num_rows == 400 and sorted(sky.column("task_id").to_pylist()) == sorted(hosts.column("objid").to_pylist())
    # the injected data: the hosts' pixels plus arcs, one task per host, the hosts' splits
    data = pads.dataset(run_dir / "data/v4_sota_moffat", partitioning="hive").to_table()
    assert data.num_rows == 400 and set(data.column("host_id").to_pylist()) == set(hosts.column("objid").to_pylist())
    split_of = dict(zip(sky.column("task_id").to_pylist(), sky.column("region_split").to_pylist()))
    assert all(split_of[h] == s for h, s in zip(data.column("host_id").to_pylist(),
                                                  data.column("region_split").to_pylist()))
    audit = json.loads((run_dir / "audit/v4_sota_moffat.json").read_text())
    assert audit  # the realism gates ran on the injected real hosts
    # the unchanged rest ran, and recall on the known lenses at the table's thresholds
    fpr = pd.read_csv(run_dir / "gen3_stratified_fpr.csv")
    recall = pd.read_csv(run_dir / "gen3_stratified_fpr_recall.csv")
    assert list(recall["grade"].unique()) == ["all", "confident", "probable"]
    all_rows = recall[recall["grade"] == "all"]
    assert (all_rows["n_lenses"] == 20).all()
    thr = fpr[(fpr["stratum"] == "all") & (fpr["metric"] == "tpr@fpr")].set_index("target")["threshold"]
    scores = pq.read_table(run_dir / "scores/known_lenses_scores.parquet").to_pandas()
    assert all_rows["recall"].notna().any()  # fpr 0.1 is estimable on the tiny test split
    for _, row in all_rows.iterrows():
        t = thr[row["fpr_target"]]
        if pd.isna(t):
            assert pd.isna(row["recall"])
        else:
            assert row["n_found"] == int((scores.loc[scores["scored"], "logit"] >= t).sum())
    assert np.isfinite(scores.loc[scores["scored"], "logit"]).all() and scores["scored"].sum() == 20
    assert "recall-found" in (run_dir / "report/recall.html").read_text() or \
        "recall-missed" in (run_dir / "report/recall.html").read_text()
    # the parent sample's candidates: every host scored (all splits, infer.tta views), the top 100 to grade
    sky_scores = pq.read_table(run_dir / "scores/sky_hosts_scores.parquet")
    assert sky_scores.num_rows == 400 and json.loads(sky_scores.schema.metadata[b"darkhaloscope.scoring"])["tta"] == 4
    cands = pd.read_csv(run_dir / "candidates/candidates.csv", keep_default_na=False)
    assert list(cands["rank"]) == list(range(1, 101)) and (cands["grade"] == "").all()
    assert 'class="card' in (run_dir / "candidates/candidates.html").read_text()
    # a second run does nothing and needs no service
    again = snakemake("-n", "--configfile", str(cfg))
    assert jobs_planned(again) == {}, again.stdout[-2000:]
