"""Run the real `snakemake` command on a configuration derived from the repository's config.yaml."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

# The integration-test configuration: the demo's config with every size cut down to seconds.
TINY = {
    "simulation": {"n_tasks": 720, "n_shards": 2, "batch_size": 128, "extra_test_controls": 300},
    "audit": {"max_rows": 400, "on_fail": "warn"},
    "train": {"arch": "convnext_atto", "batch_size": 32, "save_every_steps": 2},
    "gen2": {"epochs": 1},
    "gen3_a1": {"epochs": 1},
    "gen3_a2": {"epochs": 1},
    "infer": {"batch_size": 128},
    "mine": {"topk": 50, "min_score": 0.5},
}


def deep_update(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in new.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: Path, run_dir: Path, *overrides: dict) -> Path:
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    for o in (TINY, *overrides):
        cfg = deep_update(cfg, o)
    cfg["run_dir"] = str(run_dir)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# The simulator's sources are inputs of the workflow (rules/common.smk: SIM_CODE), and the suite runs in two
# pytest-xdist workers: a test that edits one of them (test_workflow.py) must not do so while a workflow of
# another test file is being planned or run, or that run sees "updated input" and re-simulates everything
# (seen in CI: the object-storage rerun test rewrote every output). Every workflow run holds the lock shared,
# an edit holds it exclusively. flock, since the workers are separate processes; the lock file is per checkout.
_CHECKOUT = hashlib.sha1(str(REPO).encode()).hexdigest()[:12]
SOURCE_LOCK = Path(tempfile.gettempdir()) / f"darkhaloscope-tests-{_CHECKOUT}.lock"
_exclusive_here = False


@contextlib.contextmanager
def source_lock(exclusive: bool = False):
    """Hold the repository-sources lock: shared for a workflow run, exclusive for an edit of a source file.
    Re-entrant inside this process's exclusive hold (the editing test plans workflows while it holds it)."""
    global _exclusive_here
    if _exclusive_here:
        yield
        return
    with open(SOURCE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        _exclusive_here = exclusive
        try:
            yield
        finally:
            _exclusive_here = False
            fcntl.flock(handle, fcntl.LOCK_UN)


def snakemake(*args: str, env: dict | None = None, timeout: int | None = None) -> subprocess.CompletedProcess:
    """`snakemake ARGS` from the repository root (the default workflow profile supplies --cores), holding the
    sources lock shared. The timeout (900 s) can be raised with DHS_SNAKEMAKE_TIMEOUT on a loaded machine."""
    timeout = timeout or int(os.environ.get("DHS_SNAKEMAKE_TIMEOUT", "900"))
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    with source_lock():
        return subprocess.run([SNAKEMAKE, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
