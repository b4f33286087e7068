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


# ---- host manifests: tied to their host dataset, free of known lenses -----------------------------------

def _hosts(svc, table, root, name="hosts", *extra):
    path = root / f"{name}.parquet"
    pq.write_table(table, path)
    assert _cutouts(svc, path, root / name, *extra) == 0
    return root / name


def test_inject_refuses_a_manifest_of_another_host_dataset(sky, tmp_path, capsys):
    cat, images, _, _ = sky
    with FakeCutoutService(images) as svc:
        hosts = _hosts(svc, cat, tmp_path)
        hm = tmp_path / "hm.parquet"
        assert main(["manifest", "--hosts", str(hosts), "--out", str(hm), "--exclude_radius_arcsec", "0"]) == 0
        _hosts(svc, cat.slice(1), tmp_path)  # the hosts re-fetched: another catalogue at the same path
    capsys.readouterr()
    before = checksums(tmp_path)
    rc = main(["inject", "--hosts", str(hosts), "--manifest", str(hm), "--out_dir", str(tmp_path / "inj")])
    assert rc == 2
    _one_line(capsys, "dhs manifest --hosts")
    assert kept(before, checksums(tmp_path)) and not (tmp_path / "inj").exists()


def test_known_lenses_are_left_out_of_the_hosts(sky, tmp_path, capsys):
    cat, images, rows, _ = sky
    lenses = tmp_path / "lenses.csv"  # two hosts are known lenses (1 arcsec off), one lens is elsewhere
    lenses.write_text("name,RA,DEC\nL1,%.7f,%.7f\nL2,%.7f,%.7f\nL3,10.0,-5.0\n"
                      % (rows["ra"][1], rows["dec"][1] + 1 / 3600, rows["ra"][4], rows["dec"][4]))
    with FakeCutoutService(images) as svc:
        hosts = _hosts(svc, cat, tmp_path)
    capsys.readouterr()
    hm = tmp_path / "hm.parquet"
    assert main(["manifest", "--hosts", str(hosts), "--out", str(hm), "--known_lenses", str(lenses)]) == 0
    assert "2 hosts within 3 arcsec of a known lens left out" in capsys.readouterr().out
    host_ids = set(pq.read_table(hm).column("host_id").to_pylist())
    names = cat.column("objid").to_pylist()
    assert host_ids == set(names) - {names[1], names[4]}


def test_a_known_lens_dataset_is_not_a_host_dataset(sky, tmp_path, capsys):
    cat, images, _, _ = sky
    with FakeCutoutService(images) as svc:
        lenses = _hosts(svc, cat, tmp_path, "lenses", "--label", "lens")
    capsys.readouterr()
    rc = main(["manifest", "--hosts", str(lenses), "--out", str(tmp_path / "hm.parquet")])
    assert rc == 2
    _one_line(capsys, "--label lens")
    assert not (tmp_path / "hm.parquet").exists()


def test_a_host_manifest_without_hosts_says_add_hosts(sky, tmp_path, capsys):
    cat, images, _, _ = sky
    with FakeCutoutService(images) as svc:
        hosts = _hosts(svc, cat, tmp_path)
    hm = tmp_path / "hm.parquet"
    assert main(["manifest", "--hosts", str(hosts), "--out", str(hm), "--exclude_radius_arcsec", "0"]) == 0
    capsys.readouterr()
    assert main(["inject", "--manifest", str(hm), "--out_dir", str(tmp_path / "inj")]) == 2
    _one_line(capsys, "add --hosts")
    assert not (tmp_path / "inj").exists()


# ---- dhs recall: its inputs are never overwritten, and its thresholds are read strictly ----------------------

def _table(path, thresholds, targets=None):
    import pandas as pd

    targets = targets or [0.01, 0.001][: len(thresholds)]
    pd.DataFrame({"stratum": "all", "metric": "tpr@fpr", "target": targets, "threshold": thresholds}).to_csv(
        path, index=False)
    return path


@pytest.mark.parametrize("flag", ["--out_csv", "--scores_out", "--report"])
def test_recall_refuses_to_write_onto_its_inputs(tmp_path, capsys, flag):
    csv = _table(tmp_path / "gen3_stratified_fpr.csv", [1.0, 2.0])
    data = tmp_path / "lenses"
    (data / "region_split=test").mkdir(parents=True)
    (data / "region_split=test" / "part-00000.parquet").write_bytes(b"not read")
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not read")
    target = {"--out_csv": csv, "--scores_out": data / "region_split=test" / "part-00000.parquet",
              "--report": ckpt}[flag]
    before = checksums(tmp_path)
    rc = main(["recall", "--data", str(data), "--ckpt", str(ckpt), "--stratified_csv", str(csv), flag, str(target)])
    assert rc == 2
    assert flag in _one_line(capsys, "refusing")
    assert kept(before, checksums(tmp_path))


def test_recall_thresholds_are_read_strictly(tmp_path):
    import math

    from darkhaloscope.errors import DHSError
    from darkhaloscope.sky.recall import operating_thresholds

    got = operating_thresholds(_table(tmp_path / "a.csv", ["inf", "-1.5"]))
    assert got[1][1] == math.inf  # dhs eval writes inf where no control lies above the cut: kept, not blank
    with pytest.raises(DHSError, match="repeats fpr target 0.01"):
        operating_thresholds(_table(tmp_path / "b.csv", [1.0, 2.0], [0.01, 0.01]))
    with pytest.raises(DHSError, match="threshold 'high' .* not a number"):
        operating_thresholds(_table(tmp_path / "c.csv", ["high", 2.0]))


def test_an_infinite_threshold_gives_recall_zero():
    import math

    import pandas as pd

    from darkhaloscope.sky.recall import recall_table

    lenses = pd.DataFrame({"grade": "all", "scored": [True] * 4, "logit": [1.0, 2.0, 3.0, 50.0]})
    t = recall_table(lenses, [(0.001, math.inf), (0.01, 2.5), (0.1, math.nan)], None).set_index("fpr_target")
    assert t.loc[0.001, "recall"] == 0 and t.loc[0.001, "n_found"] == 0 and t.loc[0.001, "ci_high"] > 0
    assert t.loc[0.01, "recall"] == 0.5 and math.isnan(t.loc[0.1, "recall"])
