"""`dhs infer`: logits equal the model's forward pass, float32 under bf16, bad stamps, temp names, memory."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from darkhaloscope import cli
from darkhaloscope.evaluation.infer import PASSTHROUGH_COLUMNS, sigmoid32
from darkhaloscope.learning.checkpoint import save_checkpoint
from darkhaloscope.learning.model import build_model, model_kwargs
from factory import fake_rows, write_fake_phase4c

META = ["psfsize_r", "psfdepth_r"]


def make_checkpoint(path, arch="test_convnext", meta_cols=META, seed=0):
    torch.manual_seed(seed)
    kwargs = model_kwargs(arch, len(meta_cols), 0.1)
    model = build_model(**kwargs)
    with torch.no_grad():  # a non-trivial head so that logits spread
        model.head.weight.normal_(0, 1.0)
    save_checkpoint(path, kind="best", arch=arch, model_kwargs=kwargs, state_dict=model.state_dict(),
                    meta_cols=list(meta_cols), meta_mean=[1.2, 24.3][: len(meta_cols)],
                    meta_std=[0.2, 0.4][: len(meta_cols)], variant="test", args={}, epoch=0, metrics={},
                    finished=True)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def _infer(data, ckpt, out, *extra):
    return cli.main(["infer", "--data", str(data), "--ckpt", str(ckpt), "--out", str(out), "--split", "test",
                     "--batch_size", "48", *extra])


def test_logits_equal_model_forward_and_columns(fake_phase4c, ckpt, tmp_path):
    out = tmp_path / "scores.parquet"
    assert _infer(fake_phase4c, ckpt, out) == 0
    table = pq.read_table(out)
    assert table.column_names == ["task_id", *PASSTHROUGH_COLUMNS, "logit", "score"]
    assert str(table.schema.field("logit").type) == "float" and str(table.schema.field("score").type) == "float"
    got = table.to_pandas()
    assert set(got["region_split"]) == {"test"} and len(got) == 128

    # reference: np.load of each stored stamp, the documented normalisation written in numpy (median and
    # 1.4826 x MAD of the pixels > 16 px from the centre, clip +-10) and (x - mean) / std of the meta
    # columns with the checkpoint's statistics; the model's forward pass in the same 48-row batches per file
    from darkhaloscope.learning.checkpoint import load_model
    model, ck = load_model(ckpt)
    yy, xx = np.mgrid[:64, :64]
    annulus = np.hypot(xx - 31.5, yy - 31.5) > 16
    expected, ids = [], []
    for path in sorted((Path(fake_phase4c) / "region_split=test").glob("*.parquet")):
        rows = pq.read_table(path, columns=["task_id", "stamp_npz", *META])
        for lo in range(0, rows.num_rows, 48):
            part = rows.slice(lo, 48)
            stamps = []
            for blob in part.column("stamp_npz").to_pylist():
                with np.load(io.BytesIO(blob)) as npz:
                    stamps.append(np.stack([npz["image_g"], npz["image_r"], npz["image_z"]]))
            images = np.stack(stamps).astype(np.float32)
            outer = images[..., annulus]
            med = np.median(outer, axis=-1)
            mad = np.maximum(np.median(np.abs(outer - med[..., None]), axis=-1) * 1.4826, 1e-8)
            images = np.clip((images - med[..., None, None]) / mad[..., None, None], -10, 10).astype(np.float32)
            raw = np.column_stack([part.column(c).to_numpy() for c in META])
            meta = ((raw - np.array(ck["meta_mean"])) / np.array(ck["meta_std"])).astype(np.float32)
            with torch.no_grad():
                expected.append(model(torch.from_numpy(images), torch.from_numpy(meta)).numpy())
            ids.append(part.column("task_id").to_numpy())
    expected = np.concatenate(expected)
    assert expected.dtype == np.float32
    np.testing.assert_array_equal(got["task_id"].to_numpy(), np.concatenate(ids))
    np.testing.assert_array_equal(got["logit"].to_numpy(), expected)
    np.testing.assert_array_equal(got["score"].to_numpy(), sigmoid32(expected))
    assert np.unique(expected).size > 100  # spread, not saturated

    # decoding in a worker process gives the same file content, in the same order
    out2 = tmp_path / "scores_w.parquet"
    assert _infer(fake_phase4c, ckpt, out2, "--num_workers", "2") == 0
    assert pq.read_table(out2).equals(table)


def test_tta_views_are_the_training_symmetries_and_their_mean_is_invariant(fake_phase4c, ckpt, tmp_path):
    """Each test-time view is the stamp as the training augmentation would present it (the same code through
    ``contract.normalize_stamps``); the mean over 8 views is invariant under all 8 symmetries, over 4 views
    under its subgroup (identity, flip, rot180, rot180 + flip), and differs from one view."""
    from darkhaloscope.evaluation.infer import TTA_CODES, forward_logits, symmetric_view
    from darkhaloscope.learning.checkpoint import load_model
    from darkhaloscope.stamps import contract

    blobs = pq.read_table(next((Path(fake_phase4c) / "region_split=test").glob("*.parquet")),
                          columns=["stamp_npz"]).column("stamp_npz").to_pylist()[:16]
    raw, ok = contract.decode_stamps(blobs)
    assert ok.all()
    plain = contract.normalize_stamps(raw.copy(), None)
    for code in range(8):
        augmented = contract.normalize_stamps(raw.copy(), np.full(len(raw), code))
        np.testing.assert_array_equal(symmetric_view(torch.from_numpy(plain), code).numpy(), augmented)
    assert sorted(TTA_CODES) == list(range(8))

    model, _ = load_model(ckpt)
    meta = np.zeros((len(plain), len(META)), np.float32)
    device = torch.device("cpu")
    one = forward_logits(model, plain, meta, device)
    for tta, group in ((8, range(8)), (4, (0, 4, 2, 6)), (2, (0, 4))):
        base = forward_logits(model, plain, meta, device, tta=tta)
        assert np.abs(base - one).max() > 1e-3  # the views differ: averaging them changes the logit
        for code in group:
            turned = np.ascontiguousarray(symmetric_view(torch.from_numpy(plain), code).numpy())
            np.testing.assert_allclose(forward_logits(model, turned, meta, device, tta=tta), base, rtol=1e-5, atol=1e-5)

    out = tmp_path / "tta.parquet"
    assert _infer(fake_phase4c, ckpt, out, "--tta", "4") == 0
    assert not np.array_equal(pq.read_table(out).column("logit").to_numpy(),
                              pq.read_table(_infer_once(fake_phase4c, ckpt, tmp_path)).column("logit").to_numpy())
    with pytest.raises(SystemExit):
        _infer(fake_phase4c, ckpt, tmp_path / "bad.parquet", "--tta", "3")
    assert not (tmp_path / "bad.parquet").exists()


def test_only_controls_scores_the_controls_exactly_as_a_full_run(fake_phase4c, ckpt, tmp_path, caplog):
    """--only_controls (the workflow's mining scores): the lenses are dropped before decoding; every control
    keeps the logit of a full run, in the same order."""
    full, part = tmp_path / "all.parquet", tmp_path / "controls.parquet"
    assert _infer(fake_phase4c, ckpt, full) == 0
    with caplog.at_level(logging.INFO):
        assert _infer(fake_phase4c, ckpt, part, "--only_controls") == 0
    every = pq.read_table(full).to_pandas()
    got = pq.read_table(part).to_pandas()
    expected = every[every["is_control"] == 1].reset_index(drop=True)
    assert 0 < len(got) < len(every) and (got["is_control"] == 1).all()
    np.testing.assert_array_equal(got["task_id"].to_numpy(), expected["task_id"].to_numpy())
    np.testing.assert_allclose(got["logit"].to_numpy(), expected["logit"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert f"{len(every) - len(got)} rows that are not controls were not scored" in caplog.text


def _infer_once(data, ckpt, tmp_path):
    out = tmp_path / "one_view.parquet"
    assert _infer(data, ckpt, out) == 0
    return out


def test_bf16_logits_are_float32_not_bf16_rounded(fake_phase4c, ckpt, tmp_path):
    out = tmp_path / "bf16.parquet"
    assert _infer(fake_phase4c, ckpt, out, "--use_bf16") == 0
    logit = pq.read_table(out).column("logit").to_numpy()
    assert logit.dtype == np.float32
    as_bf16 = torch.from_numpy(logit).to(torch.bfloat16).float().numpy()
    assert (as_bf16 != logit).mean() > 0.9  # computed in float32, not rounded through bf16
    ref = pq.read_table(_infer_path(fake_phase4c, ckpt, tmp_path)).column("logit").to_numpy()
    np.testing.assert_allclose(logit, ref, atol=0.1 * np.std(ref) + 1e-3)


def _infer_path(data, ckpt, tmp_path):
    out = tmp_path / "fp32.parquet"
    assert _infer(data, ckpt, out) == 0
    return out


def _dataset_with_bad_stamps(root, n_bad, no_cutout=()):
    """100 test rows: ``n_bad`` corrupt stamps, and valid stamps marked cutout_ok = 0 at ``no_cutout``."""
    root = Path(root)
    d = root / "region_split=test"
    d.mkdir(parents=True)
    table = fake_rows(100, "test", seed=5).drop(["region_split"])
    blobs = table.column("stamp_npz").to_pylist()
    for i in range(n_bad):
        blobs[3 + 7 * i] = b"not an npz"
    import pyarrow as pa
    table = table.set_column(table.column_names.index("stamp_npz"), "stamp_npz", pa.array(blobs, pa.binary()))
    cut = np.ones(100, np.int32)
    cut[list(no_cutout)] = 0
    table = table.set_column(table.column_names.index("cutout_ok"), "cutout_ok", pa.array(cut))
    pq.write_table(table, d / "part-0000.parquet", row_group_size=20)
    return root


def test_bad_stamps_are_counted_and_stop_above_threshold(tmp_path, ckpt, capsys, caplog):
    # rows 50 and 51 hold valid stamps but cutout_ok = 0: declared failures, not scored and counted apart from
    # the 3 corrupt stamps (only those count against --max_skip_frac, of the 98 rows with a cutout)
    data = _dataset_with_bad_stamps(tmp_path / "d", 3, no_cutout=(50, 51))
    out = tmp_path / "s.parquet"
    caplog.set_level(logging.INFO, logger="dhs.infer")
    assert _infer(data, ckpt, out, "--max_skip_frac", "0.05") == 0
    assert pq.read_metadata(out).num_rows == 95
    scored = set(pq.read_table(out, columns=["task_id"]).column("task_id").to_pylist())
    assert scored == set(range(100)) - {3, 10, 17, 50, 51}
    assert "2 declared cutout failures (cutout_ok != 1) not scored; skipped 3 unscorable" in caplog.text
    assert "of 98 rows with a cutout" in caplog.text
    out2 = tmp_path / "s2.parquet"
    assert _infer(data, ckpt, out2, "--max_skip_frac", "0.02") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dhs infer: error:") and "not scorable" in err
    assert not out2.exists() and not list(tmp_path.glob(".s2.parquet*"))


def test_bad_inputs(tmp_path, ckpt, fake_phase4c, capsys):
    empty = tmp_path / "empty" / "region_split=test"
    empty.mkdir(parents=True)
    pq.write_table(fake_rows(0, "test").drop(["region_split"]), empty / "part-0000.parquet")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    nometa = write_fake_phase4c(tmp_path / "nometa", {"test": 10})
    for f in nometa.glob("region_split=test/*.parquet"):
        pq.write_table(pq.read_table(f).drop(["psfdepth_r"]), f)
    broken = make_checkpoint(tmp_path / "nan.pt")
    ck = torch.load(broken, weights_only=True)
    ck["state_dict"]["head.bias"].fill_(float("nan"))
    save_checkpoint(broken, **{k: v for k, v in ck.items() if k != "format"})
    cases = [(tmp_path / "empty", ckpt, "empty split"), (fake_phase4c, junk, "checkpoint"),
             (nometa, ckpt, "psfdepth_r"), (fake_phase4c, broken, "non-finite logits")]
    for data, ck, word in cases:
        out = tmp_path / "o.parquet"
        assert _infer(data, ck, out) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("dhs infer: error:") and word in err, err
        assert not out.exists()


def test_killed_run_leaves_nothing_that_looks_finished(tmp_path, ckpt):
    data = write_fake_phase4c(tmp_path / "d", {"test": 600}, files_per_split=3)
    out = tmp_path / "scores.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "darkhaloscope", "infer", "--data", str(data), "--ckpt",
                             str(ckpt), "--out", str(out), "--split", "test", "--batch_size", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".scores.parquet.tmp-*")):
            assert proc.poll() is None, "finished before it could be killed"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "d"]
    assert leftovers and all(n.startswith(".scores.parquet.tmp-") for n in leftovers)


_RSS_PROBE = textwrap.dedent("""
    import json, sys
    from darkhaloscope import cli
    rc = cli.main(["infer", "--data", sys.argv[1], "--ckpt", sys.argv[2], "--out", sys.argv[3], "--split",
                   "test", "--batch_size", "32"])
    # VmHWM (peak RSS of this process image); getrusage's ru_maxrss would carry the forking parent's peak
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"rc": rc, "maxrss_kb": hwm}))
""")


@pytest.mark.slow  # ~20-40 s on the shared 2-core machine: two fresh interpreters with torch
def test_memory_is_bounded_on_10x_input(tmp_path, ckpt):
    # 10x the rows in the same number of files (10x larger files): memory must not follow either.
    result = {}
    for scale in (1, 10):
        data = write_fake_phase4c(tmp_path / f"d{scale}", {"test": 160 * scale}, files_per_split=2)
        raw = sum(f.stat().st_size for f in data.rglob("*.parquet"))
        res = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(data), str(ckpt), str(tmp_path / f"s{scale}.pq")],
                             capture_output=True, text=True, check=True)
        result[scale] = json.loads(res.stdout.strip().splitlines()[-1]) | {"raw": raw}
        assert result[scale]["rc"] == 0
        assert pq.read_metadata(tmp_path / f"s{scale}.pq").num_rows == 160 * scale
    grown = (result[10]["maxrss_kb"] - result[1]["maxrss_kb"]) * 1024
    extra = result[10]["raw"] - result[1]["raw"]
    assert extra > 60e6
    # Holding the stamps (or the decoded images) would grow by >= 1x the extra input; a streaming run
    # grows by a few MB of allocator fragmentation (measured 6-12 MB here).
    assert grown < 0.4 * extra, result


def test_scores_s3_data_like_local(fake_phase4c, s3_phase4c, ckpt, tmp_path):
    """s3:// data through pyarrow's S3 filesystem, against a local moto server (no network)."""
    assert _infer(s3_phase4c, ckpt, tmp_path / "s3.parquet") == 0
    assert _infer(fake_phase4c, ckpt, tmp_path / "local.parquet") == 0
    assert pq.read_table(tmp_path / "s3.parquet").equals(pq.read_table(tmp_path / "local.parquet"))


def _rowgroup_data(root):
    """A test split of two files cut in 20-row row groups, so that 48-row batches straddle row groups."""
    from factory import fake_rows

    d = Path(root) / "region_split=test"
    d.mkdir(parents=True)
    next_id = 0
    for k, n in enumerate((130, 75)):
        pq.write_table(fake_rows(n, "test", 0.5, k, 0.05, next_id).drop(["region_split"]), d / f"part-{k:04d}.parquet",
                       row_group_size=20)
        next_id += n
    return Path(root)


def test_sharded_reader_is_the_sequential_split_and_reads_only_its_row_groups(tmp_path, monkeypatch):
    from darkhaloscope.errors import DHSError
    from darkhaloscope.stamps.dataset import open_split

    split = open_split(str(_rowgroup_data(tmp_path / "d")), "test")
    cols = ["task_id", "stamp_npz", "region_split", *META]
    sequential = list(split.iter_batches(cols, 48))
    assert [b.num_rows for b in sequential] == [48, 48, 34, 48, 27]  # per file, crossing row groups
    reads = []
    real = pq.ParquetFile.iter_batches

    def counted(self, *args, row_groups=None, **kw):  # the row groups each read asks for
        reads.extend(row_groups if row_groups is not None else range(self.metadata.num_row_groups))
        return real(self, *args, row_groups=row_groups, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    for n_workers in (2, 3):
        shards, per_worker = [], []
        for w in range(n_workers):
            reads.clear()
            shards.append(list(split.iter_batches(cols, 48, shard=(w, n_workers))))
            per_worker.append(len(reads))
        merged = [shards[i % n_workers][i // n_workers] for i in range(len(sequential))]
        assert sum(len(s) for s in shards) == len(sequential)
        for got, want in zip(merged, sequential):
            assert got.equals(want)
        # 7 + 4 row groups in all; each worker reads those of its own batches (a straddling one twice at most)
        assert sum(per_worker) <= 11 + len(sequential) and max(per_worker) < 11
    with pytest.raises(DHSError, match="shard 2 of 2"):
        list(split.iter_batches(cols, 48, shard=(2, 2)))


def test_worker_sharded_infer_writes_the_same_scores(tmp_path, ckpt):
    data = _rowgroup_data(tmp_path / "d")
    outs = {}
    for workers in (0, 2, 3):  # 0: the sequential reader in a background thread
        outs[workers] = tmp_path / f"w{workers}.parquet"
        assert _infer(data, ckpt, outs[workers], "--num_workers", str(workers)) == 0
    want = pq.read_table(outs[0])
    assert want.num_rows == 205
    for workers in (2, 3):
        assert pq.read_table(outs[workers]).equals(want)
