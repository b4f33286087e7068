"""Defects a hostile run found (issue 9): each case is a one-line error (or a counted warning), never a
traceback, a clobbered input or a silently wrong number."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from factory import fake_rows, write_fake_phase4c
from test_infer import make_checkpoint

from darkhaloscope import cli
from darkhaloscope.io import atomic_output
from darkhaloscope.learning.checkpoint import save_checkpoint

TINY = '{"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}'


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hostile_ckpt") / "best.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake_phase4c(tmp_path_factory.mktemp("hostile_data"), {"train": 40, "val": 24, "test": 24})


def _err(capsys, argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, lines[-1] if lines else ""


def _one_line_error(capsys, argv, word):
    rc, last = _err(capsys, argv)
    assert rc == 2 and last.startswith(f"dhs {argv[0]}: error:") and word in last, last
    return last


def _scores(path, n=40, **cols):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"task_id": np.arange(n, dtype=np.int64), "ra": rng.uniform(0, 10, n),
                       "dec": rng.uniform(0, 10, n), "is_control": (np.arange(n) % 2).astype(np.int32),
                       "logit": rng.normal(size=n).astype(np.float32), "theta_e_arcsec": rng.uniform(0.5, 2, n),
                       "psfsize_r": rng.uniform(1, 1.5, n)})
    for k, v in cols.items():
        df[k] = v
    df.to_parquet(path, index=False)
    return path


def _train_argv(data, out, *extra):
    return ["train", "--data", data, "--out_dir", out, "--arch", "convnext_atto", "--epochs", "1",
            "--batch_size", "16", "--timm_kwargs", TINY, *extra]


# 1. duplicate task ids ------------------------------------------------------------------------------

def test_duplicate_task_ids_are_refused(tmp_path, ck, capsys):
    d = tmp_path / "dup" / "region_split=test"
    d.mkdir(parents=True)
    t = fake_rows(12, "test", seed=1).drop(["region_split"])
    pq.write_table(t, d / "part-00000.parquet")
    pq.write_table(t.slice(0, 5), d / "part-00001.parquet")  # a stale shard beside the new one
    _one_line_error(capsys, ["infer", "--data", tmp_path / "dup", "--ckpt", ck, "--out", tmp_path / "s.parquet"],
                    "5 row(s) repeat a task_id")
    assert not (tmp_path / "s.parquet").exists()
    scores = _scores(tmp_path / "dup.parquet", task_id=np.r_[np.arange(39), 0])
    _one_line_error(capsys, ["eval", "--scores", scores, "--out_csv", tmp_path / "t.csv"], "repeat a task_id")
    assert not (tmp_path / "t.csv").exists()
    # a validation split of one repeated id gave "AUROC nan -> new best.pt" and exit 0
    v = tmp_path / "valdup"
    (v / "region_split=train").mkdir(parents=True)
    (v / "region_split=val").mkdir(parents=True)
    pq.write_table(fake_rows(20, "train", seed=2).drop(["region_split"]), v / "region_split=train/part-0.parquet")
    val = fake_rows(6, "val", seed=3, start_id=100).drop(["region_split"])
    val = val.set_column(0, "task_id", pa.array([100] * 6, pa.int64()))
    pq.write_table(val, v / "region_split=val/part-0.parquet")
    _one_line_error(capsys, _train_argv(v, tmp_path / "o"), "repeat a task_id")
    assert not (tmp_path / "o" / "best.pt").exists()


def test_mine_refuses_a_task_mined_twice(tmp_path, capsys):
    ids = np.r_[np.arange(39), 1]  # row 39 repeats control 1 with the same logit
    logit = np.linspace(-1, 1, 40).astype(np.float32)
    logit[39] = logit[1]
    scores = _scores(tmp_path / "s.parquet", task_id=ids, logit=logit)
    _one_line_error(capsys, ["mine", "--scores", scores, "--out", tmp_path / "h.parquet", "--min_score", "0",
                             "--exclude_radius_arcsec", "0"], "repeat a task_id")


# 2. an output onto an input -------------------------------------------------------------------------

def test_output_onto_an_input_is_refused(tmp_path, data, ck, capsys):
    scores = _scores(tmp_path / "s.parquet")
    before = scores.read_bytes()
    _one_line_error(capsys, ["infer", "--data", data, "--ckpt", ck, "--out", data / "region_split=test" / "x.parquet"],
                    "inside --data")
    _one_line_error(capsys, ["mine", "--scores", scores, "--out", scores, "--min_score", "0"], "same file as --scores")
    _one_line_error(capsys, ["eval", "--scores", scores, "--out_csv", scores], "same file as --scores")
    _one_line_error(capsys, ["report", "--scores", f"a={scores}", "--tables", f"a={tmp_path / 't.csv'}", "--out", scores],
                    "same file as --scores")
    assert scores.read_bytes() == before and not (tmp_path / "t.csv").exists()


# 5. one line instead of a traceback ------------------------------------------------------------------

def test_unwritable_outputs_fail_before_any_work(tmp_path, data, ck, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "sub" / "out"  # a folder under a regular file cannot be created
    scores = _scores(tmp_path / "s.parquet")
    cases = [["train", "--data", data, "--out_dir", bad, "--arch", "convnext_atto", "--timm_kwargs", TINY],
             ["infer", "--data", data, "--ckpt", ck, "--out", bad],
             ["mine", "--scores", scores, "--out", bad],
             ["eval", "--scores", scores, "--out_csv", bad],
             ["audit", "--data", data, "--out", bad],
             ["report", "--scores", f"a={scores}", "--tables", f"a={tmp_path / 't.csv'}", "--out", bad],
             ["manifest", "--out", bad, "--n_tasks", "10"]]
    for argv in cases:
        _one_line_error(capsys, argv, "cannot be written")
    _one_line_error(capsys, ["infer", "--data", data, "--ckpt", ck, "--out", tmp_path], "is a directory")


def test_bad_numbers_and_models_are_one_line(tmp_path, data, capsys):
    for extra, word in ((["--dropout", "2"], "--dropout"), (["--lr", "nan"], "--lr"),
                        (["--hard_neg_weight", "-1"], "--hard_neg_weight"), (["--hard_neg_weight", "nan"], "--hard_neg_weight"),
                        (["--max_skip_frac", "-1"], "--max_skip_frac")):
        _one_line_error(capsys, _train_argv(data, tmp_path / "o", *extra), word)
    argv = ["train", "--data", data, "--out_dir", tmp_path / "o", "--arch", "convnext_atto", "--timm_kwargs",
            '{"depths": [1, 1]}']
    _one_line_error(capsys, argv, "does not accept")
    assert not (tmp_path / "o" / "best.pt").exists()


def test_infer_device_and_checkpoint_problems(tmp_path, data, ck, capsys):
    out = tmp_path / "s.parquet"
    base = ["infer", "--data", data, "--out", out]
    _one_line_error(capsys, [*base, "--ckpt", ck, "--device", "bogus"], "not a device name")
    if not torch.cuda.is_available():
        _one_line_error(capsys, [*base, "--ckpt", ck, "--device", "cuda"], "no CUDA GPU")
    _one_line_error(capsys, [*base, "--ckpt", tmp_path], "is a directory")
    raw = torch.load(ck, weights_only=True)
    for name, edit, word in (("kw.pt", lambda c: c["model_kwargs"].update(dropout=7.0), "dropout"),
                             ("kw2.pt", lambda c: c["model_kwargs"].update(timm_kwargs={"depths": [1]}), "does not accept"),
                             ("std.pt", lambda c: c.update(meta_std=[0.0, 0.4]), "meta_std"),
                             ("leak.pt", lambda c: c.update(meta_cols=["psfsize_r", "arc_snr"]), "arc_snr")):
        c = {k: v for k, v in raw.items() if k != "format"}
        c["model_kwargs"] = dict(c["model_kwargs"])
        edit(c)
        save_checkpoint(tmp_path / name, **c)
        _one_line_error(capsys, [*base, "--ckpt", tmp_path / name], word)
    assert not out.exists()


def test_a_file_lacking_a_column_names_the_file(tmp_path, capsys):
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / f"region_split={split}").mkdir(parents=True)
        pq.write_table(fake_rows(16, split, seed=1).drop(["region_split"]), root / f"region_split={split}/part-0.parquet")
    second = fake_rows(16, "train", seed=2, start_id=500).drop(["region_split", "psfdepth_r"])
    pq.write_table(second, root / "region_split=train/part-1.parquet")
    last = _one_line_error(capsys, _train_argv(root, tmp_path / "o", "--meta_cols", "psfsize_r,psfdepth_r"),
                           "psfdepth_r")
    assert "part-1.parquet" in last


def test_mine_nan_positions_with_a_known_lens_file(tmp_path, caplog):
    known = tmp_path / "k.csv"
    known.write_text("ra,dec\n5.0,5.0\n")
    ra = np.full(40, np.nan)
    scores = _scores(tmp_path / "s.parquet", ra=ra)
    caplog.set_level(logging.INFO, logger="dhs.mine")
    assert cli.main(["mine", "--scores", str(scores), "--out", str(tmp_path / "h.parquet"), "--min_score", "0",
                     "--known_lenses", str(known)]) == 0
    assert "20 without ra/dec" in caplog.text and pq.read_metadata(tmp_path / "h.parquet").num_rows == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_of_infer_is_one_line(tmp_path, ck):
    # 4000 rows: scoring takes tens of seconds, so a loaded machine cannot finish before the signal lands
    big = write_fake_phase4c(tmp_path / "big", {"test": 4000}, files_per_split=2)
    out = tmp_path / "s.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "darkhaloscope", "infer", "--data", str(big), "--ckpt", str(ck),
                             "--out", str(out), "--batch_size", "4"], stderr=subprocess.PIPE, text=True,
                            # pytest-xdist workers ignore SIGINT and a child inherits that (Python then installs no
                            # KeyboardInterrupt handler); a user's shell gives dhs the default disposition
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".s.parquet.tmp-*")):
        assert proc.poll() is None, "finished before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "dhs infer: interrupted"
    assert not out.exists() and not list(tmp_path.glob(".s.parquet.tmp-*"))


# 6. silent wrong results ------------------------------------------------------------------------------

def test_int16_stamps_are_bad_stamps_not_zeros(tmp_path, ck, capsys):
    d = tmp_path / "d" / "region_split=test"
    d.mkdir(parents=True)
    t = fake_rows(20, "test", seed=1).drop(["region_split"])
    buf = io.BytesIO()
    np.savez(buf, **{f"image_{b}": np.ones((64, 64), np.int16) for b in "grz"})
    blobs = t.column("stamp_npz").to_pylist()
    blobs[3] = buf.getvalue()
    t = t.set_column(t.schema.get_field_index("stamp_npz"), "stamp_npz", pa.array(blobs, pa.binary()))
    pq.write_table(t, d / "part-0.parquet")
    assert cli.main(["infer", "--data", str(tmp_path / "d"), "--ckpt", str(ck), "--out", str(tmp_path / "s.parquet"),
                     "--max_skip_frac", "0.1"]) == 0
    assert pq.read_metadata(tmp_path / "s.parquet").num_rows == 19


def test_mine_refuses_what_eval_refuses(tmp_path, capsys):
    cases = [(dict(is_control=np.where(np.arange(40) % 2, "1", "0")), "is_control has type"),
             (dict(logit=np.r_[np.full(39, 0.5), np.nan].astype(np.float32)), "non-finite"),
             (dict(dec=np.full(40, 120.0)), "dec outside"),
             (dict(theta_e_arcsec=np.full(40, -1.0)), "negative")]
    for i, (cols, word) in enumerate(cases):
        scores = _scores(tmp_path / f"s{i}.parquet", **cols)
        _one_line_error(capsys, ["mine", "--scores", scores, "--out", tmp_path / "h.parquet", "--min_score", "0",
                                 "--exclude_radius_arcsec", "0"], word)
        _one_line_error(capsys, ["eval", "--scores", scores, "--out_csv", tmp_path / "t.csv"], word)
    scores = _scores(tmp_path / "ok.parquet")
    _one_line_error(capsys, ["eval", "--scores", scores, "--out_csv", tmp_path / "t.csv", "--theta_bins=-1,0.5,1"],
                    "must be >= 0")


def test_nan_meta_values_are_counted_in_a_warning(tmp_path, ck, caplog):
    d = tmp_path / "d" / "region_split=test"
    d.mkdir(parents=True)
    t = fake_rows(20, "test", seed=1).drop(["region_split"])
    psf = t.column("psfsize_r").to_numpy().copy()
    psf[[2, 5]] = np.nan
    t = t.set_column(t.schema.get_field_index("psfsize_r"), "psfsize_r", pa.array(psf))
    pq.write_table(t, d / "part-0.parquet")
    caplog.set_level(logging.INFO, logger="dhs.infer")
    assert cli.main(["infer", "--data", str(tmp_path / "d"), "--ckpt", str(ck), "--out", str(tmp_path / "s.parquet")]) == 0
    assert "2 meta value(s) (psfsize_r,psfdepth_r) were NaN/inf" in caplog.text


# 7. the report validates every input before writing ---------------------------------------------------

def test_report_writes_nothing_when_an_input_is_bad(tmp_path, capsys):
    scores = _scores(tmp_path / "s.parquet")
    tables = tmp_path / "t.csv"
    assert cli.main(["eval", "--scores", str(scores), "--out_csv", str(tables)]) == 0
    report = ["report", "--scores", f"gen3={scores}", "--tables", f"gen3={tables}", "--out", tmp_path / "r.html"]
    _one_line_error(capsys, [*report, "--scores", f"gen2={tmp_path / 'missing.parquet'}", "--tables", f"gen2={tables}"],
                    "missing.parquet")
    bad = _scores(tmp_path / "bad.parquet", logit=np.full(40, np.nan, np.float32))
    _one_line_error(capsys, [*report, "--scores", f"gen2={bad}", "--tables", f"gen2={tables}"], "non-finite")
    assert not (tmp_path / "r.html").exists()


# 8. temporaries of dead runs are cleaned ---------------------------------------------------------------

def test_a_rerun_removes_temporaries_of_dead_runs(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "scores.parquet"
    stale = tmp_path / f".scores.parquet.tmp-{dead.pid}"
    stale.write_bytes(b"x" * 1000)
    alive = tmp_path / f".scores.parquet.tmp-{os.getppid()}"  # a live writer's temporary stays
    alive.write_bytes(b"y")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done" and not stale.exists() and alive.exists()


# 10. skipped stamps printed and recorded for training and validation ---------------------------------

def test_validation_skips_are_printed_and_recorded(tmp_path, capsys):
    root = tmp_path / "d"
    (root / "region_split=train").mkdir(parents=True)
    (root / "region_split=val").mkdir(parents=True)
    pq.write_table(fake_rows(32, "train", seed=1).drop(["region_split"]), root / "region_split=train/part-0.parquet")
    val = fake_rows(20, "val", seed=2, start_id=100).drop(["region_split"])
    blobs = val.column("stamp_npz").to_pylist()
    blobs[0] = blobs[7] = b"corrupt"
    val = val.set_column(val.schema.get_field_index("stamp_npz"), "stamp_npz", pa.array(blobs, pa.binary()))
    pq.write_table(val, root / "region_split=val/part-0.parquet")
    rc = cli.main([str(a) for a in _train_argv(root, tmp_path / "o", "--max_skip_frac", "0.2")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipped stamps: 0 of 32 in training, 2 in validation" in err
    epoch = json.loads((tmp_path / "o" / "history.json").read_text())["epochs"][0]
    assert epoch["n_skipped"] == 0 and epoch["val_skipped"] == 2


def test_train_refuses_stale_shards_as_infer_does(tmp_path, ck, capsys):
    """Issue 29: stale shard files beside the current ones (duplicate task_ids in the training split)."""
    root = tmp_path / "stale"
    for split, n, start in (("train", 20, 0), ("val", 8, 100)):
        (root / f"region_split={split}").mkdir(parents=True)
        t = fake_rows(n, split, seed=4, start_id=start).drop(["region_split"])
        pq.write_table(t, root / f"region_split={split}/part-00000.parquet")
    stale = fake_rows(20, "train", seed=4).drop(["region_split"]).slice(0, 7)
    pq.write_table(stale, root / "region_split=train/part-00001.parquet")
    _one_line_error(capsys, _train_argv(root, tmp_path / "o"), "7 row(s) repeat a task_id")
    _one_line_error(capsys, ["infer", "--data", root, "--split", "train", "--ckpt", ck, "--out",
                             tmp_path / "s.parquet"], "7 row(s) repeat a task_id")
    assert not (tmp_path / "o" / "best.pt").exists() and not (tmp_path / "s.parquet").exists()
