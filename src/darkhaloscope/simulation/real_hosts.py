"""Phase 4c on real hosts: ``dhs manifest --hosts DIR`` and ``dhs inject --hosts DIR``.

``DIR`` is a dataset written by ``dhs cutouts`` (real DR10 stamps of, e.g., LRGs). Only rows with
``cutout_ok = 1`` become tasks (the others are counted and named in the log); each usable host is used
exactly once, as a positive (an arc is added) or, with probability ``--control_frac``, as an unpaired
control (its pixels unchanged). The label is drawn independently of everything else, so the two classes
have the same distribution of observing conditions (matched in distribution, not paired). Each task keeps
its host's ``region_split`` (set from the sky cell by ``dhs cutouts``, as the simulator's manifest does).

Manifest: ``task_id`` is the task's row number (int64: shards and render blocks are task_id //
batch_size, as for simulated data), ``host_id`` the host's catalogue id (any type), the host's position,
split and conditions, ``noise_seed``, and the lens and source draws of ``draws.draw_lenses`` (null for
controls) with the lens at the stamp centre plus the simulator's 0.03-arcsec jitter. When the hosts have
the Tractor shape ``shape_e1``/``shape_e2``, the lens axis ratio is the host's, q = (1 - |e|) / (1 + |e|)
(clipped to the prior's lens_q range), and the lens angle is the host's major axis plus the simulator's
5-degree jitter; else the priors. The conversion: the Legacy Surveys catalogue notes give the position
angle east of north as PA = -atan2(e2, e1) / 2; a viewer cutout has north up and east left, so the
stored array's +x (column) points west and +y (row) north, and the manifest angle (counter-clockwise from
+x towards +y) is phi = pi/2 + PA (mod pi). ``grid_sota`` priors (source magnitude relative to the host's)
need the host's r magnitude: a ``flux_r`` (nanomaggies) column of the catalogue.

Injection: the arc is rendered by the same physics as the simulator (``scene.render_arcs``: SIE + shear,
Sersic source and optional clumps, the variant's PSF model, Gaussian or Moffat with ``--moffat-beta``, at
the FWHM of the host's own ``psfsize_g/r/z``) and added to the real pixels, with the arc's own Poisson
noise (the Gaussian approximation of the simulator: variance max(arc, 0) / ``scene.GAIN_E_PER_NMGY``,
drawn from the task's ``noise_seed``); the real stamp already carries its sky and host noise.
``arc_snr`` / ``arc_snr_peak`` use the sky noise implied by the host's 5-sigma depth and PSF (the same
formula as the simulator, ``scene.sky_sigma``; ``sky_ivar_*`` is its inverse square), not a measurement
on the stamp, so that they mean the same thing on simulated and real hosts. Output: the simulator's
Phase 4c schema (``phase4c.output_schema``, rows built by ``phase4c.batch_table``, as for simulated data) plus
``host_id``; host light truth columns are null.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from tqdm import tqdm

from darkhaloscope.catalogs import KnownLensIndex, load_known_lenses, read_catalog
from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output
from darkhaloscope.simulation.draws import SOURCE_PRIORS, ClumpPrior, clump_prior, draw_clumps, draw_lenses, stream
from darkhaloscope.simulation.phase4c import (batch_table, check_args, clump_slots, output_path, output_schema,
                                              shard_mask)
from darkhaloscope.simulation.scene import (GAIN_E_PER_NMGY, SceneBatch, arc_snr, column_arrays, psf_fwhm, render_arcs,
                                            sky_psf_sum_sq, sky_sigma)
from darkhaloscope.stamps.contract import BANDS, CONDITION_COLUMNS, SPLITS, decode_stamp, load_conditions
from darkhaloscope.stamps.dataset import dataset_sha256, filesystem

HOST_MANIFEST_TAG = b"dhs_host_manifest"
# The content hash of the host dataset a manifest was drawn from (stamps.dataset.dataset_sha256): inject refuses another.
HOSTS_SHA_TAG = b"dhs_hosts_sha256"


def _dataset(hosts_dir: str):
    fs, root = filesystem(hosts_dir)
    if "://" not in str(hosts_dir) and not Path(root).is_dir():
        raise DHSError(f"--hosts {hosts_dir} is not a directory")
    try:
        return pads.dataset(root, format="parquet", partitioning="hive", filesystem=fs)
    except Exception as exc:
        raise DHSError(f"cannot read host dataset {hosts_dir}: {type(exc).__name__}: {exc}") from None


def read_hosts(hosts_dir: str) -> tuple[pa.Table, int]:
    """(usable host rows without stamps, in split then file order; number of rows with cutout_ok != 1)."""
    ds = _dataset(hosts_dir)
    need = ("task_id", "ra", "dec", "region_split", "cutout_ok", *CONDITION_COLUMNS)
    missing = [c for c in need if c not in ds.schema.names]
    if missing:
        raise DHSError(f"host dataset {hosts_dir} lacks column(s) {', '.join(missing)} (write it with dhs cutouts)")
    cols = [*need, *[c for c in ("brickname", "region_id", "shape_e1", "shape_e2", "flux_r") if c in ds.schema.names]]
    table = ds.to_table(columns=cols + (["is_control"] if "is_control" in ds.schema.names else []))
    if "is_control" in table.column_names:
        n_lens = int(pc.sum(pc.cast(pc.equal(table.column("is_control"), 0), pa.int64())).as_py() or 0)
        if n_lens:
            raise DHSError(f"host dataset {hosts_dir} holds {n_lens} known lens(es) (is_control = 0: written with "
                           "dhs cutouts --label lens); hosts must be controls (--label control)")
        table = table.drop_columns(["is_control"])
    ok = pc.equal(table.column("cutout_ok"), 1)
    n_bad = table.num_rows - int(pc.sum(pc.cast(ok, pa.int64())).as_py() or 0)
    table = table.filter(ok)
    split = np.asarray(table.column("region_split").to_pylist(), dtype=object).astype(str)
    order = np.concatenate([np.flatnonzero(split == s) for s in SPLITS]) if len(split) else np.zeros(0, np.int64)
    table = table.take(pa.array(order, pa.int64()))
    if table.num_rows == 0:
        raise DHSError(f"host dataset {hosts_dir} has no usable host (cutout_ok = 1) in train/val/test")
    ids = table.column("task_id")
    if len(pc.unique(ids)) != len(ids):
        raise DHSError(f"host dataset {hosts_dir} repeats task_id values")
    return table, n_bad


def _f(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def shape_orientation(e1, e2) -> tuple[np.ndarray, np.ndarray]:
    """Tractor (shape_e1, shape_e2) -> (axis ratio q, manifest angle phi in [0, pi) of the stamp), see
    the module docstring; NaN where either component is missing or the shape is round."""
    e1, e2 = np.asarray(e1, np.float64), np.asarray(e2, np.float64)
    e = np.hypot(e1, e2)
    q = (1.0 - e) / (1.0 + e)
    pa_east_of_north = -0.5 * np.arctan2(e2, e1)
    phi = np.mod(np.pi / 2 + pa_east_of_north, np.pi)
    bad = ~np.isfinite(e) | (e <= 0) | (e >= 1)
    return np.where(bad, np.nan, q), np.where(bad, np.nan, phi)


def known_lens_positions(paths) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) of the known lenses in ``paths``: ``lenscat`` (or None) is the lenscat catalogue and a CSV or
    parquet file is read as mining reads it (``catalogs.load_known_lenses``); any other catalogue (e.g. FITS) as
    ``dhs cutouts`` reads it."""
    ras, decs = [], []
    for p in paths or [None]:
        if p is None or p == "lenscat":
            ra, dec = load_known_lenses(None)
        elif str(p).lower().endswith((".csv", ".parquet", ".pq")):
            ra, dec = load_known_lenses(p)
        else:
            t = read_catalog(p)
            names = {c.lower(): c for c in t.column_names}
            if "ra" not in names or "dec" not in names:
                raise DHSError(f"known-lens catalogue {p} has no ra/dec columns")
            ra = t.column(names["ra"]).to_numpy(zero_copy_only=False).astype(np.float64)
            dec = t.column(names["dec"]).to_numpy(zero_copy_only=False).astype(np.float64)
            good = np.isfinite(ra) & np.isfinite(dec)
            ra, dec = ra[good], dec[good]
        ras.append(ra)
        decs.append(dec)
    return np.concatenate(ras), np.concatenate(decs)


def drop_known_lenses(hosts: pa.Table, known_lenses, radius_arcsec: float) -> tuple[pa.Table, int]:
    """The hosts farther than ``radius_arcsec`` from every known lens (as mining excludes them: a known lens
    must not become a labelled negative), and how many were dropped. ``radius_arcsec`` 0: none dropped."""
    if radius_arcsec is None or radius_arcsec <= 0:
        return hosts, 0
    near = KnownLensIndex(*known_lens_positions(known_lenses)).near(_f(hosts, "ra"), _f(hosts, "dec"), radius_arcsec)
    if near.all():
        raise DHSError(f"every usable host lies within {radius_arcsec:g} arcsec of a known lens")
    return hosts.filter(pa.array(~near)), int(near.sum())


def build_host_manifest(hosts_dir: str, seed: int, control_frac: float = 0.5, source_priors: str = "realistic",
                        clumps=None, known_lenses=None, exclude_radius_arcsec: float = 0.0) -> tuple[pa.Table, int, int]:
    """The host-injection manifest (module docstring), the number of unusable hosts left out and the number
    of hosts left out as known lenses (``drop_known_lenses``)."""
    clumps = (clumps or ClumpPrior()).check()
    if not 0.0 <= control_frac <= 1.0:
        raise DHSError(f"--control_frac must be in [0, 1], got {control_frac}")
    if source_priors not in SOURCE_PRIORS:
        raise DHSError(f"unknown --source_priors '{source_priors}' (choose from {', '.join(SOURCE_PRIORS)})")
    sha = dataset_sha256(hosts_dir)
    hosts, n_bad = read_hosts(hosts_dir)
    hosts, n_known = drop_known_lenses(hosts, known_lenses, exclude_radius_arcsec)
    n = hosts.num_rows
    for c in CONDITION_COLUMNS:
        v = _f(hosts, c)
        if not np.isfinite(v).all():
            raise DHSError(f"host dataset {hosts_dir}: {c} is NaN/null in {int((~np.isfinite(v)).sum())} usable row(s)")
    if source_priors == "grid_sota" and "flux_r" not in hosts.column_names:
        raise DHSError("--source_priors grid_sota sets the source magnitude from the host's: the host catalogue "
                       "needs a flux_r column (nanomaggies)")
    label_rng = stream(seed, "label")
    is_control = np.zeros(n, np.int32)
    is_control[label_rng.permutation(n)[: int(round(control_frac * n))]] = 1
    orient_rng = stream(seed, "host_orientation")
    random_phi = orient_rng.random(n) * np.pi
    q_host = np.full(n, np.nan)
    phi = random_phi
    if "shape_e1" in hosts.column_names and "shape_e2" in hosts.column_names:
        q_host, phi_host = shape_orientation(_f(hosts, "shape_e1"), _f(hosts, "shape_e2"))
        phi = np.where(np.isfinite(phi_host), phi_host, random_phi)
    host_mag_r = np.full(n, np.nan)
    if "flux_r" in hosts.column_names:
        with np.errstate(divide="ignore", invalid="ignore"):
            flux = _f(hosts, "flux_r")
            host_mag_r = np.where(flux > 0, 22.5 - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        if source_priors == "grid_sota" and not np.isfinite(host_mag_r).all():
            raise DHSError(f"--source_priors grid_sota: flux_r is not > 0 for {int((~np.isfinite(host_mag_r)).sum())} "
                           "usable host(s)")
    lenses = draw_lenses(stream(seed, "lens"), {"host_mag_r": host_mag_r, "host_phi": phi, "host_x": np.zeros(n),
                                                 "host_y": np.zeros(n)}, source_priors)
    lo, hi = load_conditions()["realistic_source_priors"]["lens_q"]
    lenses["lens_q"] = np.where(np.isfinite(q_host), np.clip(q_host, lo, hi), lenses["lens_q"])
    positive = is_control == 0
    cols: dict[str, pa.Array] = {
        "task_id": pa.array(np.arange(n, dtype=np.int64)),
        "host_id": hosts.column("task_id").combine_chunks(),
        "ra": pa.array(_f(hosts, "ra")), "dec": pa.array(_f(hosts, "dec")),
        "brickname": (hosts.column("brickname").combine_chunks().cast(pa.string()) if "brickname" in hosts.column_names
                      else pa.nulls(n, pa.string())),
        "region_id": (hosts.column("region_id").combine_chunks().cast(pa.int64()) if "region_id" in hosts.column_names
                      else pa.nulls(n, pa.int64())),
        "region_split": hosts.column("region_split").combine_chunks().cast(pa.string()),
        "is_control": pa.array(is_control),
        "noise_seed": pa.array(stream(seed, "noise").integers(0, 2**63 - 1, n, dtype=np.int64)),
        "host_mag_r": pa.array(host_mag_r, from_pandas=True),
    }
    for c in CONDITION_COLUMNS:
        cols[c] = pa.array(_f(hosts, c))
    for k, v in lenses.items():
        cols[k] = pa.array(v, pa.float64(), mask=~positive)
    if clumps.max > 0:
        for k, v in draw_clumps(stream(seed, "clumps"), lenses, clumps).items():
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float64()), clumps.max,
                                                        mask=pa.array(~positive))
    text = f"hosts={hosts_dir};seed={seed};source_priors={source_priors};control_frac={control_frac}"
    if clumps.max > 0:
        text += f";source_clumps=max:{clumps.max}"
    meta = {HOST_MANIFEST_TAG: text.encode(), HOSTS_SHA_TAG: sha.encode()}
    return pa.table(cols).replace_schema_metadata(meta), n_bad, n_known


def is_host_manifest(path) -> bool:
    meta = pq.read_schema(path).metadata or {}
    return HOST_MANIFEST_TAG in meta


# ----------------------------------------------------------------------------------------------------
# Injection
# ----------------------------------------------------------------------------------------------------

def inject_arcs(host_images: np.ndarray, rows: dict, psf_model: str, beta: float) -> dict:
    """Add the arcs of the positive rows to real stamps. ``rows``: manifest columns (numpy) incl.
    ``is_control``, ``noise_seed``, the conditions and the lens/source draws. Returns a dict with
    ``image`` (B, 3, 64, 64) float32, ``arc`` (noiseless), ``sky_sigma`` (B, 3), ``arc_fwhm`` (B, 3),
    ``arc_snr``, ``arc_snr_peak``, ``magnification`` (NaN for controls)."""
    images = np.array(host_images, np.float32, copy=True)
    b = len(images)
    fwhm = psf_fwhm(rows)
    sigma = sky_sigma(np.stack([np.asarray(rows[f"psfdepth_{x}"], np.float64) for x in BANDS], axis=-1),
                      sky_psf_sum_sq(fwhm))
    positive = np.asarray(rows["is_control"]) == 0
    arc = np.zeros_like(images)
    nan = np.full(b, np.nan)
    out = {"arc_fwhm": np.full((b, len(BANDS)), np.nan), "arc_snr": nan.copy(), "arc_snr_peak": nan.copy(),
           "magnification": nan.copy()}
    if positive.any():
        idx = np.flatnonzero(positive)
        sub = {k: v[idx] for k, v in rows.items()}
        res = render_arcs(sub, psf_model, beta)
        arc[idx] = res["arc"]
        out["arc_fwhm"][idx] = fwhm[idx]
        out["magnification"][idx] = res["magnification"]
        out["arc_snr"][idx], out["arc_snr_peak"][idx] = arc_snr(res["arc"], sigma[idx])
        inv_gain = np.float32(1.0 / GAIN_E_PER_NMGY)
        for j, i in enumerate(idx):
            z = np.random.default_rng(int(rows["noise_seed"][i])).standard_normal(images[i].shape, dtype=np.float32)
            a = res["arc"][j]
            images[i] += a + z * np.sqrt(np.maximum(a, np.float32(0)) * inv_gain)
    out.update(image=images, arc=arc, sky_sigma=sigma)
    return out


def _host_stamps(hosts_dir: str, host_ids: pa.Array) -> dict:
    ds = _dataset(hosts_dir)
    want = host_ids.cast(ds.schema.field("task_id").type)
    found = {}
    for batch in ds.to_batches(columns=["task_id", "stamp_npz"], filter=pc.field("task_id").isin(want), batch_size=256):
        for tid, blob in zip(batch.column("task_id").to_pylist(), batch.column("stamp_npz").to_pylist()):
            found[tid] = blob
    return found


def render_host_shard(manifest: pa.Table, hosts_dir: str, out_dir, psf_model: str, beta: float, shard: int,
                      n_shards: int, batch_size: int = 256, progress: bool = True) -> dict[str, int]:
    """Inject the arcs of one shard into the real host stamps; one parquet file per split (as inject)."""
    check_args(psf_model, beta, shard, n_shards, batch_size)
    task_id = manifest.column("task_id").to_numpy()
    idx = np.flatnonzero(shard_mask(task_id, shard, n_shards, batch_size))
    sub = manifest.take(pa.array(idx, pa.int64()))
    blobs = _host_stamps(hosts_dir, sub.column("host_id").combine_chunks())
    schema = output_schema(False, clump_slots(manifest.schema)).append(
        pa.field("host_id", manifest.schema.field("host_id").type))
    counts = {s: 0 for s in SPLITS}
    blocks = task_id[idx] // batch_size
    with contextlib.ExitStack() as stack:
        writers = {}
        for split in SPLITS:
            tmp = stack.enter_context(atomic_output(output_path(out_dir, split, shard)))
            writers[split] = stack.enter_context(pq.ParquetWriter(tmp, schema, compression="zstd"))
        for block in tqdm(np.unique(blocks), desc=f"inject hosts shard {shard}", unit="batch", disable=not progress,
                          file=sys.stderr):
            part = sub.filter(pa.array(blocks == block))
            rows = column_arrays(part)
            host_ids = part.column("host_id").combine_chunks()
            images = []
            for hid in host_ids.to_pylist():
                img = decode_stamp(blobs[hid]) if blobs.get(hid) is not None else None
                if img is None:
                    raise DHSError(f"host {hid}: stamp missing or unreadable in {hosts_dir} (was the host dataset "
                                   "rewritten after dhs manifest --hosts?)")
                images.append(img)
            res = inject_arcs(np.stack(images), rows, psf_model, beta)
            table, splits = batch_table(rows, SceneBatch(**res), psf_model, beta, False, {"host_id": host_ids},
                                        nan_as_null=True)
            for split in SPLITS:
                keep = np.flatnonzero(splits == split)
                if len(keep):
                    writers[split].write_table(table.take(pa.array(keep)))
                    counts[split] += len(keep)
    return counts


def run_inject(args) -> int:
    if getattr(args, "write_arc", False):
        raise DHSError("--write_arc is not available with --hosts (the arc is in the truth columns' draws)")
    manifest_path = Path(args.manifest)
    if not manifest_path.exists():
        raise DHSError(f"manifest {manifest_path} does not exist")
    if not is_host_manifest(manifest_path):
        raise DHSError(f"manifest {manifest_path} was not written by dhs manifest --hosts (it has no host_id)")
    drawn_from = (pq.read_schema(manifest_path).metadata or {}).get(HOSTS_SHA_TAG, b"").decode()
    now = dataset_sha256(args.hosts)
    if drawn_from != now:
        raise DHSError(f"manifest {manifest_path} was drawn from another host dataset than --hosts {args.hosts} "
                       f"(content hash {drawn_from[:12] or 'not recorded'} vs {now[:12]}): rerun dhs manifest --hosts "
                       "on the current hosts")
    manifest = pq.read_table(manifest_path)
    counts = render_host_shard(manifest, args.hosts, args.out_dir, args.psf_model, args.moffat_beta, args.shard,
                               args.n_shards, args.batch_size)
    print(f"inject hosts {args.variant or ''} shard {args.shard}/{args.n_shards} ({args.psf_model}): "
          + ", ".join(f"{s} {n}" for s, n in counts.items()) + f" rows -> {args.out_dir}")
    return 0


def run_manifest(args) -> int:
    if args.n_tasks is not None:
        raise DHSError("--n_tasks does not apply with --hosts (one task per usable host)")

    radius = 3.0 if args.exclude_radius_arcsec is None else args.exclude_radius_arcsec
    if radius < 0:
        raise DHSError(f"--exclude_radius_arcsec must be >= 0, got {radius}")
    table, n_bad, n_known = build_host_manifest(args.hosts, args.seed, args.control_frac, args.source_priors,
                                                clump_prior(args), args.known_lenses, radius)
    with atomic_output(args.out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    splits = table.column("region_split").to_pylist()
    print(f"manifest (hosts {args.hosts}): {table.num_rows} tasks ({int(np.sum(table.column('is_control')))} controls)"
          f", {n_bad} hosts with cutout_ok != 1 left out, {n_known} hosts within {radius:g} arcsec of a known lens "
          f"left out, train/val/test = {splits.count('train')}/"
          f"{splits.count('val')}/{splits.count('test')} -> {args.out}")
    return 0
