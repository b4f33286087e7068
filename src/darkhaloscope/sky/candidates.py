"""`dhs candidates`: the real-sky search's last step, a ranked list that a person grades.

Build (``--scores``, ``--data``, ``--out_csv``, ``--out_html``): the rows of a real-sky score file (``dhs infer
--split all`` of the parent sample's cutouts) ranked by ``logit`` (descending; ties by ``task_id``), de-duplicated
by sky position (astropy ``SkyCoord.search_around_sky``: a row within ``--dedup_arcsec`` of a higher-ranked one
is the same object seen twice, e.g. in two overlapping sweep files, and is dropped; the kept row counts it in
``n_duplicates``), the top ``--top_n`` kept. Each candidate is matched to the known lenses (the ``lenscat``
catalogue by default, or ``--known_lenses FILE``; ``SkyCoord.match_to_catalog_sky``, within
``--match_arcsec``): ``known_lens`` names the match.

The CSV has one row per candidate: ``rank``, ``task_id``, ``ra``, ``dec``, ``logit``, ``score``, the observing
conditions (``psfsize_g/r/z`` FWHM arcsec, ``psfdepth_g/r/z`` 5-sigma AB depth), ``region_split``,
``n_duplicates``, ``known_lens``/``known_lens_grading``/``known_lens_sep_arcsec``, ``viewer_url`` (the Legacy
Surveys viewer at the position, DR10, zoom 16) and an empty ``grade`` column for the person who inspects them.

The HTML page is self-contained (images inline as PNG): per candidate, a g, r, z colour composite made with
astropy's ``make_lupton_rgb`` (z, r, g as red, green, blue; asinh stretch scaled to the stamp's own sky noise:
``report.colour_composite``), the three sky-normalised channels the network reads (``contract.normalize_stamps``,
units of the sky noise, shown from -3 to +10 sigma; the ``clip`` input stretch cuts at +-10), the rank, score,
logit, conditions, the viewer link and a flag for a known-lens match.

Grades (``--grades FILE``): reads the CSV back after a person filled in ``grade`` and prints how many candidates
have each grade (empty: ``ungraded``) and the purity at each rank: among the graded candidates of rank <= k, the
fraction whose grade is one of ``--positive_grades`` (default A,B), with its 95% Wilson interval; ``--purity_csv``
also writes that table.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from darkhaloscope.catalogs import read_known_lenses
from darkhaloscope.errors import DHSError
from darkhaloscope.evaluation.report import colour_composite, CSS, missing
from darkhaloscope.io import atomic_output
from darkhaloscope.metrics import wilson_interval
from darkhaloscope.stamps.contract import BANDS, normalize_stamps
from darkhaloscope.stamps.dataset import fetch_rows, open_dataset

log = logging.getLogger("dhs.candidates")

VIEWER = "https://www.legacysurvey.org/viewer?ra={ra:.6f}&dec={dec:.6f}&layer=ls-dr10&zoom=16"
CONDITIONS = ("psfsize_g", "psfsize_r", "psfsize_z", "psfdepth_g", "psfdepth_r", "psfdepth_z")
UNGRADED = "ungraded"


# ----------------------------------------------------------------------------------------------------
# Ranking, de-duplication, known lenses
# ----------------------------------------------------------------------------------------------------

def read_scores(path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise DHSError(f"score file {path} does not exist")
    try:
        df = pq.read_table(path).to_pandas()
    except Exception as exc:
        raise DHSError(f"score file {path} is not a readable parquet ({type(exc).__name__})") from None
    missing = [c for c in ("task_id", "ra", "dec", "logit", "score") if c not in df.columns]
    if missing:
        raise DHSError(f"score file {path} lacks column(s) {', '.join(missing)} (not a dhs infer score file "
                       "of a real-sky catalogue)")
    good = np.isfinite(df["ra"].to_numpy(np.float64)) & np.isfinite(df["dec"].to_numpy(np.float64))
    if not good.all():
        log.warning("%d scored rows without a position are not candidates", int((~good).sum()))
    return df[good].reset_index(drop=True)


def rank_unique(scores: pd.DataFrame, top_n: int, dedup_arcsec: float) -> pd.DataFrame:
    """The top ``top_n`` rows by logit, a row within ``dedup_arcsec`` of a higher-ranked kept row dropped."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    order = scores.sort_values(["logit", "task_id"], ascending=[False, True], kind="mergesort").reset_index(drop=True)
    coords = SkyCoord(order["ra"].to_numpy(np.float64) * u.deg, order["dec"].to_numpy(np.float64) * u.deg)
    neighbours: dict[int, list[int]] = {}
    if dedup_arcsec > 0 and len(order) > 1:
        i, j, _, _ = coords.search_around_sky(coords, dedup_arcsec * u.arcsec)
        for a, b in zip(i, j):
            if a < b:  # b ranks below a
                neighbours.setdefault(int(a), []).append(int(b))
    dropped = np.zeros(len(order), bool)
    kept, dups = [], []
    for k in range(len(order)):
        if dropped[k]:
            continue
        later = [b for b in neighbours.get(k, []) if not dropped[b]]
        dropped[later] = True
        kept.append(k)
        dups.append(len(later))
        if len(kept) == top_n:
            break
    out = order.iloc[kept].reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["n_duplicates"] = dups
    return out


def match_known(cands: pd.DataFrame, known: pd.DataFrame, match_arcsec: float) -> pd.DataFrame:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    cands = cands.copy()
    cands["known_lens"] = ""
    cands["known_lens_grading"] = ""
    cands["known_lens_sep_arcsec"] = np.nan
    if known is None or not len(known) or not len(cands):
        return cands
    c = SkyCoord(cands["ra"].to_numpy(np.float64) * u.deg, cands["dec"].to_numpy(np.float64) * u.deg)
    k = SkyCoord(known["ra"].to_numpy(np.float64) * u.deg, known["dec"].to_numpy(np.float64) * u.deg)
    idx, sep, _ = c.match_to_catalog_sky(k)
    sep = sep.to_value(u.arcsec)
    hit = sep <= match_arcsec
    names = known["name"].astype(str).to_numpy() if "name" in known else np.array(
        [f"known lens at ({r:.5f}, {d:+.5f})" for r, d in zip(known["ra"], known["dec"])])
    grading = known["grading"].astype(str).to_numpy() if "grading" in known else np.full(len(known), "")
    cands.loc[hit, "known_lens"] = names[idx[hit]]
    cands.loc[hit, "known_lens_grading"] = grading[idx[hit]]
    cands.loc[hit, "known_lens_sep_arcsec"] = sep[hit]
    return cands


# ----------------------------------------------------------------------------------------------------
# The gallery
# ----------------------------------------------------------------------------------------------------

def _png(rgb_or_gray: np.ndarray, **kwargs) -> str:
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb_or_gray, format="png", origin="lower", **kwargs)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _stamp_images(stamp: np.ndarray) -> list[tuple[str, str]]:
    """[(label, base64 PNG)]: the colour composite, then the normalised g, r, z channels."""
    images = [("grz composite", _png(colour_composite(stamp)))]
    norm = normalize_stamps(stamp[None].astype(np.float32).copy(), clip=None)[0]
    for band, channel in zip(BANDS, norm):
        images.append((f"{band} (sky sigma)", _png(channel, cmap="gray", vmin=-3.0, vmax=10.0)))
    return images


GALLERY_CSS = """.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px;width:540px}
.card.known{border:3px solid #c60}.card img{width:128px;height:128px;image-rendering:pixelated;margin-right:4px}
.card figure{display:inline-block;margin:0}.card figcaption{font-size:0.7em;text-align:center}
.flag{background:#c60;color:#fff;padding:1px 4px;font-size:0.8em}.card dl{font-size:0.8em;margin:4px 0}
.card dt{display:inline;font-weight:bold}.card dd{display:inline;margin:0 10px 0 2px}"""


def _fmt(v, spec=".3g") -> str:
    try:
        return format(float(v), spec) if v is not None and math.isfinite(float(v)) else "-"
    except (TypeError, ValueError):
        return html.escape(str(v))


def gallery_html(cands: pd.DataFrame, rows: dict, title: str, note: str) -> str:
    cards = []
    for c in cands.itertuples(index=False):
        row = rows.get(c.task_id)
        known = bool(c.known_lens)
        if row is None or row.get("stamp") is None:
            figs = missing("no stamp in --data for this task id")
        else:
            figs = "".join(f'<figure><img alt="{html.escape(label)}" data-kind="{i}" '
                           f'src="data:image/png;base64,{png}"><figcaption>{html.escape(label)}</figcaption></figure>'
                           for i, (label, png) in enumerate(_stamp_images(row["stamp"])))
        conds = "".join(f"<dt>{k}</dt><dd>{_fmt(getattr(c, k, None))}</dd>" for k in CONDITIONS if k in cands.columns)
        flag = (f'<span class="flag">known lens: {html.escape(c.known_lens)} {html.escape(c.known_lens_grading)} '
                f'({c.known_lens_sep_arcsec:.1f}")</span>' if known else "")
        cards.append(
            f'<div class="card{" known" if known else ""}" id="rank-{c.rank}" data-rank="{c.rank}">'
            f'<div><b>#{c.rank}</b> score {_fmt(c.score, ".4f")} (logit {_fmt(c.logit, ".2f")}) '
            f'task {html.escape(str(c.task_id))} {flag}</div>{figs}'
            f'<dl><dt>ra</dt><dd>{c.ra:.6f}</dd><dt>dec</dt><dd>{c.dec:+.6f}</dd>{conds}'
            f'<dt>duplicates</dt><dd>{c.n_duplicates}</dd></dl>'
            f'<a href="{html.escape(c.viewer_url)}" target="_blank" rel="noopener">Legacy Surveys viewer</a></div>')
    body = (f'<p class="note">{html.escape(note)}</p>' + (f'<div class="cards">{"".join(cards)}</div>' if cards
                                                         else missing("no candidates")))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}\n{GALLERY_CSS}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def build(args) -> pd.DataFrame:
    scores = read_scores(args.scores)
    if not len(scores):
        raise DHSError(f"score file {args.scores} has no rows with a position")
    known = None if args.no_known_lenses else read_known_lenses(args.known_lenses)
    cands = rank_unique(scores, args.top_n, args.dedup_arcsec)
    cands = match_known(cands, known, args.match_arcsec)
    _, ds = open_dataset(args.data)
    want = [c for c in CONDITIONS if c in ds.schema.names]
    rows = fetch_rows(args.data, cands["task_id"].tolist(), want)
    lost = [t for t in cands["task_id"] if t not in rows]
    if lost:
        raise DHSError(f"{len(lost)} candidate(s) of {args.scores} are not in --data {args.data} (e.g. task_id "
                       f"{lost[0]}): the score file is not of this dataset")
    for c in want:
        cands[c] = [rows[t][c] for t in cands["task_id"]]
    cands["viewer_url"] = [VIEWER.format(ra=r, dec=d) for r, d in zip(cands["ra"], cands["dec"])]
    cands["grade"] = ""
    keep = ["rank", "task_id", "ra", "dec", "logit", "score", *want,
            *[c for c in ("region_split", "brickname") if c in cands.columns], "n_duplicates", "known_lens",
            "known_lens_grading", "known_lens_sep_arcsec", "viewer_url", "grade"]
    cands = cands[keep]
    with atomic_output(args.out_csv) as tmp:
        cands.to_csv(tmp, index=False, float_format="%.10g")
    if args.out_html:
        n_known = int((cands["known_lens"] != "").sum())
        note = (f"Top {len(cands)} of {len(scores)} scored positions of {args.scores}, ranked by logit, de-duplicated "
                f"within {args.dedup_arcsec:g} arcsec; {n_known} within {args.match_arcsec:g} arcsec of a known lens "
                f"(orange). Colour: astropy make_lupton_rgb of z, r, g (asinh stretch in units of each stamp's sky "
                f"noise). Grey: the sky-normalised g, r, z channels the network reads, -3 to +10 sigma. Grade "
                f"them in {Path(args.out_csv).name}'s grade column.")
        page = gallery_html(cands, rows, "darkhaloscope: real-sky candidates", note)
        with atomic_output(args.out_html) as tmp:
            Path(tmp).write_text(page, encoding="utf-8")
    return cands


# ----------------------------------------------------------------------------------------------------
# Grades read back
# ----------------------------------------------------------------------------------------------------

def purity_table(graded: pd.DataFrame, positive: set[str]) -> pd.DataFrame:
    """Per rank: cumulative graded and positive candidates, purity = positive / graded with a Wilson interval."""
    g = graded.sort_values("rank")
    is_graded = (g["grade"] != UNGRADED).to_numpy()
    is_pos = g["grade"].isin(positive).to_numpy()
    n_graded, n_pos = np.cumsum(is_graded), np.cumsum(is_pos)
    rows = []
    for rank, grade, ng, npos in zip(g["rank"], g["grade"], n_graded, n_pos):
        lo, hi = wilson_interval(int(npos), int(ng)) if ng else (math.nan, math.nan)
        rows.append({"rank": int(rank), "grade": grade, "n_graded": int(ng), "n_positive": int(npos),
                     "purity": npos / ng if ng else math.nan, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def read_grades(path) -> pd.DataFrame:
    if not Path(path).exists():
        raise DHSError(f"grades file {path} does not exist")
    try:
        df = pd.read_csv(path, dtype={"grade": str}, keep_default_na=False)
    except Exception as exc:
        raise DHSError(f"grades file {path} is not a readable CSV ({type(exc).__name__})") from None
    missing = [c for c in ("rank", "grade") if c not in df.columns]
    if missing:
        raise DHSError(f"grades file {path} lacks column(s) {', '.join(missing)} (not a dhs candidates CSV)")
    try:
        df["rank"] = df["rank"].astype(int)
    except (TypeError, ValueError):
        raise DHSError(f"grades file {path}: rank is not an integer in every row") from None
    if df["rank"].duplicated().any():
        raise DHSError(f"grades file {path}: rank {df['rank'][df['rank'].duplicated()].iloc[0]} appears twice")
    df["grade"] = df["grade"].astype(str).str.strip().replace("", UNGRADED)
    return df


def report_grades(args) -> pd.DataFrame:
    positive = {g.strip() for g in args.positive_grades.split(",") if g.strip()}
    if not positive:
        raise DHSError("--positive_grades names no grade")
    graded = read_grades(args.grades)
    counts = graded["grade"].value_counts().sort_index()
    table = purity_table(graded, positive)
    print(f"{len(graded)} candidates in {args.grades}; grades: "
          + ", ".join(f"{g} {n}" for g, n in counts.items()))
    print(f"purity at each rank (positive grades {','.join(sorted(positive))}, among graded candidates):")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.purity_csv:
        with atomic_output(args.purity_csv) as tmp:
            table.to_csv(tmp, index=False)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grades", default=None, help="read a graded candidates CSV back: counts and purity per rank")
    parser.add_argument("--positive_grades", default="A,B", help="with --grades: the grades that count as lenses")
    parser.add_argument("--purity_csv", default=None, help="with --grades: also write the purity table")
    parser.add_argument("--scores", default=None, help="real-sky score parquet (dhs infer --split all)")
    parser.add_argument("--data", default=None, help="the cutout dataset the scores are of (dhs cutouts)")
    parser.add_argument("--out_csv", default=None, help="candidates CSV to write (with an empty grade column)")
    parser.add_argument("--out_html", default=None, help="self-contained HTML gallery to write")
    parser.add_argument("--top_n", type=int, default=100)
    parser.add_argument("--dedup_arcsec", type=float, default=3.0,
                        help="rows closer than this to a higher-ranked row are the same object")
    parser.add_argument("--known_lenses", default=None, help="CSV/parquet of known lenses (default: lenscat)")
    parser.add_argument("--no_known_lenses", action="store_true", help="do not match known lenses")
    parser.add_argument("--match_arcsec", type=float, default=5.0, help="known-lens match radius")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.grades:
        report_grades(args)
        return 0
    missing = [f for f, v in (("--scores", args.scores), ("--data", args.data), ("--out_csv", args.out_csv)) if not v]
    if missing:
        raise DHSError(f"{', '.join(missing)} required (or --grades FILE to read grades back)")
    if args.top_n < 1:
        raise DHSError(f"--top_n must be >= 1, got {args.top_n}")
    if args.dedup_arcsec < 0 or args.match_arcsec < 0:
        raise DHSError("--dedup_arcsec and --match_arcsec must be >= 0")
    cands = build(args)
    n_known = int((cands["known_lens"] != "").sum())
    print(f"candidates: {len(cands)} ranked positions ({n_known} known lenses) -> {args.out_csv}"
          + (f", {args.out_html}" if args.out_html else ""))
    return 0
