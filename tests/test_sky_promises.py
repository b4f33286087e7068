"""What the real-sky commands promise about files (docs/promises.md): nothing they did not create is deleted or
changed, bad requests are refused before any fetch, and leftovers of killed runs are cleaned. Every data-loss case
checksums every pre-existing file around the run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from darkhaloscope.cli import main
from fake_cutouts import FakeCutoutService, simulated_sky

FAST = ["--timeout", "2", "--retries", "1", "--backoff", "0.01", "--no_progress"]


@pytest.fixture(scope="module")
def sky():
    return simulated_sky(6, seed=5)


def checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kept(before: dict, after: dict) -> bool:
    """Every file that existed before is still there with the same content."""
    return all(after.get(k) == v for k, v in before.items())


def _one_line(capsys, word: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and word in err, err
    return err


@pytest.fixture
def setup(sky, tmp_path):
    cat, images, _, _ = sky
    pq.write_table(cat, tmp_path / "cat.parquet")
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path, images


def _cutouts(svc, catalog, out_dir, *extra):
    return main(["cutouts", "--catalog", str(catalog), "--out_dir", str(out_dir), "--base_url", svc.base_url,
                 "--id_column", "objid", *FAST, *extra])


@pytest.mark.parametrize("case", ["foreign", "holds_catalogue", "dot", "sub_dotdot", "holds_cache", "is_catalogue",
                                  "is_a_file"])
def test_cutouts_never_touch_what_they_did_not_create(setup, case, capsys, monkeypatch):
    root, images = setup
    monkeypatch.chdir(root)
    (root / "sub").mkdir()
    catalog, extra = root / "cat.parquet", []
    if case == "foreign":
        out = root / "mine"
        out.mkdir()
        (out / "results.csv").write_text("a,b\n1,2\n")
    elif case == "holds_catalogue":
        out = root / "data"
        out.mkdir()
        catalog = out / "cat.parquet"
        catalog.write_bytes((root / "cat.parquet").read_bytes())
    elif case == "dot":
        out = Path(".")
    elif case == "sub_dotdot":
        out = Path("sub/..")
    elif case == "holds_cache":
        out, extra = root / "out", ["--cache_dir", str(root / "out" / "cache")]
        out.mkdir()
    elif case == "is_catalogue":
        out = catalog
    else:
        out = root / "notes.txt"
    before = checksums(root)
    with FakeCutoutService(images) as svc:
        rc = _cutouts(svc, catalog, out, *extra)
        n_requests = len(svc.requests)
    assert rc == 2
    _one_line(capsys, "--out_dir")
    assert n_requests == 0  # refused before any fetch
    assert kept(before, checksums(root))


def test_cutouts_replace_only_their_own_output(setup, capsys):
    root, images = setup
    out = root / "cutouts"
    with FakeCutoutService(images) as svc:
        assert _cutouts(svc, root / "cat.parquet", out) == 0
        first = pads.dataset(out, partitioning="hive").to_table()
        before = {k: v for k, v in checksums(root).items() if not k.startswith("cutouts/")}
        assert _cutouts(svc, root / "cat.parquet", out) == 0  # its own previous output (marker) is replaced
    assert kept(before, checksums(root))
    assert pads.dataset(out, partitioning="hive").to_table().num_rows == first.num_rows == 6
    (root / "empty").mkdir()
    with FakeCutoutService(images) as svc:  # an empty directory is fine too
        assert _cutouts(svc, root / "cat.parquet", root / "empty") == 0


def test_cutouts_remove_their_own_stale_temporaries_only(setup):
    root, images = setup
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = root / f".cutouts.tmp-{dead.pid}"
    (ours / "region_split=train").mkdir(parents=True)
    (ours / ".dhs-cutouts").write_text("{}")
    foreign = root / f".cutouts.tmp-{dead.pid + 100000}"  # the same name pattern, no marker: not ours
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    live = root / f".cutouts.tmp-{os.getppid()}"  # a live writer's temporary stays
    live.mkdir()
    (live / ".dhs-cutouts").write_text("{}")
    with FakeCutoutService(images) as svc:
        assert _cutouts(svc, root / "cat.parquet", root / "cutouts") == 0
    assert not ours.exists() and (foreign / "x.txt").read_text() == "keep" and live.exists()
