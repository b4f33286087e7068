"""Phase 4c: shard determinism, output contract, noise level, realism, atomic writes, bad input, and
re-rendering an arc from the stored truth columns."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from darkhaloscope import cli
from darkhaloscope.errors import DHSError
from darkhaloscope.simulation import inject, phase4c, scene
from darkhaloscope.simulation.manifest import build_manifest, write_manifest
from darkhaloscope.stamps.contract import BANDS, SPLITS, decode_stamp, decode_stamps, load_conditions

N_TASKS = 120
BATCH = 16


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.parquet"
    write_manifest(build_manifest(N_TASKS, seed=21, confuser_frac=0.3, n_regions=40), path)
    return path


def _inject(manifest_path, out_dir, shard=0, n_shards=1, psf="moffat", beta=3.5, write_arc=True):
    argv = ["inject", "--manifest", str(manifest_path), "--out_dir", str(out_dir), "--variant", "v",
            "--psf-model", psf, "--moffat-beta", str(beta), "--shard", str(shard), "--n_shards", str(n_shards),
            "--batch_size", str(BATCH)]
    return cli.main(argv + (["--write_arc"] if write_arc else []))


def _read(out_dir) -> pa.Table:
    return ds.dataset(out_dir, format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="module")
def one_shard(manifest_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert _inject(manifest_path, out) == 0
    return out


def _stamps_by_task(table):
    return dict(zip(table.column("task_id").to_pylist(), table.column("stamp_npz").to_pylist()))


def test_bytes_identical_for_one_or_three_shards(manifest_path, one_shard, tmp_path):
    for shard in range(3):
        assert _inject(manifest_path, tmp_path, shard=shard, n_shards=3) == 0
    a, b = _stamps_by_task(_read(one_shard)), _stamps_by_task(_read(tmp_path))
    assert len(a) == len(b) == N_TASKS and a == b
    # each shard rendered a disjoint part: three files per split per shard
    assert len(list(tmp_path.glob("region_split=*/part-*.parquet"))) == 9


def test_files_schema_and_columns(one_shard, manifest_path):
    files = sorted(one_shard.glob("region_split=*/part-00000.parquet"))
    assert [f.parent.name for f in files] == sorted(f"region_split={s}" for s in SPLITS)
    t = _read(one_shard)
    assert t.num_rows == N_TASKS
    assert t.schema.field("is_control").type == pa.int32() and t.schema.field("task_id").type == pa.int64()
    for f in files:
        meta = pq.ParquetFile(f).metadata
        assert meta.num_rows == 0 or meta.row_group(0).column(0).compression == "ZSTD"
        assert pq.read_schema(f).equals(phase4c.output_schema(True))
    df = t.to_pandas()
    ctrl, pos = df[df.is_control == 1], df[df.is_control == 0]
    assert (df.cutout_ok == 1).all() and (ctrl.control_kind == "unpaired").all() and pos.control_kind.isna().all()
    assert (pos.lens_model == "SIE+SHEAR").all() and (ctrl.lens_model == "none").all()
    for col in ("psf_fwhm_used_r", "theta_e_arcsec", "arc_snr", "magnification", "src_flux_g", "lens_q", "arc_npz"):
        assert ctrl[col].isna().all() and pos[col].notna().all(), col
    np.testing.assert_allclose(pos.psf_fwhm_used_r, pos.psfsize_r)
    assert (df.psf_model == "moffat").all() and (df.moffat_beta == 3.5).all()
    assert (pos.magnification > 1).all()
    images, ok = decode_stamps(df.stamp_npz)
    assert ok.all() and images.shape == (N_TASKS, 3, 64, 64) and images.dtype == np.float32
    # rows follow the manifest's split assignment and are shuffled within a file
    man = pq.read_table(manifest_path).to_pandas().set_index("task_id")
    assert (man.loc[df.task_id, "region_split"].to_numpy() == df.region_split.to_numpy()).all()
    train_ids = pq.read_table(one_shard / "region_split=train" / "part-00000.parquet").column("task_id").to_numpy()
    assert not (np.diff(train_ids) > 0).all()


def test_zero_row_split_file_has_full_schema(tmp_path):
    m = build_manifest(40, seed=4, split_fracs=(1.0, 0.0, 0.0), n_regions=24)
    write_manifest(m, tmp_path / "m.parquet")
    assert _inject(tmp_path / "m.parquet", tmp_path / "d", write_arc=False) == 0
    f = tmp_path / "d" / "region_split=val" / "part-00000.parquet"
    assert pq.read_metadata(f).num_rows == 0 and pq.read_schema(f).equals(phase4c.output_schema(False))


def test_controls_identical_across_variants_positives_differ(manifest_path, one_shard, tmp_path):
    assert _inject(manifest_path, tmp_path, psf="gaussian", write_arc=False) == 0
    g, m = _read(tmp_path).to_pandas().set_index("task_id"), _read(one_shard).to_pandas().set_index("task_id")
    ctrl = m.index[m.is_control == 1]
    pos = m.index[m.is_control == 0]
    assert all(g.stamp_npz[i] == m.stamp_npz[i] for i in ctrl)  # same host, same noise: only the arc PSF differs
    assert sum(g.stamp_npz[i] != m.stamp_npz[i] for i in pos) == len(pos)
    assert g.moffat_beta.isna().all() and (g.psf_model == "gaussian").all()


def test_rerender_arc_from_stored_truth(one_shard):
    df = _read(one_shard).to_pandas()
    pos = df[df.is_control == 0].head(12)
    rows = {c: pos[c].to_numpy() for c in pos.columns}
    again = scene.render_arcs(rows, pos.psf_model.iloc[0], float(pos.moffat_beta.iloc[0]))
    stored = np.stack([decode_stamp(b) for b in pos.arc_npz])
    # PSF kernels of a batch share the batch's largest size, so a different batch truncates the wings at
    # a different radius (flux beyond it < 2e-4): agreement to 1e-3 of each arc's peak, not bit-exact
    peak = stored.max(axis=(1, 2, 3))[:, None, None, None]
    assert (np.abs(again["arc"] - stored) <= 1e-3 * peak).all()
    np.testing.assert_allclose(again["magnification"], pos.magnification, rtol=1e-6)
    # the stamp is the arc plus the (arc-free) background: positives are brighter by the arc's flux
    flux_in = stored[:, 1].sum(axis=(1, 2))
    np.testing.assert_allclose(flux_in, pos.magnification * pos.src_flux_r, rtol=0.05)


def _blank_rows(manifest_path, n=24):
    rows = scene.column_arrays(pq.read_table(manifest_path).slice(0, n))
    rows["is_control"] = np.ones(n, np.int32)
    rows["host_mag_r"] = np.full(n, np.inf)  # zero flux
    for k in ("nb_mag_r", "star_mag_r"):
        rows[k] = np.full_like(rows[k], np.nan)
    rows["confuser_kind"] = np.array(["none"] * n, dtype=object)
    return rows


def test_blank_stamp_sky_sigma_matches_depth(manifest_path):
    galsim = pytest.importorskip("galsim")
    rows = _blank_rows(manifest_path)
    batch = scene.render_scenes(rows, "moffat", 3.5)
    assert np.abs(batch.image).max() < 1.0  # nothing but noise
    measured = batch.image.std(axis=(2, 3))
    np.testing.assert_allclose(measured.mean(axis=0) / batch.sky_sigma.mean(axis=0), 1.0, atol=0.05)
    np.testing.assert_allclose(measured / batch.sky_sigma, 1.0, atol=0.06)
    # expected sigma from the depth with an independent PSF: GalSim's Moffat drawn at 0.262"/pix
    for i in range(3):
        for j, b in enumerate(BANDS):
            k = galsim.Moffat(beta=3.5, fwhm=rows[f"psfsize_{b}"][i]).drawImage(
                nx=127, ny=127, scale=0.262, method="no_pixel").array
            k = k / k.sum()
            expect = 10 ** (-0.4 * (rows[f"psfdepth_{b}"][i] - 22.5)) / 5 * np.sqrt((k**2).sum())
            assert measured[i, j] == pytest.approx(expect, rel=0.05)


def test_control_sky_mad_and_core_peak_in_real_range(one_shard):
    df = _read(one_shard).to_pandas()
    images, _ = decode_stamps(df[df.is_control == 1].stamp_npz)
    r = images[:, 1]
    yy, xx = np.mgrid[:64, :64] - 31.5
    outer = r[:, np.hypot(xx, yy) > 20]
    mad = np.median(np.abs(outer - np.median(outer, axis=1, keepdims=True)), axis=1)
    lo, hi = load_conditions()["real_stamp_pixel_stats_r_nanomaggy"]["sky_mad"]
    assert lo <= np.median(mad) <= hi
    peak = r[:, 27:37, 27:37].max(axis=(1, 2))
    lo, hi = load_conditions()["real_stamp_pixel_stats_r_nanomaggy"]["host_core_peak"]
    assert lo <= np.median(peak) <= hi


def test_no_partial_file_after_failure(manifest_path, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = inject.render_scenes

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash mid-shard")
        return real(*a, **k)

    monkeypatch.setattr(inject, "render_scenes", failing)
    with pytest.raises(RuntimeError):
        inject.render_shard(pq.read_table(manifest_path), tmp_path, "moffat", 3.5, 0, 1, BATCH, progress=False)
    assert calls["n"] == 3
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("flags,message", [
    (["--shard", "3", "--n_shards", "3"], "out of range"),
    (["--shard", "-1"], "out of range"),
    (["--psf-model", "airy"], "unknown --psf-model"),
    (["--moffat-beta", "1.0"], "beta must be > 1"),
])
def test_bad_arguments_write_nothing(manifest_path, tmp_path, capsys, flags, message):
    argv = ["inject", "--manifest", str(manifest_path), "--out_dir", str(tmp_path / "d")] + flags
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bad_manifest(manifest_path, tmp_path, capsys):
    t = pq.read_table(manifest_path)
    pq.write_table(t.drop(["host_reff"]), tmp_path / "m.parquet")
    assert cli.main(["inject", "--manifest", str(tmp_path / "m.parquet"), "--out_dir", str(tmp_path / "d")]) == 2
    assert "host_reff" in capsys.readouterr().err and not (tmp_path / "d").exists()
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), tmp_path / "dup.parquet")
    assert cli.main(["inject", "--manifest", str(tmp_path / "dup.parquet"), "--out_dir", str(tmp_path / "d")]) == 2
    assert "repeated task_id" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_alias_spellings(manifest_path):
    p = cli.build_parser("inject")
    a = p.parse_args(["inject", "--manifest", "m", "--output-dir", "o", "--psf_model", "gaussian",
                      "--moffat_beta", "2.5", "--shard", "1", "--n_shards", "2", "--write_arc"])
    got = (a.out_dir, a.psf_model, a.moffat_beta, a.shard, a.n_shards, a.write_arc)
    assert got == ("o", "gaussian", 2.5, 1, 2, True)
    with pytest.raises(DHSError, match="batch_size"):
        phase4c.check_args("moffat", 3.5, 0, 1, 0)
    assert Path(phase4c.output_path("o", "val", 7)).as_posix() == "o/region_split=val/part-00007.parquet"


def test_noise_texture_same_for_both_classes(one_shard):
    """Noise is added to the whole scene identically: far from the centre, where arcs do not reach,
    the pixel scatter relative to the recorded sky sigma is the same for positives and controls."""
    df = _read(one_shard).to_pandas()
    images, _ = decode_stamps(df.stamp_npz)
    yy, xx = np.mgrid[:64, :64] - 31.5
    outer = images[:, :, np.hypot(xx, yy) > 24]
    mad = np.median(np.abs(outer - np.median(outer, axis=-1, keepdims=True)), axis=-1) * 1.4826
    sigma = 1 / np.sqrt(df[[f"sky_ivar_{b}" for b in BANDS]].to_numpy())
    ratio = np.median(mad / sigma, axis=1)
    ctrl, pos = ratio[df.is_control == 1], ratio[df.is_control == 0]
    assert np.median(ctrl) == pytest.approx(np.median(pos), rel=0.05)
    assert np.median(ctrl) == pytest.approx(1.0, abs=0.1)


def test_stamp_writer_is_a_valid_deterministic_npz():
    """encode_stamp's hand-written stored-ZIP writer: np.load and zipfile read it exactly like an
    np.savez archive, the fast reader accepts it, and the same image always gives the same bytes."""
    import io
    import zipfile

    from darkhaloscope.stamps.codec import read_npz_members, write_npz
    from darkhaloscope.stamps.contract import STAMP_KEYS, decode_stamp, encode_stamp

    img = np.random.default_rng(3).normal(size=(3, 64, 64)).astype(np.float32)
    img[0, 0, 0] = -0.0
    blob = encode_stamp(img)
    assert blob == encode_stamp(img.copy())
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        assert z.testzip() is None  # CRC-32 of every member checks out
        assert z.namelist() == [f"{k}.npy" for k in STAMP_KEYS]
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        for i, key in enumerate(STAMP_KEYS):
            assert npz[key].dtype == np.float32 and npz[key].shape == (64, 64)
            assert npz[key].tobytes() == img[i].tobytes()
    assert np.array_equal(decode_stamp(blob), img)
    fast = read_npz_members(blob, STAMP_KEYS)
    assert fast is not None and all(np.array_equal(a, img[i]) for i, a in enumerate(fast))
    # other dtypes/shapes and non-contiguous input round-trip too
    other = {"a": np.arange(12, dtype=np.int64).reshape(3, 4).T, "b": np.zeros((0,), np.float64)}
    with np.load(io.BytesIO(write_npz(other))) as npz:
        assert np.array_equal(npz["a"], other["a"]) and npz["b"].shape == (0,)


def test_stale_shards_of_another_layout_are_refused(manifest_path, tmp_path, capsys):
    """Re-sharding into the same directory left the old shard beside the new one: 22 rows of 17 tasks."""
    for shard in range(2):
        assert _inject(manifest_path, tmp_path, shard=shard, n_shards=2, write_arc=False) == 0
    before = sorted(p.name for p in tmp_path.rglob("*.parquet"))
    assert _inject(manifest_path, tmp_path, shard=0, n_shards=1, write_arc=False) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dhs inject: error:") and "another shard layout" in err and "part-00001.parquet" in err
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == before
    # same layout, other batch size: refused too (the block assignment differs)
    assert cli.main(["inject", "--manifest", str(manifest_path), "--out_dir", str(tmp_path), "--shard", "0",
                     "--n_shards", "2", "--batch_size", str(2 * BATCH)]) == 2
    assert "--batch_size 16" in capsys.readouterr().err
    # a rerun of the same layout is fine, and cleans the temporary a killed (dead) run left behind
    stale = tmp_path / "region_split=train" / ".part-00000.parquet.tmp-999999999"
    stale.write_bytes(b"x" * 100)
    assert _inject(manifest_path, tmp_path, shard=0, n_shards=2, write_arc=False) == 0
    assert not stale.exists()
