"""Object storage as the run directory: the tiny workflow with every input and output under s3://dhs/run/,
through snakemake-storage-plugin-s3, against a local moto S3 server (a real S3 API, no network).

The switch is Snakemake's own: `--default-storage-provider s3 --default-storage-prefix s3://BUCKET/PREFIX`
(plus `--storage-s3-endpoint-url` for a non-AWS endpoint). The local `run_dir` then only holds Snakemake's
bookkeeping (.snakemake/: metadata, the transient local copies) and the resumable training state.
"""

from __future__ import annotations

import socket

import pytest
import yaml

from workflow_helpers import snakemake, write_config

pytestmark = [pytest.mark.slow, pytest.mark.s3]

TARGETS = ["gen3_stratified_fpr.csv", "gen3_stratified_fpr_auroc.csv", "gen3_stratified_fpr_completeness.csv",
           "report/gen3_report.html", "hard_negs/gen2_top50k.parquet"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
        s3.create_bucket(Bucket="dhs")
        yield endpoint, s3
    finally:
        server.stop()


def objects(s3, prefix: str) -> dict[str, object]:
    """Key (relative to prefix) -> LastModified, for every object under s3://dhs/<prefix>/."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="dhs", Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1:]] = (obj["LastModified"], obj["ETag"])
    return out


@pytest.fixture(scope="module")
def s3_run(moto, tmp_path_factory):
    endpoint, s3 = moto
    base = tmp_path_factory.mktemp("s3run")
    cfg = write_config(base / "tiny.yaml", base / "local")

    def run(*extra: str):
        args = ["--configfile", str(cfg), "--default-storage-provider", "s3",
                "--default-storage-prefix", "s3://dhs/run", "--storage-s3-endpoint-url", endpoint, *extra]
        return snakemake(*args, timeout=2400, env={"SNAKEMAKE_STORAGE_S3_ACCESS_KEY": "test",
                                     "SNAKEMAKE_STORAGE_S3_SECRET_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})

    first = run()
    assert first.returncode == 0, (first.stdout + first.stderr)[-6000:]
    return base, cfg, run, s3


def test_outputs_live_in_object_storage(s3_run):
    base, _, _, s3 = s3_run
    stored = objects(s3, "run")
    for key in TARGETS + ["manifest/manifest.parquet", "runs/gen3_stageA2/best.pt", "scores/gen3_test_scores.parquet",
                          "data/v4_sota_moffat/region_split=test/part-00001.parquet", "audit/v4_sota.json"]:
        assert key in stored, (key, sorted(stored))
    body = s3.get_object(Bucket="dhs", Key="run/gen3_stratified_fpr.csv")["Body"].read().decode()
    assert body.startswith("stratum,") and "tpr@fpr" in body
    html = s3.get_object(Bucket="dhs", Key="run/report/gen3_report.html")["Body"].read()
    assert b"<html" in html[:2000].lower() and len(html) > 10_000
    # logs and benchmarks are stored too, next to the outputs
    assert "logs/train/gen2.log" in stored and "benchmarks/train/gen2.tsv" in stored
    # nothing of the results is written to the local run directory outside Snakemake's bookkeeping and
    # the training state (state/<stage>/last.pt is deliberately outside the declared outputs)
    local = base / "local"
    stray = [p.relative_to(local) for p in local.rglob("*") if p.is_file()
             and p.relative_to(local).parts[0] not in (".snakemake", "state")]
    assert stray == []


def test_second_run_does_nothing(s3_run):
    _, _, run, _ = s3_run
    again = run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr


def test_config_change_reruns_only_what_depends_on_it(s3_run):
    base, cfg, run, s3 = s3_run
    before = objects(s3, "run")
    conf = yaml.safe_load(cfg.read_text())
    conf["gen3_a2"]["lr"] = conf["gen3_a2"]["lr"] * 0.5
    cfg.write_text(yaml.safe_dump(conf, sort_keys=False))
    result = run()
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    after = objects(s3, "run")
    rewritten = {k for k in before if after[k] != before[k]}
    assert {"runs/gen3_stageA2/best.pt", "scores/gen3_test_scores.parquet", "gen3_stratified_fpr.csv",
            "report/gen3_report.html"} <= rewritten
    reasons = "\n".join(line for line in (result.stdout + result.stderr).splitlines()
                         if line.strip().startswith(("rule ", "reason:", "localrule ")))
    for key in ("runs/gen3_stageA1/best.pt", "runs/gen2/best.pt", "scores/gen2_test_scores.parquet",
                "hard_negs/gen2_top50k.parquet", "manifest/manifest.parquet",
                "data/v4_sota_moffat/region_split=train/part-00000.parquet"):
        assert key not in rewritten, (key, reasons[-6000:])
