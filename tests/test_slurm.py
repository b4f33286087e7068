"""The SLURM profile on a real Slurm cluster: Debian's slurm-wlm and munge, brought up and down inside the test.

The tiny workflow configuration runs through `profiles/slurm` with snakemake-executor-plugin-slurm (one sbatch per
rule), and the test checks what a cluster user relies on: the targets, the partition / CPUs / memory / time limit /
GPUs each rule's job was given (as slurmctld recorded them), and that a job killed with `scancel` is reported
as failed, its Slurm log kept, and retried once (`retries: 1` in the profile) so the run still completes.

Command-line additions to the profile, each because of this one-node test cluster, not the workflow:
- `--slurm-status-command squeue`: the cluster has no slurmdbd, so `sacct` cannot answer; the plugin's squeue
  path needs a MinJobAge above 3x its first polling interval (the cluster sets 3600 s).
- `--slurm-init-seconds-before-status-checks 3`: poll soon, the jobs last seconds (default 40 s).
- `--set-threads train=2 infer=2`: the node claims 16 CPUs on a 2-core host; Slurm still records the profile's
  16 CPUs for `train` (cpus_per_task), the processes just do not start 16 OpenMP threads on 2 cores.
- `--slurm-logdir`: the per-job Slurm logs go under the test's directory instead of `.snakemake/slurm_logs/`
  in the directory snakemake was started from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, missing_tools
from workflow_helpers import REPO, SNAKEMAKE, source_lock, write_config

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

TARGETS = ["gen3_stratified_fpr.csv", "gen3_stratified_fpr_auroc.csv", "gen3_stratified_fpr_completeness.csv",
           "report/gen3_report.html", "hard_negs/gen2_top50k.parquet"]


def _minutes(limit: str) -> int:
    """Slurm's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def _megabytes(mem: str) -> int:
    """scontrol's memory (4000M, 125G, 1T) in MB."""
    return round(float(mem[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[mem[-1]])


@pytest.fixture
def cluster(tmp_path):
    if missing_tools():
        pytest.fail(f"Slurm is not installed ({', '.join(missing_tools())} missing): "
                    "apt-get install -y slurm-wlm munge (.ci/run does it)")
    with SlurmCluster(tmp_path / "slurm") as c:
        yield c
    assert not c.alive(), f"Slurm daemons left running: {c.alive()}"


def test_profile_runs_on_slurm_and_a_cancelled_job_is_retried(cluster, tmp_path):
    run_dir = tmp_path / "results"
    cfg = write_config(tmp_path / "config.yaml", run_dir)
    logdir = tmp_path / "slurm_logs"
    env = cluster.env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [SNAKEMAKE, "--configfile", str(cfg), "--profile", "profiles/slurm",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "3",
           "--slurm-logdir", str(logdir), "--set-threads", "train=2", "infer=2"]
    with source_lock():  # the workflow of this checkout runs (workflow_helpers.source_lock)
        log = open(tmp_path / "snakemake.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        cancelled = None
        try:
            # kill the Gen2 training job once it runs: Slurm reports it CANCELLED, the profile's `retries: 1` reruns it
            deadline = time.monotonic() + 2400  # a quiet 2-core machine needs ~5 min; a loaded one 3x that
            while cancelled is None and proc.poll() is None and time.monotonic() < deadline:
                for job in cluster.jobs():
                    if job["Comment"] == "rule_train_wildcards_gen2" and job["JobState"] == "RUNNING":
                        cluster.run("scancel", job["JobId"])
                        cancelled = job["JobId"]
                        break
                time.sleep(1)
            rc = proc.wait(timeout=max(60, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                subprocess.run(["scancel", "--user", str(os.getuid())], env=cluster.env(), check=False)
            log.close()
    out = (tmp_path / "snakemake.log").read_text()
    assert rc == 0, out[-6000:] + "\n" + cluster.logs()
    assert cancelled, "the gen2 training job never reached RUNNING"

    for target in TARGETS:
        assert (run_dir / target).stat().st_size > 0, target

    jobs = {j["JobId"]: j for j in cluster.jobs()}
    by_rule: dict[str, list[dict]] = {}
    for j in jobs.values():
        by_rule.setdefault(j["Comment"], []).append(j)

    # the cancelled job: Slurm says CANCELLED, Snakemake reported the error and kept its Slurm log, then reran it
    assert jobs[cancelled]["JobState"] == "CANCELLED"
    gen2 = sorted(by_rule["rule_train_wildcards_gen2"], key=lambda j: int(j["JobId"]))
    assert [j["JobState"] for j in gen2] == ["CANCELLED", "COMPLETED"], gen2
    assert "Error in rule train" in out and "SLURM" in out
    assert list(logdir.glob(f"rule_train/gen2/{cancelled}.log")), sorted(p.relative_to(logdir) for p in logdir.rglob("*"))
    # every other job ran once and completed
    assert all(j["JobState"] == "COMPLETED" for j in jobs.values() if j["JobId"] != cancelled)

    # what Slurm was asked for and gave, per rule: the profile's set-resources, else the rule's own resources
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    default, per_rule = profile["default-resources"], profile["set-resources"]
    expected = {
        "train": {"partition": "gpu", "cpus": 16, "mem_mb": 96000, "runtime": 1440, "gpus": 1},
        "infer": {"partition": "gpu", "cpus": 2, "mem_mb": 32000, "runtime": 240, "gpus": 1},
        "inject": {"partition": default["slurm_partition"], "cpus": 1, "mem_mb": 8000, "runtime": 240, "gpus": 0},
        "manifest": {"partition": "cpu", "cpus": 1, "mem_mb": 4000, "runtime": 30, "gpus": 0},
        "evaluate": {"partition": "cpu", "cpus": 1, "mem_mb": 4000, "runtime": 30, "gpus": 0},
    }
    for rule in ("train", "infer", "inject"):  # the table above is the profile's, read back from the file
        assert per_rule[rule]["mem_mb"] == expected[rule]["mem_mb"]
        assert per_rule[rule]["runtime"] == expected[rule]["runtime"]
    assert per_rule["train"]["cpus_per_task"] == 16 and per_rule["train"]["gpu"] == 1
    for rule, want in expected.items():
        mine = [j for comment, js in by_rule.items() if comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_")
                for j in js]
        assert mine, f"no Slurm job for rule {rule}: {sorted(by_rule)}"
        for j in mine:
            seen = {"partition": j["Partition"], "cpus": int(j["NumCPUs"]), "mem_mb": _megabytes(j["MinMemoryNode"]),
                    "runtime": _minutes(j["TimeLimit"]),
                    "gpus": int(j.get("TresPerJob", "gres:gpu:0").rsplit(":", 1)[-1]) if "gpu" in j.get("TresPerJob", "") else 0}
            assert seen == want, f"{j['Comment']} (job {j['JobId']}): Slurm saw {seen}, the profile says {want}"
    # one job per inject shard and variant, three training stages (gen2 twice)
    assert len([c for c in by_rule if c.startswith("rule_inject_")]) == 4
    assert {c for c in by_rule if c.startswith("rule_train_")} == {f"rule_train_wildcards_{s}" for s in
                                                                 ("gen2", "gen3_stageA1", "gen3_stageA2")}


def test_cluster_comes_up_and_goes_down(tmp_path):
    """The fixture's promise on its own: a job runs, it sees the GPU GRES it asked for, and no daemon survives."""
    if missing_tools():
        pytest.fail(f"Slurm is not installed ({', '.join(missing_tools())} missing)")
    with SlurmCluster(tmp_path / "slurm") as c:
        out = tmp_path / "job.out"
        jobid = c.run("sbatch", "--parsable", "-p", "gpu", "--gpus=1", "-c", "4", "--mem=1000", "-t", "5",
                      "-o", str(out), "--wrap", "echo CUDA=$CUDA_VISIBLE_DEVICES cpus=$SLURM_CPUS_PER_TASK").stdout.strip()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = {j["JobId"]: j["JobState"] for j in c.jobs()}.get(jobid)
            if state in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            time.sleep(0.5)
        assert state == "COMPLETED", c.logs()
        assert out.read_text().split() == ["CUDA=0", "cpus=4"]
        pids = [p.pid for p in c.procs.values()]
    assert not c.alive()
    for pid in pids:  # reaped, not merely signalled
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
