"""docs/real_sky.md's walk-through, run exactly as written (parent -> cutouts -> score -> candidates against the
local stand-in service), with WORK and CKPT pointing at a temporary directory and a test checkpoint. Slow: it
renders and scores ~500 stamps in four views."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from test_infer import make_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    text = (REPO / "docs/real_sky.md").read_text()
    section = text.split("## Walk-through", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_walkthrough_runs_as_written(tmp_path):
    work = tmp_path / "work"
    ckpt = make_checkpoint(tmp_path / "best.pt")
    env = {**os.environ, "WORK": str(work), "CKPT": str(ckpt)}
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + walkthrough()
    res = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    parent = pd.read_parquet(work / "parent.parquet")
    assert len(parent) == 486 and parent["is_lrg_v1"].all()
    hosts = pads.dataset(work / "hosts", partitioning="hive").to_table()
    assert hosts.num_rows == 486 and sorted(hosts.column("task_id").to_pylist()) == sorted(parent["id"])
    scores = pq.read_table(work / "hosts_scores.parquet")
    assert scores.num_rows == 486  # every object has pixels from the stand-in service
    cands = pd.read_csv(work / "candidates.csv", keep_default_na=False)
    assert list(cands["rank"]) == list(range(1, 51)) and (cands["grade"] == "").all()
    assert (work / "candidates.html").stat().st_size > 50 * 4 * 500  # 200 inline images
    assert "50 candidates in" in res.stdout and "ungraded 50" in res.stdout
