#!/usr/bin/env python
"""Fetch the real check set's pixels from their pinned public sources and write the check set.

The sources are listed in config/realcheck_sources.csv: one file per row, with its repository, commit, path,
git blob SHA-1 (checked after download, so a file changed upstream is refused), format, units, pixel scale
and how those are known. The pixels are not committed to this repository (their licences are not ours to
grant); this script rebuilds the same check set from the same commits.

    python scripts/fetch_realcheck.py --out data/realcheck
    python scripts/fetch_realcheck.py --out data/realcheck \
        --git_dir aditrivaishnavi/toy_glens_kinematics=/path/to/a/clone   # offline, from a local clone

Formats: ``lrg_catalog_csv`` is a DR10 LRG catalogue (``RA``, ``DEC``, ``TYPE``, ``z_mag``: the user's original
repository's parent sample): the controls are its early-type profiles (``TYPE`` DEV or SER) brighter than
z = ``CONTROL_MAX_ZMAG``, none within ``KNOWN_LENS_RADIUS`` of a known lens (lenscat, as ``dhs mine`` excludes
them), the first ``N_CONTROLS`` in the order of sha256 of their position; their 64x64 grz stamps come from
the Legacy Surveys cutout service through ``dhs cutouts``' fetcher (retries, cache), already on the
contract's grid (the service's CRPIX is the stamp centre), so they are not resampled. ``npz_hwc_meta`` is the user's original repository's cutout file: ``cutout`` (N, N, 3) grz in
nanomaggies from the Legacy Surveys cutout service (``meta_cutout_url``), ``meta_ra``/``meta_dec`` the
requested position, ``meta_pixel_scale`` the scale, ``meta_galaxy_id`` the id. The request position sits at
the service's CRPIX (N + 1) / 2, so ``darkhaloscope.sky.realcheck.to_contract`` resamples it to the
contract's 64x64 centre. Exits 2 with one line on any bad source; nothing is written then.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from darkhaloscope.errors import DHSError  # noqa: E402
from darkhaloscope.sky.realcheck import SOURCE_COLUMNS, to_contract, write_check_set  # noqa: E402

RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
N_CONTROLS = 120          # >= 80 usable, so that each half has >= 40 after failed cutouts
CONTROL_MAX_ZMAG = 19.7
KNOWN_LENS_RADIUS = 5.0   # arcsec


def git_blob_sha1(body: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


def read_source(row: dict, git_dirs: dict[str, str], timeout: float) -> bytes:
    if row["repo"] in git_dirs:
        try:
            body = subprocess.run(["git", "-C", git_dirs[row["repo"]], "show", f"{row['commit']}:{row['path']}"],
                                  check=True, capture_output=True).stdout
        except subprocess.CalledProcessError as exc:
            raise DHSError(f"{row['path']}: not in {git_dirs[row['repo']]} at {row['commit'][:12]} "
                           f"({exc.stderr.decode(errors='replace').strip()})") from None
    else:
        url = RAW_URL.format(**row)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read()
        except OSError as exc:
            raise DHSError(f"cannot download {url}: {exc}") from None
    if git_blob_sha1(body) != row["blob_sha1"]:
        raise DHSError(f"{row['repo']}:{row['path']} at {row['commit'][:12]} is not the pinned blob "
                       f"{row['blob_sha1'][:12]}")
    return body


def select_controls(body: bytes, known_lenses=None):
    """The catalogue rows to fetch (module docstring): a DataFrame with ra, dec, id, in hash order."""
    import pandas as pd

    from darkhaloscope.evaluation.mine import KnownLensIndex, load_known_lenses

    cat = pd.read_csv(io.BytesIO(body))
    missing = {"RA", "DEC", "TYPE", "z_mag"} - set(cat.columns)
    if missing:
        raise DHSError(f"LRG catalogue lacks column(s) {', '.join(sorted(missing))}")
    cat = cat[cat["TYPE"].isin(["DEV", "SER"]) & (cat["z_mag"] < CONTROL_MAX_ZMAG)].copy()
    near = KnownLensIndex(*load_known_lenses(known_lenses)).near(cat["RA"], cat["DEC"], KNOWN_LENS_RADIUS)
    cat = cat[~near]
    cat["id"] = [f"LRG_{ra:.6f}{dec:+.6f}" for ra, dec in zip(cat["RA"], cat["DEC"])]
    cat["order"] = [hashlib.sha256(i.encode()).hexdigest() for i in cat["id"]]
    return cat.sort_values("order").rename(columns={"RA": "ra", "DEC": "dec"})[["id", "ra", "dec"]]


def fetch_controls(row: dict, body: bytes, base_url: str, cache_dir, known_lenses=None,
                   n_controls: int = N_CONTROLS) -> list[dict]:
    """Cutouts of the selected controls; stops at ``n_controls`` usable ones (a failed cutout is skipped)."""
    from darkhaloscope.sky.cutouts import FetchPolicy, Fetcher, cache_path, cutout_params, cutout_url, judge, parse_fits

    fetcher = Fetcher(FetchPolicy(base_url=base_url, retries=2).check(), Path(cache_dir))
    out, failed = [], 0
    for r in select_controls(body, known_lenses).itertuples(index=False):
        if len(out) == n_controls:
            break
        reason = fetcher.fetch(r.ra, r.dec)
        image = None if reason else parse_fits(cache_path(fetcher.cache_dir, r.ra, r.dec).read_bytes())
        if reason or judge(image):
            failed += 1
            if failed > n_controls // 2:
                raise DHSError(f"{failed} control cutouts failed (last: {reason or judge(image)}): is "
                               f"{base_url} reachable?")
            continue
        query = "&".join(f"{k}={v}" for k, v in cutout_params(r.ra, r.dec).items())
        out.append({"id": r.id, "ra": r.ra, "dec": r.dec, "is_control": 1, "image": image,
                    "source_repo": f"{row['repo']}@{row['commit'][:12]}:{row['path']} (positions)",
                    "source_path": f"{cutout_url(base_url)}?{query}", "source_commit": row["commit"],
                    "source_units": row["units"], "source_pixscale": row["pixscale"]})
    return out


def parse(row: dict, body: bytes) -> dict:
    if row["format"] != "npz_hwc_meta":
        raise DHSError(f"{row['path']}: unknown format '{row['format']}'")
    if row["units"] != "nanomaggy":
        raise DHSError(f"{row['path']}: units '{row['units']}' are not nanomaggy (no conversion is defined)")
    with np.load(io.BytesIO(body), allow_pickle=False) as z:
        cube = np.asarray(z["cutout"], np.float64).transpose(2, 0, 1)
        ra, dec = float(z["meta_ra"]), float(z["meta_dec"])
        gid = str(z["meta_galaxy_id"])
        scale = float(z["meta_pixel_scale"])
    if abs(scale - float(row["pixscale"])) > 1e-6:
        raise DHSError(f"{row['path']}: file says {scale}\"/px, sources table {row['pixscale']}")
    rec = {"id": gid, "ra": ra, "dec": dec, "is_control": 1 if row["kind"] == "control" else 0,
           "image": to_contract(cube, ra, dec, scale),
           "source_repo": row["repo"], "source_path": row["path"], "source_commit": row["commit"],
           "source_units": row["units"], "source_pixscale": row["pixscale"]}
    assert set(SOURCE_COLUMNS) <= set(rec)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="check-set directory to write")
    p.add_argument("--sources", default=str(REPO / "config" / "realcheck_sources.csv"))
    p.add_argument("--git_dir", action="append", default=[], help="OWNER/NAME=DIR: read that repository from a "
                   "local clone or bare mirror instead of downloading")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--base_url", default="https://www.legacysurvey.org", help="cutout service (controls)")
    p.add_argument("--cache_dir", default=str(REPO / "data" / "realcheck.cache"), help="FITS cache of the controls")
    p.add_argument("--kinds", default="control,candidate",
                   help="which sources to fetch (candidate alone needs no cutout service)")
    p.add_argument("--n_controls", type=int, default=N_CONTROLS, help="usable control cutouts to keep")
    p.add_argument("--known_lenses", default=None, help="known-lens catalogue (default: lenscat, as dhs mine)")
    args = p.parse_args(argv)
    try:
        git_dirs = {}
        for item in args.git_dir:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise DHSError(f"--git_dir '{item}' must be OWNER/NAME=DIR")
            git_dirs[name] = path
        with open(args.sources, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise DHSError(f"{args.sources} lists no source")
        for row in rows:
            if row["kind"] not in ("control", "candidate"):
                raise DHSError(f"{row['path']}: kind '{row['kind']}' is not control or candidate")
        kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
        if not kinds or not kinds <= {"control", "candidate"}:
            raise DHSError(f"--kinds '{args.kinds}' must list control and/or candidate")
        records = []
        for row in (r for r in rows if r["kind"] in kinds):
            body = read_source(row, git_dirs, args.timeout)
            if row["format"] == "lrg_catalog_csv":
                records += fetch_controls(row, body, args.base_url, args.cache_dir, args.known_lenses,
                                          args.n_controls)
            else:
                records.append(parse(row, body))
        counts = write_check_set(records, args.out)
    except (DHSError, OSError, KeyError, ValueError) as exc:  # nothing is written before every source is read
        print(f"fetch_realcheck: error: {exc}", file=sys.stderr)
        return 2
    print("fetch_realcheck: " + ", ".join(f"{k} {h}: {n}" for (k, h), n in sorted(counts.items()))
          + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
