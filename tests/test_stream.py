"""The training/inference data stream: exactly-once sharding, per-epoch order, shuffling, skips,
curriculum control matching, hard negatives, and the shared decode + normalise path."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from factory import fake_rows

from darkhaloscope.errors import DHSError
from darkhaloscope.learning import model as M
from darkhaloscope.learning import sampling, stream
from darkhaloscope.stamps import contract


def _index(root, split="train", cols=("psfsize_r", "psfdepth_r")):
    _sp = stream.open_split(str(root), split)
    fs, files = _sp.fs, _sp.files
    return fs, stream.build_index(fs, files, list(cols))


def _epoch_ids(index, fs, world, workers, epoch=0, batch_size=24, weight=None, seed=3, persistent=False):
    """task_ids delivered per rank (in order) and batch counts, one DataLoader per simulated rank."""
    per_rank, n_batches, sizes = [], [], []
    for rank in range(world):
        ds = stream.StampStream(index, fs, ["psfsize_r"], [1.2], [0.2], weight=weight, batch_size=batch_size,
                                seed=seed, rank=rank, world_size=world, num_workers=workers)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                         persistent_workers=persistent and workers > 0)
        ds.set_epoch(epoch)
        batches = list(dl)
        n_batches.append(len(batches))
        sizes += [len(b["task_id"]) for b in batches]
        per_rank.append([t for b in batches for t in b["task_id"].tolist()])
    return per_rank, n_batches, sizes


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_exactly_once_per_epoch(fake_phase4c, world, workers):
    fs, index = _index(fake_phase4c)
    per_rank, n_batches, sizes = _epoch_ids(index, fs, world, workers)
    seen = [t for ids in per_rank for t in ids]
    assert sorted(seen) == sorted(index.task_id.tolist())  # every row once, none twice, none lost
    assert len(set(n_batches)) == 1  # every rank the same number of batches (DDP cannot hang)
    assert max(sizes) <= 24 and max(sizes) - min(sizes) <= 1  # near-equal batches, never above batch_size


def test_delivery_order_is_the_plan_order_for_any_worker_count(fake_phase4c):
    """With lanes = workers, the DataLoader's round-robin yields exactly rank_batches() order."""
    fs, index = _index(fake_phase4c)
    ds = stream.StampStream(index, fs, batch_size=16, seed=1, num_workers=2)
    ds.set_epoch(4)
    plan = [index.task_id[b].tolist() for b in ds.rank_batches()]
    got = [b["task_id"].tolist() for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert got == plan


def test_order_changes_per_epoch_with_persistent_workers(fake_phase4c):
    fs, index = _index(fake_phase4c)
    ds = stream.StampStream(index, fs, batch_size=32, seed=0, num_workers=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)  # shared memory: the already-running workers see it
        orders.append([t for b in dl for t in b["task_id"].tolist()])
    assert sorted(orders[0]) == sorted(orders[1]) == sorted(index.task_id.tolist())
    assert orders[0] != orders[1]
    assert orders[0] == orders[2]  # deterministic given (seed, epoch)


def test_shuffle_is_row_level_not_file_order(fake_phase4c):
    fs, index = _index(fake_phase4c)
    ds = stream.StampStream(index, fs, batch_size=32, seed=0)
    ds.set_epoch(0)
    first = ds.rank_batches()[0]
    groups = {(int(f), int(g)) for f, g in zip(index.file_id[first], index.row_group[first])}
    assert len(groups) >= 2  # one batch mixes rows of several row groups
    ids = index.task_id[first]
    assert not np.all(np.diff(ids) == 1)  # and is not a run of consecutive rows


def test_resume_mid_epoch_skips_exactly_the_consumed_batches(fake_phase4c):
    fs, index = _index(fake_phase4c)
    ds = stream.StampStream(index, fs, batch_size=16, seed=2, num_workers=2)
    ds.set_epoch(1)
    full = [b["task_id"].tolist() for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    ds.set_epoch(1, start_batch=5)
    rest = [b["task_id"].tolist() for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)]
    assert rest == full[5:]


def test_skips_cutout_failures_and_counts_bad_stamps(tmp_path):
    table = fake_rows(40, "train", seed=5)
    blobs = table.column("stamp_npz").to_pylist()
    blobs[3] = b"not an npz"
    blobs[7] = contract.encode_stamp(np.full((3, 64, 64), np.nan, np.float32))
    buf = io.BytesIO()
    np.savez(buf, image_g=np.zeros((32, 32)), image_r=np.zeros((32, 32)), image_z=np.zeros((32, 32)))
    blobs[9] = buf.getvalue()
    cut = np.ones(40, np.int32)
    cut[[0, 1]] = 0
    table = table.set_column(table.schema.get_field_index("stamp_npz"), "stamp_npz", pa.array(blobs, pa.binary()))
    table = table.set_column(table.schema.get_field_index("cutout_ok"), "cutout_ok", pa.array(cut))
    (tmp_path / "region_split=train").mkdir()
    pq.write_table(table.drop(["region_split"]), tmp_path / "region_split=train" / "part-0.parquet")
    fs, index = _index(tmp_path)
    assert len(index) == 38 and index.n_cutout_failed == 2
    ds = stream.StampStream(index, fs, batch_size=8, seed=0)
    ds.set_epoch(0)
    batches = list(ds)
    assert sum(b["n_bad"] for b in batches) == 3
    assert sum(len(b["task_id"]) for b in batches) == 35
    assert all(b["images"].shape[1:] == (3, 64, 64) and torch.isfinite(b["images"]).all() for b in batches)


def _conditions_table(n, seed, split):
    """Scalar columns only (the index never reads stamps): the cut theta_E/PSF >= 0.8 keeps positives
    with small PSF, the cut arc_snr >= 7 keeps those with deep imaging, so the kept positives' conditions
    differ from the controls'."""
    rng = np.random.default_rng(seed)
    ctrl = (rng.random(n) < 0.5).astype(np.int32)
    psf = rng.uniform(0.9, 1.8, n)
    depth = rng.uniform(23.5, 25.0, n)
    theta = np.where(ctrl == 1, np.nan, rng.uniform(0.6, 1.8, n))
    snr = np.where(ctrl == 1, np.nan, 8.0 * (depth - 23.0) * rng.lognormal(0, 0.4, n) - 4)
    return pa.table({"task_id": np.arange(n, dtype=np.int64) + seed * 100000, "is_control": ctrl,
                     "cutout_ok": np.ones(n, np.int32), "stamp_npz": pa.array([b"x"] * n, pa.binary()),
                     "psfsize_r": psf, "psfdepth_r": depth,
                     "psf_fwhm_used_r": np.where(ctrl == 1, np.nan, psf), "theta_e_arcsec": theta, "arc_snr": snr})


def test_curriculum_control_matching_removes_the_metadata_leak(tmp_path):
    (tmp_path / "region_split=train").mkdir()
    pq.write_table(_conditions_table(6000, 1, "train"), tmp_path / "region_split=train" / "part-0.parquet")
    _sp = stream.open_split(str(tmp_path), "train")
    fs, files = _sp.fs, _sp.files
    index = stream.build_index(fs, files, list(sampling.CUT_COLUMNS) + ["psfdepth_r"])
    keep = sampling.curriculum_mask(index, 0.8, 7.0)
    kept = index.take(keep)
    pos = kept.label == 1
    # the cuts dropped positives only, by their own theta_E / PSF and arc_snr
    psf = contract.resolution_psf(index.columns["psf_fwhm_used_r"], index.columns["psfsize_r"])
    dropped = ~keep
    assert np.all(index.label[dropped] == 1)
    assert np.all((index.columns["theta_e_arcsec"][dropped] / psf[dropped] < 0.8)
                  | (index.columns["arc_snr"][dropped] < 7.0))
    cond = np.column_stack([kept.columns["psfsize_r"], kept.columns["psfdepth_r"]])
    leak = sampling.metadata_auc(cond, kept.label)
    assert leak > 0.62  # the test data really leak after the cut
    w_ctrl = sampling.control_match_weights(cond[pos], cond[~pos], np.ones((~pos).sum()))
    weight = np.ones(len(kept))
    weight[~pos] = w_ctrl
    assert np.isclose(w_ctrl.mean(), 1.0)
    assert sampling.metadata_auc(cond, kept.label, weight) <= 0.55
    # and the epoch's actual draws (stochastic rounding of the weights) do not leak either
    seq = sampling.epoch_sequence(kept, weight, seed=0, epoch=0, shuffle=True, window=512)
    assert sampling.metadata_auc(cond[seq], kept.label[seq]) <= 0.55


def test_hard_negatives_are_drawn_more_often_and_spread(tmp_path, fake_phase4c):
    fs, index = _index(fake_phase4c)
    ctrl_ids = index.task_id[index.label == 0]
    hard = ctrl_ids[:10]
    path = tmp_path / "hard.parquet"
    pq.write_table(pa.table({"task_id": hard, "score": np.ones(len(hard))}), path)
    ids = sampling.read_hard_negatives(str(path))
    weight = np.ones(len(index))
    is_hard = np.isin(index.task_id, ids)
    weight[is_hard] = 5.0
    ctrl = index.label == 0
    weight[ctrl] *= ctrl.sum() / weight[ctrl].sum()
    ds = stream.StampStream(index, fs, weight=weight, batch_size=16, seed=0, window=128)
    counts = Counter()
    same_batch = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for rows in ds.rank_batches():
            c = Counter(index.task_id[rows].tolist())
            counts.update(c)
            same_batch += sum(v - 1 for t, v in c.items() if t in set(hard.tolist()))
    hard_rate = np.mean([counts[t] for t in hard]) / 6
    easy_rate = np.mean([counts[t] for t in ctrl_ids[10:]]) / 6
    assert hard_rate / easy_rate == pytest.approx(5.0, rel=0.2)
    assert same_batch <= 2  # repeated draws of a row land in different batches
    with pytest.raises(DHSError, match="does not exist"):
        sampling.read_hard_negatives(str(tmp_path / "missing.parquet"))


def test_iter_table_batches_and_decode_batch(fake_phase4c):
    cols = ["task_id", "is_control", "cutout_ok", "stamp_npz", "psfsize_r", "region_split"]
    batches = list(stream.open_split(str(fake_phase4c), "val").iter_batches(cols, batch_size=50))
    assert sum(b.num_rows for b in batches) == 128 and all(b.num_rows <= 50 for b in batches)
    assert set(batches[0].column("region_split").to_pylist()) == {"val"}
    images, meta, ok, cutout = stream.decode_batch(batches[0], ["psfsize_r"], [1.25], [0.2])
    assert cutout.all()
    assert ok.all() and images.shape == (batches[0].num_rows, 3, 64, 64) and meta.shape == (len(images), 1)
    raw = np.asarray(batches[0].column("psfsize_r").to_numpy())
    assert np.allclose(meta[:, 0], (raw - 1.25) / 0.2, atol=1e-5)
    # the same decode + normalise as the training stream: sky-normalised, not clipped (the network stretches)
    raw_images = contract.decode_stamps(batches[0].column("stamp_npz").to_pylist())[0]
    expect = contract.normalize_stamps(raw_images, clip=None)
    assert np.array_equal(images, expect) and np.abs(images).max() > contract.NORM_CLIP
    # the network's default stretch gives exactly the seed's clipped normalisation
    clipped = M.stretch(torch.from_numpy(images), "clip").numpy()
    assert np.array_equal(clipped, contract.normalize_stamps(raw_images))
    with pytest.raises(DHSError, match="lacks column"):
        next(stream.open_split(str(fake_phase4c), "val").iter_batches(["task_id", "arc_snr_nope"]))
    with pytest.raises(DHSError, match="no parquet files for split"):
        stream.open_split(str(fake_phase4c), "holdout")


def test_fast_decode_and_normalise_equal_the_reference(fake_phase4c):
    blobs = fake_rows(20, "train", seed=9).column("stamp_npz").to_pylist()
    truncated = blobs[1][:-5]
    flipped = bytearray(blobs[2])
    flipped[20000] ^= 0xFF  # a data byte: only the CRC notices
    buf = io.BytesIO()
    np.savez_compressed(buf, image_g=np.ones((64, 64)), image_r=np.zeros((64, 64)), image_z=np.zeros((64, 64)))
    cases = blobs + [truncated, bytes(flipped), buf.getvalue(), b"", None]
    images, ok = contract.decode_stamps(cases)
    ref = [contract.decode_stamp(b) if b is not None else None for b in cases]
    assert ok.tolist() == [r is not None for r in ref]
    assert np.array_equal(images, np.stack([r for r in ref if r is not None]))
    # normalisation: identical to the np.median / MAD formula over pixels > 16 px from the centre
    yy, xx = np.mgrid[:64, :64]
    outer = images[..., np.hypot(xx - 31.5, yy - 31.5) > 16]
    med = np.median(outer, axis=-1)
    mad = np.maximum(np.median(np.abs(outer - med[..., None]), axis=-1) * 1.4826, 1e-8)
    expect = np.clip((images - med[..., None, None]) / mad[..., None, None], -10, 10)
    assert np.array_equal(contract.normalize_stamps(images), expect.astype(np.float32))
    single, empty = images[0], images[:0]
    assert np.array_equal(contract.normalize_stamps(single), expect[0].astype(np.float32))
    assert contract.normalize_stamps(empty).shape == (0, 3, 64, 64)


def test_augment_is_a_symmetry_of_the_square():
    """Each code k + 4*flip writes exactly np.rot90(., k) then [..., ::-1]; the stream draws all 8."""
    images = np.random.default_rng(0).normal(size=(8, 3, 64, 64)).astype(np.float32)
    plain = contract.normalize_stamps(images)
    codes = np.arange(8)
    out = contract.normalize_stamps(images, codes)
    for a, b, code in zip(plain, out, codes):
        expect = np.rot90(a, code % 4, axes=(1, 2))
        assert np.array_equal(b, expect[..., ::-1] if code >= 4 else expect)
    blobs = fake_rows(64, "train", seed=4).column("stamp_npz")
    base, _ = stream.prepare_stamps(blobs)
    aug, _ = stream.prepare_stamps(blobs, np.random.default_rng(1))
    drawn = stream.draw_symmetries(np.random.default_rng(1), 64)
    assert set(drawn.tolist()) == set(range(8))
    assert np.array_equal(aug, contract.normalize_stamps(contract.decode_stamps(blobs)[0], drawn, clip=None))
    assert not np.array_equal(aug, base)


def test_reads_from_s3(fake_phase4c, s3_phase4c):
    """s3:// data through pyarrow's S3 filesystem, against a local moto server (no network)."""
    fs, index = _index(s3_phase4c, "val")
    local_fs, local = _index(fake_phase4c, "val")
    assert sorted(index.task_id.tolist()) == sorted(local.task_id.tolist())
    ds = stream.StampStream(index, fs, batch_size=64, shuffle=False)
    ds.set_epoch(0)
    got = {t: img for b in ds for t, img in zip(b["task_id"].tolist(), b["images"])}
    ref = stream.StampStream(local, local_fs, batch_size=64, shuffle=False)
    ref.set_epoch(0)
    for b in ref:
        for t, img in zip(b["task_id"].tolist(), b["images"]):
            assert torch.equal(got[t], img)


def test_batch_decoder_accepts_every_input_form():
    """Arrow (sliced, chunked, large_binary, with nulls) and Python lists, uniform or mixed layouts
    (np.savez with zip64 extras, encode_stamp, compressed, NaN) all decode as np.load does."""
    import zlib

    from isal import isal_zlib

    rng = np.random.default_rng(5)
    imgs = rng.normal(size=(6, 3, 64, 64)).astype(np.float32)
    saved = []
    for img in imgs[:3]:
        buf = io.BytesIO()
        np.savez(buf, image_g=img[0], image_r=img[1], image_z=img[2])
        saved.append(buf.getvalue())
    bad = imgs[4].copy()
    bad[1, 3, 3] = np.inf
    zipped = io.BytesIO()
    np.savez_compressed(zipped, image_g=imgs[5][0], image_r=imgs[5][1], image_z=imgs[5][2])
    mixed = saved + [contract.encode_stamp(imgs[3]), contract.encode_stamp(bad), zipped.getvalue(), None]
    expect_ok = [True, True, True, True, False, True, False]
    for form in (mixed, pa.array(mixed, pa.binary()), pa.array(mixed, pa.large_binary()),
                 pa.chunked_array([pa.array(mixed[:2], pa.binary()), pa.array(mixed[2:], pa.binary())]),
                 pa.array([b"x"] + mixed, pa.binary())[1:]):
        images, ok = contract.decode_stamps(form)
        assert ok.tolist() == expect_ok
        assert np.array_equal(images, imgs[[0, 1, 2, 3, 5]])
    uniform = pa.array([contract.encode_stamp(i) for i in imgs[:4]], pa.binary())[1:]  # sliced: offset 1
    images, ok = contract.decode_stamps(uniform)
    assert ok.all() and np.array_equal(images, imgs[1:4])
    blob = saved[0]
    assert isal_zlib.crc32(blob) == zlib.crc32(blob) and isal_zlib.crc32(blob, 7) == zlib.crc32(blob, 7)


def test_each_streamed_image_is_its_own_rows_stamp(fake_phase4c):
    """Shuffled batches gather rows from several row groups at once: every image delivered must be the stamp
    of the task_id delivered beside it, in the batch's order (checked against a direct read of the split)."""
    fs, index = _index(fake_phase4c)
    assert len(set(zip(index.file_id.tolist(), index.row_group.tolist()))) > 2  # the gather spans groups
    cols = ["task_id", "is_control", "cutout_ok", "stamp_npz", "psfsize_r", "region_split"]
    expect = {}
    for batch in stream.open_split(str(fake_phase4c), "train").iter_batches(cols, batch_size=64):
        images, _meta, ok, _cut = stream.decode_batch(batch)
        for tid, image in zip(np.asarray(batch.column("task_id"))[ok].tolist(), images):
            expect[tid] = image
    ds = stream.StampStream(index, fs, batch_size=16, seed=5, augment=False)
    ds.set_epoch(1)
    n_groups_per_batch = []
    for b in ds:
        rows = b["row"].numpy()
        n_groups_per_batch.append(len(set(zip(index.file_id[rows].tolist(), index.row_group[rows].tolist()))))
        for tid, image in zip(b["task_id"].tolist(), b["images"].numpy()):
            assert np.array_equal(image, expect[tid])
    assert max(n_groups_per_batch) > 1
