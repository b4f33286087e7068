"""Phase 4a: the task manifest (``dhs manifest``).

One row per task with every random draw frozen, so that every data variant renders the same hosts,
neighbours, stars, confusers, sky positions and noise, and any shard can be re-rendered alone.

Conventions (also in docs/simulator.md):
- positions ``*_x``/``*_y`` are in arcsec relative to the stamp centre (pixel (31.5, 31.5)); +x is the
  column index, +y the row index of the stored array;
- angles ``*_phi`` are in radians, counter-clockwise from +x towards +y; axis ratios ``*_q`` = b/a;
- magnitudes are AB, fluxes nanomaggies; ``psfsize_*`` FWHM arcsec; ``psfdepth_*`` 5-sigma AB mag.

Neighbours and stars sit in fixed-size list columns (``nb_*`` with ``MAX_NEIGHBOURS`` slots, ``star_*``
with ``MAX_STARS`` slots); an unused slot has a NaN magnitude. Lens and source columns are null for
controls. ``noise_seed`` seeds the one per-task generator used for the pixel noise.

Optional source clumps (``--source_clumps_max`` K > 0): fixed-size list columns ``src_clump_*`` with K
slots (NaN in every field of an empty slot, null for controls); the manifest has no such column when
K = 0, and is then the same, byte for byte, as without the option.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output, check_writable
from darkhaloscope.simulation.draws import (CONFUSER_COLUMNS, LENS_COLUMNS, NEIGHBOUR_COLUMNS, SOURCE_PRIORS,
                                            STAR_COLUMNS, ClumpPrior, brickname_of, clump_prior, draw_clumps,
                                            draw_conditions, draw_confusers, draw_lenses, draw_neighbours,
                                            draw_positions, draw_stars, region_split_of, stream)
from darkhaloscope.simulation import realism
from darkhaloscope.simulation.hosts import HOST_PRIORS, draw_hosts
from darkhaloscope.simulation.real_hosts import run_manifest
from darkhaloscope.simulation.realism import RealismPrior
from darkhaloscope.stamps.contract import CONDITION_COLUMNS
from darkhaloscope.values import parse_floats


# Columns ``dhs inject`` needs; a manifest lacking any of them is refused.
HOST_COLUMNS = ("host_mag_r", "host_g_minus_r", "host_r_minus_z", "host_reff", "host_n", "host_q",
                "host_phi", "host_x", "host_y")
# Written by every manifest, not needed to render (an older manifest without it is still accepted):
# the host's Tractor type, REX / EXP / DEV / SER (see simulation.hosts).
HOST_TYPE_COLUMN = "host_type"
REQUIRED_COLUMNS = (("task_id", "ra", "dec", "brickname", "region_id", "region_split", "is_control",
                     "noise_seed") + CONDITION_COLUMNS + HOST_COLUMNS + NEIGHBOUR_COLUMNS + STAR_COLUMNS
                    + CONFUSER_COLUMNS + LENS_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------

SPLIT_FRACS_TOLERANCE = 1e-6


def parse_split_fracs(value, flag: str = "--split_fracs") -> tuple[float, float, float]:
    """``train,val,test`` (a string or a sequence): three non-negative fractions that sum to 1. The one
    check of split fractions: `dhs manifest`, `dhs cutouts` and the workflow's config check use it."""
    fracs = tuple(parse_floats(value, flag, count=3))
    if any(f < 0 for f in fracs) or abs(sum(fracs) - 1.0) > SPLIT_FRACS_TOLERANCE:
        raise DHSError(f"{flag} '{value}' must be three non-negative fractions train,val,test that sum to 1")
    return fracs


def build_manifest(n_tasks: int, seed: int, control_frac: float = 0.5, split_fracs=(0.7, 0.15, 0.15),
                   source_priors: str = "realistic", confuser_frac: float = 0.1,
                   n_regions: int | None = None, clumps: ClumpPrior = ClumpPrior(),
                   host_priors: str = "dr10", train_confuser_frac: float | None = None,
                   real: RealismPrior = RealismPrior()) -> pa.Table:
    """The Phase 4a table as a pyarrow Table (see the module docstring for conventions).

    ``real`` switches on the real-sky effects of ``simulation.realism`` (docs/realism.md), each drawn from its
    own stream into its own columns: with all of them off the table is column for column the plain one.

    ``train_confuser_frac`` (None: ``confuser_frac``) is the confuser rate of the training split's rows only,
    still the same in both classes: the network can see more of the lens-like features that set its false
    positives, while validation and test keep the population's rate."""
    clumps.check()
    real.check()
    if n_tasks < 1:
        raise DHSError(f"--n_tasks must be >= 1, got {n_tasks}")
    if not 0.0 <= control_frac <= 1.0:
        raise DHSError(f"--control_frac must be in [0, 1], got {control_frac}")
    if not 0.0 <= confuser_frac <= 1.0:
        raise DHSError(f"--confuser_frac must be in [0, 1], got {confuser_frac}")
    if train_confuser_frac is not None and not 0.0 <= train_confuser_frac <= 1.0:
        raise DHSError(f"--train_confuser_frac must be in [0, 1], got {train_confuser_frac}")
    if source_priors not in SOURCE_PRIORS:
        raise DHSError(f"unknown --source_priors '{source_priors}' (choose from {', '.join(SOURCE_PRIORS)})")
    if host_priors not in HOST_PRIORS:
        raise DHSError(f"unknown --host_priors '{host_priors}' (choose from {', '.join(HOST_PRIORS)})")
    if n_regions is None:
        n_regions = max(24, int(np.ceil(n_tasks / 40)))
    if n_regions < 1:
        raise DHSError(f"--n_regions must be >= 1, got {n_regions}")
    split_fracs = parse_split_fracs(split_fracs)

    n = int(n_tasks)
    ra, dec, region_id, region_index = draw_positions(stream(seed, "sky"), n, int(n_regions))
    label_rng = stream(seed, "label")
    is_control = np.zeros(n, np.int32)
    is_control[label_rng.permutation(n)[: int(round(control_frac * n))]] = 1
    cols: dict[str, object] = {
        "task_id": np.arange(n, dtype=np.int64),
        "ra": ra, "dec": dec,
        "brickname": brickname_of(ra, dec),
        "region_id": region_id.astype(np.int64),
        "region_split": region_split_of(region_id, split_fracs),
        "is_control": is_control,
        "noise_seed": stream(seed, "noise").integers(0, 2**63 - 1, n, dtype=np.int64),
    }
    cols.update(draw_conditions(stream(seed, "conditions"), region_index))
    hosts = draw_hosts(stream(seed, "host"), n, host_priors)
    is_train = cols["region_split"] == "train"
    if real.train_centre_jitter_px:  # training rows only: the host (and the lens that follows it) off-centre
        dx, dy = realism.centre_jitter(stream(seed, "centre_jitter"), n, real.train_centre_jitter_px)
        hosts["host_x"] = hosts["host_x"] + np.where(is_train, dx, 0.0)
        hosts["host_y"] = hosts["host_y"] + np.where(is_train, dy, 0.0)
    cols.update(hosts)
    cols.update(draw_neighbours(stream(seed, "neighbours"), n))
    cols.update(draw_stars(stream(seed, "stars"), n))
    frac = confuser_frac if train_confuser_frac is None else \
        np.where(cols["region_split"] == "train", train_confuser_frac, confuser_frac)
    cols.update(draw_confusers(stream(seed, "confusers"), n, frac))
    if real.companion_rate or real.train_companion_rate:
        rate = real.companion_rate if real.train_companion_rate is None else \
            np.where(is_train, real.train_companion_rate, real.companion_rate)
        cols.update(realism.draw_companions(stream(seed, "companions"), hosts, rate))
    if real.psf_shape:
        cols.update(realism.draw_psf_shapes(stream(seed, "psf_shape"), n))
    if real.correlated_noise:
        cols[realism.NOISE_CORR_COLUMN] = np.ones(n, np.int8)
    if real.bad_pixel_rate:
        cols.update(realism.draw_bad_pixels(stream(seed, "bad_pixels"), n, real.bad_pixel_rate))
    lenses = draw_lenses(stream(seed, "lens"), hosts, source_priors)
    positive = is_control == 0
    for k, v in lenses.items():
        cols[k] = pa.array(v, pa.float64(), mask=~positive)
    if clumps.max > 0:  # own stream: the other draws are the same with and without clumps
        for k, v in draw_clumps(stream(seed, "clumps"), lenses, clumps).items():
            cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float64()), clumps.max,
                                                        mask=pa.array(~positive))
    arrays = {}
    for k, v in cols.items():
        if isinstance(v, pa.Array):
            arrays[k] = v
        elif isinstance(v, np.ndarray) and v.ndim == 2:
            arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), pa.float64()), v.shape[1])
        elif isinstance(v, np.ndarray) and v.dtype == object:
            arrays[k] = pa.array(list(v), pa.string())
        else:
            arrays[k] = pa.array(v)
    text = (f"seed={seed};host_priors={host_priors};source_priors={source_priors};n_regions={n_regions};"
            f"control_frac={control_frac};confuser_frac={confuser_frac};"
            f"split_fracs={','.join(map(str, split_fracs))}")
    if train_confuser_frac is not None:
        text += f";train_confuser_frac={train_confuser_frac}"
    if clumps.max > 0:
        text += (f";source_clumps=max:{clumps.max},flux_frac:{clumps.flux_frac[0]}-{clumps.flux_frac[1]},"
                 f"sigma_arcsec:{clumps.sigma_arcsec[0]}-{clumps.sigma_arcsec[1]},radius_reff:{clumps.radius_reff}")
    if real.any:
        text += ";" + real.describe()
    meta = {b"dhs_manifest": text.encode()}
    return pa.table(arrays).replace_schema_metadata(meta)


def add_test_controls(table: pa.Table, n_extra: int, seed: int, split_fracs=(0.7, 0.15, 0.15),
                      source_priors: str = "realistic", confuser_frac: float = 0.1, clumps: ClumpPrior = ClumpPrior(),
                      host_priors: str = "dr10", real: RealismPrior = RealismPrior()) -> pa.Table:
    """Append ``n_extra`` control tasks in test-split sky regions, so that a test split can resolve low FPRs
    (1e-4 needs >= 10^4 controls) without growing the training set.

    The extra rows are drawn by ``build_manifest`` itself (all controls, a seed derived from ``seed``), then
    only the rows of test regions are kept: hosts, neighbours, stars, confusers and observing conditions
    follow exactly the distribution of the ordinary controls. task_ids continue after the table's."""
    if n_extra < 0:
        raise DHSError(f"--extra_test_controls must be >= 0, got {n_extra}")
    if n_extra == 0:
        return table
    test_frac = parse_split_fracs(split_fracs)[2]
    if test_frac <= 0:
        raise DHSError("--extra_test_controls needs a test split: the test fraction of --split_fracs is 0")
    extra_seed = int(np.random.SeedSequence([int(seed), 0x7E57C7]).generate_state(1)[0])
    n_draw = int(np.ceil(1.3 * n_extra / test_frac)) + 100
    while True:  # regions are clustered, so the test share of a draw varies: draw more until enough
        extra = build_manifest(n_draw, extra_seed, 1.0, split_fracs, source_priors, confuser_frac, clumps=clumps,
                               host_priors=host_priors, real=real)
        is_test = np.asarray(extra.column("region_split").to_pylist(), dtype=object) == "test"
        if is_test.sum() >= n_extra:
            break
        n_draw *= 2
    extra = extra.take(pa.array(np.flatnonzero(is_test)[:n_extra]))
    start = int(pc.max(table.column("task_id")).as_py()) + 1 if table.num_rows else 0
    extra = extra.set_column(extra.schema.get_field_index("task_id"), "task_id",
                             pa.array(np.arange(start, start + n_extra, dtype=np.int64)))
    extra = extra.cast(table.schema)
    text = table.schema.metadata[b"dhs_manifest"].decode() + f";extra_test_controls={n_extra}"
    return pa.concat_tables([table, extra]).replace_schema_metadata({b"dhs_manifest": text.encode()})


def first_extra_test_id(path) -> int | None:
    """The first task_id of the manifest's extra test-only controls (``add_test_controls``: they are its last
    ``extra_test_controls=N`` task_ids), or None when it has none or cannot be read (``read_manifest`` then
    says what is wrong with it)."""
    try:
        meta = (pq.read_schema(path).metadata or {}).get(b"dhs_manifest", b"").decode()
    except Exception:  # noqa: BLE001  (any unreadable file: read_manifest reports it)
        return None
    n_extra = sum(int(m) for m in re.findall(r"extra_test_controls=(\d+)", meta))
    if n_extra == 0:
        return None
    ids = pq.read_table(path, columns=["task_id"]).column("task_id")
    return int(pc.max(ids).as_py()) - n_extra + 1


MANIFEST_ROW_GROUP = 65536


def write_manifest(table: pa.Table, path) -> None:
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=MANIFEST_ROW_GROUP)


def validate_manifest(table: pa.Table, where: str = "manifest") -> pa.Table:
    """Refuse a manifest that lacks a column or has non-finite observing conditions."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DHSError(f"{where} lacks column(s): {', '.join(missing)}")
    for c in CONDITION_COLUMNS + ("ra", "dec"):
        v = table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(v)
        if bad.any():
            tid = table.column("task_id").to_numpy()[np.argmax(bad)]
            raise DHSError(f"{where}: column {c} is NaN/inf/null in {int(bad.sum())} row(s) (first task_id {tid})")
    if (table.column("psfsize_r").to_numpy() <= 0).any():
        raise DHSError(f"{where}: psfsize_r must be > 0 arcsec")
    return table


def read_manifest(path, row_filter=None) -> pa.Table:
    """Read and validate a manifest; ``row_filter(task_id) -> bool mask`` reads only those rows (a
    shard reads its own rows of a large manifest instead of all of it)."""
    path = Path(path)
    if not path.exists():
        raise DHSError(f"manifest {path} does not exist")
    try:
        if row_filter is None:
            table = pq.read_table(path)
        else:
            ids = pq.read_table(path, columns=["task_id"]).column("task_id").to_numpy()
            if len(np.unique(ids)) != len(ids):
                raise DHSError(f"manifest {path} has repeated task_id values")
            pieces = []  # one row group at a time: memory stays that of one row group + the kept rows
            with pq.ParquetFile(path) as pf:
                for i in range(pf.metadata.num_row_groups):
                    group = pf.read_row_group(i, use_threads=False)
                    mask = row_filter(group.column("task_id").to_numpy())
                    if mask.any():
                        pieces.append(group.filter(pa.array(mask)))
                    del group
                schema = pf.schema_arrow
            table = pa.concat_tables(pieces) if pieces else schema.empty_table()
    except DHSError:
        raise
    except Exception as exc:  # any unreadable file is bad input
        raise DHSError(f"manifest {path} is not a readable parquet file with a task_id column "
                       f"({type(exc).__name__})") from None
    return validate_manifest(table, f"manifest {path}")


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output manifest parquet")
    parser.add_argument("--n_tasks", type=int, default=None, help="number of simulated tasks (not with --hosts)")
    parser.add_argument("--hosts", default=None,
                        help="real host stamps from dhs cutouts: one task per usable host (simulation.real_hosts)")
    parser.add_argument("--known_lenses", action="append", default=None,
                        help="with --hosts: known lenses (CSV/parquet/FITS with ra/dec, or 'lenscat'; repeatable; "
                             "default lenscat); hosts near one are left out, as mining leaves them out")
    parser.add_argument("--exclude_radius_arcsec", type=float, default=None,
                        help="with --hosts: leave out hosts within this radius of a known lens (default 3; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control_frac", type=float, default=0.5, help="fraction of unpaired controls")
    parser.add_argument("--split_fracs", default="0.7,0.15,0.15", help="train,val,test fractions of sky regions")
    parser.add_argument("--source_priors", default="realistic", choices=SOURCE_PRIORS)
    parser.add_argument("--host_priors", default="dr10", choices=HOST_PRIORS,
                        help="host LRGs like the DR10 parent sample (dr10) or the seed's n ~ 4 hosts (sota)")
    parser.add_argument("--confuser_frac", type=float, default=0.1,
                        help="fraction of stamps (both classes) with a lens-like confuser")
    parser.add_argument("--train_confuser_frac", type=float, default=None,
                        help="confuser rate of the training split only (both classes; default --confuser_frac)")
    parser.add_argument("--extra_test_controls", type=int, default=0,
                        help="extra control tasks in test-split regions only (low-FPR estimates; training unchanged)")
    parser.add_argument("--n_regions", type=int, default=None,
                        help="number of distinct sky cells the tasks are drawn from (default n_tasks/40, at least 24)")
    d = ClumpPrior()
    parser.add_argument("--source_clumps_max", type=int, default=d.max,
                        help="Gaussian clumps per lensed source, uniform in 0..max (0 = smooth Sersic sources)")
    parser.add_argument("--source_clumps_flux_frac", default=",".join(map(str, d.flux_frac)),
                        help="lo,hi: each clump's share of the unlensed source flux (max x hi <= 1)")
    parser.add_argument("--source_clumps_sigma_arcsec", default=",".join(map(str, d.sigma_arcsec)),
                        help="lo,hi: Gaussian sigma of a clump in the source plane, arcsec")
    parser.add_argument("--source_clumps_radius_reff", type=float, default=d.radius_reff,
                        help="clump centres within this many src_reff of the source centre")
    parser.add_argument("--companion_rate", type=float, default=0.0,
                        help="mean close companions per stamp, 0.5-5 arcsec from the host (both classes; docs/realism.md)")
    parser.add_argument("--train_companion_rate", type=float, default=None,
                        help="the training split's own companion rate (both classes; default --companion_rate)")
    parser.add_argument("--correlated_noise", action="store_true",
                        help="pixel noise correlated as in DR10 coadds (measured on real cutouts)")
    parser.add_argument("--psf_shape", action="store_true",
                        help="PSF ellipticity, band-to-band offsets and a one-sided wing on top of the round Moffat")
    parser.add_argument("--bad_pixel_rate", type=float, default=0.0,
                        help="fraction of stamps with one masked run or hot pixel")
    parser.add_argument("--train_centre_jitter_px", type=float, default=0.0,
                        help="extra host offset, uniform in a disc of this radius (pixels), training split only")


def realism_prior(args) -> RealismPrior:
    return RealismPrior(args.companion_rate, args.train_companion_rate, args.correlated_noise, args.psf_shape,
                        args.bad_pixel_rate, args.train_centre_jitter_px).check()


def run(args) -> int:
    check_writable(args.out, "--out")  # before the work, not after it
    if args.hosts is not None:
        return run_manifest(args)
    if args.n_tasks is None:
        raise DHSError("--n_tasks is required (or --hosts DIR for real host stamps)")
    if args.known_lenses or args.exclude_radius_arcsec is not None:
        raise DHSError("--known_lenses and --exclude_radius_arcsec apply to real hosts only (add --hosts DIR)")
    table = build_manifest(args.n_tasks, args.seed, args.control_frac, parse_split_fracs(args.split_fracs),
                           args.source_priors, args.confuser_frac, args.n_regions, clump_prior(args),
                           args.host_priors, args.train_confuser_frac, realism_prior(args))
    table = add_test_controls(table, args.extra_test_controls, args.seed, parse_split_fracs(args.split_fracs),
                              args.source_priors, args.confuser_frac, clump_prior(args), args.host_priors,
                              realism_prior(args))
    write_manifest(table, args.out)
    splits = table.column("region_split").to_pylist()
    print(f"manifest: {table.num_rows} tasks ({int(table.column('is_control').to_numpy().sum())} controls), "
          f"train/val/test = {splits.count('train')}/{splits.count('val')}/{splits.count('test')} -> {args.out}")
    return 0
