"""`dhs report`: one self-contained HTML page drawn from what `dhs eval` wrote.

Each model comes as its score parquet (ROC curves, galleries) and the four tables `dhs eval` wrote for it
(``evaluation.strata.read_tables``): the stratified figures, the completeness maps and the operating point
(FPR target and threshold, computed once by `dhs eval`) are read from those tables, never recomputed.

Figures are PNGs (matplotlib, Agg backend) embedded as base64 ``data:`` URIs, so the page opens offline
with no other file. Sections: summary table, ROC curves on a log-FPR axis, tpr@fpr against theta_E and
against theta_E/PSF with Wilson error bars, the completeness heat map, training curves from
``history.json`` files, and galleries (grz colour composites, Lupton et al. 2004 asinh stretch via
astropy) of the top-scoring controls, the mined hard negatives and the missed positives. A missing
optional input turns its section into a sentence saying what is missing.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from darkhaloscope.errors import DHSError
from darkhaloscope import metrics
from darkhaloscope.evaluation import strata
from darkhaloscope.evaluation.scorefile import read_checked
from darkhaloscope.io import atomic_output, check_writable, refuse_overwrite
from darkhaloscope.stamps.contract import annulus_sky
from darkhaloscope.stamps.dataset import fetch_stamps

log = logging.getLogger("dhs.report")

DEFAULT_GALLERY_N = 16


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

def parse_labelled(items, flag: str) -> list[tuple[str, str]]:
    """['gen3=path', ...] -> [('gen3', 'path'), ...]; a bare path is labelled by its file stem."""
    out = []
    for item in items or []:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).stem, item
        if not label or not path:
            raise DHSError(f"{flag} '{item}' must be LABEL=PATH")
        out.append((label, path))
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise DHSError(f"{flag} repeats a label: {','.join(labels)}")
    return out


@dataclass
class ReportInputs:
    scores: list[tuple[str, str]]   # (label, score parquet); the first is the primary model
    tables: dict[str, str]          # label -> the --out_csv of `dhs eval` on that score file
    histories: list[tuple[str, str]] = field(default_factory=list)
    hard_negs: str | None = None
    data: str | None = None
    gallery_n: int = DEFAULT_GALLERY_N

    @classmethod
    def from_args(cls, args) -> "ReportInputs":
        scores = parse_labelled(args.scores, "--scores")
        tables = dict(parse_labelled(args.tables, "--tables"))
        if not scores:
            raise DHSError("the report needs at least one --scores LABEL=PATH")
        labels = [label for label, _ in scores]
        if sorted(labels) != sorted(tables):
            raise DHSError(f"--tables labels ({','.join(tables) or 'none'}) must be the --scores labels "
                           f"({','.join(labels)}): each model's dhs eval --out_csv")
        return cls(scores=scores, tables=tables, histories=parse_labelled(args.history, "--history"),
                   hard_negs=args.hard_negs, data=args.data, gallery_n=args.gallery_n)


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_img(fig, name: str, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img data-figure="{html.escape(name)}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}">')


def missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def roc_figure(frames) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, df in frames.items():
        pts = metrics.roc_points(df["y"].to_numpy(), df["rank"].to_numpy())
        if not pts.n_pos or not pts.n_neg:
            continue
        keep = pts.fp > 0
        ax.step(pts.fpr[keep], pts.tpr[keep], where="post", label=f"{label} (AUROC {metrics.auroc(df['y'], df['rank']):.4f}, "
                f"{pts.n_pos} pos / {pts.n_neg} neg)")
    ax.axvline(1e-4, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("false-positive rate (controls)")
    ax.set_ylabel("true-positive rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return figure_img(fig, "roc", "ROC curves, log FPR axis")


def _value_and_wilson_err(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Values and their (2, n) error bars to the 95% Wilson bounds of a table's rows."""
    value = rows["value"].to_numpy()
    err = np.vstack([value - rows["ci_low"].to_numpy(), rows["ci_high"].to_numpy() - value])
    return value, np.where(np.isfinite(err), np.maximum(err, 0.0), np.nan)  # Wilson bounds vs float rounding


def _tpr_axes(ax, xlabel: str, target: float) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"tpr @ fpr {target:g}")
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def stratum_figure(tables, stratum: str, target: float, xlabel: str, name: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, table) in enumerate(tables.items()):
        rows = _at(table, stratum, target)
        centre = 0.5 * (rows["bin_lo"] + rows["bin_hi"]) + (i - (len(tables) - 1) / 2) * 0.02
        value, err = _value_and_wilson_err(rows)
        ax.errorbar(centre, value, yerr=err, xerr=0.5 * (rows["bin_hi"] - rows["bin_lo"]), fmt="o", capsize=3,
                    label=label)
        for x, v, n in zip(centre, value, rows["n_pos"]):
            if np.isfinite(v):
                ax.annotate(str(n), (x, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _tpr_axes(ax, xlabel, target)
    return figure_img(fig, name, f"tpr at fpr {target:g} against {xlabel}, 95% Wilson intervals, n_pos annotated")


def _recall_map(comp: pd.DataFrame, row_key: str, ylabel: str, cell_text, fontsize: float, name: str,
                alt: str) -> str:
    """Recall heat map: rows are the ``<row_key>_lo/_hi`` bins, columns the theta_E/PSF bins; each cell is
    annotated with ``cell_text(row)``."""
    plt = pyplot()
    rows = sorted(set(zip(comp[f"{row_key}_lo"], comp[f"{row_key}_hi"])))
    res = sorted(set(zip(comp["res_lo"], comp["res_hi"])))
    grid = np.full((len(rows), len(res)), np.nan)
    fig, ax = plt.subplots(figsize=(7, 5))
    for _, row in comp.iterrows():
        a = rows.index((row[f"{row_key}_lo"], row[f"{row_key}_hi"]))
        b = res.index((row.res_lo, row.res_hi))
        grid[a, b] = row.recall
        ax.text(b, a, cell_text(row), ha="center", va="center", fontsize=fontsize)
    im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(res)), [f"{lo:g}-{hi:g}" for lo, hi in res], rotation=45, fontsize=8)
    ax.set_yticks(range(len(rows)), _bin_labels([lo for lo, _ in rows], [hi for _, hi in rows]), fontsize=8)
    ax.set_xlabel("theta_E / PSF FWHM")
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label="recall")
    return figure_img(fig, name, alt)


def completeness_figure(comp: pd.DataFrame) -> str:
    return _recall_map(
        comp, "theta", "theta_E (arcsec)",
        lambda row: f"{row.recall:.2f}\nn={row.n_pos}" if np.isfinite(row.recall) else f"n={row.n_pos}",
        7, "completeness", "completeness heat map, recall per theta_E x theta_E/PSF cell")


def _bin_labels(lo, hi) -> list[str]:
    return [f"{a:g}-{b:g}" if np.isfinite(b) else f">= {a:g}" for a, b in zip(lo, hi)]


def snr_figure(tables, target: float) -> str:
    """tpr@fpr per arc_snr bin (categorical axis: the top bin is open), each model with Wilson intervals,
    and the matched-filter reference of the same positives as black bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    mf_drawn = False
    for i, (label, table) in enumerate(tables.items()):
        rows = _at(table, strata.STRATUM_SNR, target)
        x = np.arange(len(rows)) + (i - (len(tables) - 1) / 2) * 0.12
        value, err = _value_and_wilson_err(rows)
        ax.errorbar(x, value, yerr=err, fmt="o", capsize=3, label=label)
        if not mf_drawn:
            ax.hlines(rows["mf_value"], np.arange(len(rows)) - 0.35, np.arange(len(rows)) + 0.35, colors="k",
                      label="matched-filter reference")
            ax.set_xticks(range(len(rows)), [f"{t}\nn={n}" for t, n in zip(_bin_labels(rows["bin_lo"], rows["bin_hi"]),
                                                                              rows["n_pos"])], fontsize=8)
            mf_drawn = True
    _tpr_axes(ax, "arc_snr (integrated r-band S/N of the injected arc)", target)
    return figure_img(fig, "tpr-vs-snr", f"tpr at fpr {target:g} against arc_snr, 95% Wilson intervals, "
                "matched-filter reference as black bars")


def completeness_snr_figure(comp: pd.DataFrame) -> str:
    """Recall per (theta_E/PSF x arc_snr) cell, each cell annotated with the matched-filter recall."""
    return _recall_map(
        comp, "snr", "arc_snr",
        lambda row: (f"{row.recall:.2f} (MF {row.mf_recall:.2f})\nn={row.n_pos}" if np.isfinite(row.recall)
                     else f"n={row.n_pos}"),
        6.5, "completeness-snr",
        "completeness heat map, recall per theta_E/PSF x arc_snr cell, matched-filter recall in brackets")


def history_epochs(path) -> list[dict]:
    """The epochs of a ``history.json`` (`dhs train` writes ``{"epochs": [...], ...}``, one shape): a
    DHSError naming the file for anything else."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DHSError(f"{path} is not a history.json: {type(exc).__name__}: {exc}") from None
    epochs = doc.get("epochs") if isinstance(doc, dict) else None
    if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
        raise DHSError(f"{path} is not a history.json of dhs train: no list of epochs under 'epochs'")
    return epochs


def _metric(epoch: dict, split: str, key: str):
    block = epoch.get(split)
    value = block.get(key) if isinstance(block, dict) else epoch.get(f"{split}_{key}")
    return math.nan if value is None else float(value)


def training_figure(histories: dict[str, list[dict]]) -> str:
    plt = pyplot()
    panels = [("train loss", lambda e: math.nan if e.get("train_loss") is None else float(e["train_loss"])),
              ("val AUROC", lambda e: _metric(e, "val_all", "auroc")),
              ("val tpr@fpr1e-3", lambda e: _metric(e, "val_all", "tpr@fpr0.001")),
              ("val tpr@fpr1e-4", lambda e: _metric(e, "val_all", "tpr@fpr0.0001"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (title, get) in zip(axes, panels):
        for label, epochs in histories.items():
            x = [e.get("epoch", i + 1) for i, e in enumerate(epochs)]
            ax.plot(x, [get(e) for e in epochs], "o-", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return figure_img(fig, "training", "training curves: loss and validation metrics per epoch")


def colour_composite(image: np.ndarray) -> np.ndarray:
    """(3, H, W) g, r, z in nanomaggies -> (H, W, 3) uint8 RGB = (z, r, g), Lupton asinh stretch scaled to
    the stamp's own sky noise (robust sigma of the outer annulus)."""
    from astropy.visualization import make_lupton_rgb

    sky, sigma = annulus_sky(image)
    scale = float(max(np.median(sigma), 1e-6))
    g, r, z = ((image[i] - sky[i]) / scale for i in range(3))
    return make_lupton_rgb(z, r, g, minimum=-1.0, stretch=8.0, Q=6.0)


def gallery_figure(images: list[np.ndarray], captions: list[str], name: str, alt: str) -> str:
    plt = pyplot()
    n = len(images)
    cols = min(8, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.75 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cap in zip(axes.ravel(), images, captions):
        ax.imshow(colour_composite(img), origin="lower", interpolation="nearest")
        ax.set_title(cap, fontsize=6)
    fig.tight_layout()
    return figure_img(fig, name, alt)


# ----------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------

CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
.missing{color:#a33;font-style:italic}img{max-width:100%}.note{color:#555;font-size:0.9em}"""


def table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)


def safe(fn, what: str) -> str:
    try:
        return fn()
    except DHSError as exc:
        return missing(f"{what}: {exc}")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s failed: %s", what, exc)
        return missing(f"{what} could not be drawn: {type(exc).__name__}: {exc}")


def page(title: str, parts: list[str]) -> str:
    """A whole self-contained HTML page: the title as <title> and <h1>, then the sections."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def check_inputs(inputs: ReportInputs) -> None:
    """Read and validate every input file the page needs (score files through the one validator, each
    model's `dhs eval` tables, the histories and the hard negatives), so that nothing is written for a bad one."""
    for label, path in inputs.scores:
        read_checked(path, ("is_control", "logit", "score"))
        strata.read_tables(inputs.tables[label])
    for label, path in inputs.histories:  # a missing one is said on the page; a present one must be right
        if Path(path).exists():
            history_epochs(path)
    if inputs.hard_negs:
        if not Path(inputs.hard_negs).is_file():
            raise DHSError(f"--hard_negs {inputs.hard_negs} does not exist")
        try:
            import pyarrow.parquet as pq

            pq.read_schema(inputs.hard_negs)
        except Exception as exc:
            raise DHSError(f"--hard_negs {inputs.hard_negs} is not a readable parquet file "
                           f"({type(exc).__name__})") from None


def _at(table: pd.DataFrame, stratum: str, target: float) -> pd.DataFrame:
    """The tpr@fpr rows of one stratum at the operating point's FPR."""
    return table[(table["stratum"] == stratum) & (table["metric"] == "tpr@fpr") & np.isclose(table["target"], target)]


def build_html(inputs: ReportInputs) -> str:
    frames = {label: strata.load_scores(path) for label, path in inputs.scores}
    evals = {label: strata.read_tables(inputs.tables[label]) for label, _ in inputs.scores}
    tables = {label: t["table"] for label, t in evals.items()}
    primary_label = inputs.scores[0][0]
    primary = frames[primary_label]
    op = strata.OperatingPoint.read(evals[primary_label]["completeness"], inputs.tables[primary_label])
    target = op.fpr
    has_snr = bool(np.isfinite(primary.loc[primary["y"] == 1, "arc_snr"].to_numpy()).any())
    parts = []

    # Summary: counts and ties from the scores, every rate from dhs eval's tables
    rows = []
    for label, df in frames.items():
        t, auroc = tables[label], evals[label]["auroc"]
        row = {"model": label, "n_pos": int(df["y"].sum()), "n_neg": int((df["y"] == 0).sum()),
               "auroc": float(auroc.loc[auroc["stratum"] == strata.STRATUM_ALL, "auroc"].iloc[0]),
               "top score ties": metrics.n_tied_top(df["rank"])}
        for _, r in t[t["stratum"] == strata.STRATUM_ALL].iterrows():
            row[f"{r.metric}{r.target:g}"] = r.value
        rows.append(row)
    splits = {label: sorted(set(df["region_split"])) if "region_split" in df else ["?"] for label, df in frames.items()}
    note = (f"Operating point for the stratified figures and completeness (from dhs eval): fpr {target:g}"
            + ("" if target == strata.COMPLETENESS_FPR else f" ({strata.COMPLETENESS_FPR:g} is not estimable with "
               "this many controls)") + ". Splits: "
            + "; ".join(f"{k}: {','.join(map(str, v))}" for k, v in splits.items()) + ". Empty cells: not estimable.")
    body = table_html(pd.DataFrame(rows)) + f'<p class="note">{html.escape(note)}</p>'
    body += (f"<h3>{html.escape(Path(inputs.tables[primary_label]).name)} (all positives)</h3>"
             + table_html(tables[primary_label].query("stratum == 'all'")))
    parts.append(section("summary", "Summary", body))

    parts.append(section("roc", "ROC curves (log FPR)", safe(lambda: roc_figure(frames), "ROC")))
    no_target = missing("too few controls for any FPR target")
    fig_theta = safe(lambda: stratum_figure(tables, strata.STRATUM_THETA, target, "theta_E (arcsec)", "tpr-vs-theta"),
                     "tpr vs theta_E") if math.isfinite(target) else no_target
    fig_res = safe(lambda: stratum_figure(tables, strata.STRATUM_RES, target, "theta_E / PSF FWHM", "tpr-vs-res"),
                   "tpr vs theta_E/PSF") if math.isfinite(target) else no_target
    no_snr = missing("no positive has an arc_snr (real data?): the arc_snr strata are empty")
    fig_snr = (safe(lambda: snr_figure(tables, target), "tpr vs arc_snr") if has_snr else no_snr) \
        if math.isfinite(target) else no_target
    parts.append(section("stratified", f"tpr @ fpr {target:g} by Einstein radius, resolution and arc S/N",
                         fig_theta + fig_res + fig_snr))
    parts.append(section("completeness", f"Completeness ({primary_label}, recall at fpr {target:g})",
                         safe(lambda: completeness_figure(evals[primary_label]["completeness"]), "completeness")
                         + (safe(lambda: completeness_snr_figure(evals[primary_label]["completeness_snr"]),
                                 "completeness by arc_snr") if has_snr else no_snr)))

    if inputs.histories:
        body = safe(lambda: training_figure({label: history_epochs(path) for label, path in inputs.histories}),
                    "training curves")
    else:
        body = missing("no --history given: training curves are not shown")
    parts.append(section("training", "Training curves", body))

    parts.append(section("galleries", "Galleries", _galleries(inputs, primary, primary_label, op)))
    return page("darkhaloscope evaluation: " + ", ".join(label for label, _ in inputs.scores), parts)


def _galleries(inputs: ReportInputs, primary: pd.DataFrame, label: str, op: strata.OperatingPoint) -> str:
    n = max(1, inputs.gallery_n)
    picks: dict[str, tuple[str, pd.DataFrame | None, str]] = {}
    ctrl = primary[primary["y"] == 0].sort_values("rank", ascending=False).head(n)
    picks["gallery-top-controls"] = (f"Top-scoring controls ({label})", ctrl, "no controls in the score file")
    if inputs.hard_negs and Path(inputs.hard_negs).exists():
        hn = pd.read_parquet(inputs.hard_negs).sort_values("rank").head(n)
        picks["gallery-hard-negatives"] = ("Mined hard negatives", hn, "the hard-negative file has no rows")
    else:
        why = "no --hard_negs given" if not inputs.hard_negs else f"{inputs.hard_negs} does not exist"
        picks["gallery-hard-negatives"] = ("Mined hard negatives", None, why)
    missed = None
    why_missed = "no operating point (too few controls)"
    if math.isfinite(op.fpr):
        pos = primary[primary["y"] == 1]
        missed = pos[pos["rank"] < op.threshold].sort_values("theta_over_psf", ascending=False,
                                                             na_position="last").head(n)
        why_missed = "no positive was missed" if len(pos) else "no positives in the score file"
    picks["gallery-missed-positives"] = (f"Missed positives at fpr {op.fpr:g}, most resolved first ({label})", missed,
                                         why_missed)
    out = []
    wanted = [df for _, df, _ in picks.values() if df is not None and len(df)]
    stamps: dict[int, np.ndarray] = {}
    data_problem = None
    if not inputs.data:
        data_problem = "no --data given: stamps cannot be fetched"
    elif wanted:
        try:
            stamps = fetch_stamps(inputs.data, np.concatenate([df["task_id"].to_numpy() for df in wanted]))
        except DHSError as exc:
            data_problem = str(exc)
    for name, (title, df, why) in picks.items():
        out.append(f"<h3>{html.escape(title)}</h3>")
        if df is None or not len(df):
            out.append(missing(why))
            continue
        if data_problem:
            out.append(missing(data_problem))
            continue
        rows = [r for _, r in df.iterrows() if _id(r["task_id"]) in stamps]
        if not rows:
            out.append(missing(f"none of these {len(df)} task_ids were found in {inputs.data}"))
            continue
        images = [stamps[_id(r["task_id"])] for r in rows]
        caps = [f"{_id(r['task_id'])}\nlogit {float(r['logit'] if 'logit' in r else r['rank']):.2f}"
                + (f"\nθE {r['theta_e_arcsec']:.2f}\"" if np.isfinite(r.get("theta_e_arcsec", np.nan))
                   and r.get("y", 1) == 1 else "")  # controls: theta_E is null or 0.0 (stage 4c), not shown
                for r in rows]
        out.append(safe(lambda: gallery_figure(images, caps, name, title), title))
        if len(rows) < len(df):
            out.append(missing(f"{len(df) - len(rows)} of {len(df)} stamps not found in {inputs.data}"))
    return "\n".join(out)


def _id(value):
    """A task id as a dict key: numpy integers -> int, strings unchanged."""
    return value.item() if hasattr(value, "item") else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", action="append", required=True, metavar="LABEL=PATH",
                        help="score parquet of one model on the test split (repeat: gen3=..., gen2=...); "
                             "the first is the primary model (completeness, galleries)")
    parser.add_argument("--tables", action="append", required=True, metavar="LABEL=CSV",
                        help="the --out_csv of dhs eval on that model's scores (its three sibling tables are read too)")
    parser.add_argument("--history", action="append", metavar="LABEL=PATH", help="history.json of a training run")
    parser.add_argument("--hard_negs", default=None, help="hard-negative parquet from dhs mine (gallery)")
    parser.add_argument("--data", default=None, help="Phase 4c dataset root, to fetch stamps for the galleries")
    parser.add_argument("--gallery_n", type=int, default=DEFAULT_GALLERY_N, help="stamps per gallery")
    parser.add_argument("--out", required=True, help="HTML file to write")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    inputs = ReportInputs.from_args(args)
    tables = {f"--tables {lab} ({key})": p for lab, csv in inputs.tables.items()
              for key, p in strata.table_paths(csv).items()}
    refuse_overwrite(args.out, {**{f"--scores {lab}": p for lab, p in inputs.scores}, **tables,
                                **{f"--history {lab}": p for lab, p in inputs.histories},
                                "--hard_negs": inputs.hard_negs, "--data": inputs.data}, "--out")
    check_writable(args.out, "--out")
    check_inputs(inputs)
    page_html = build_html(inputs)
    with atomic_output(args.out) as tmp:
        Path(tmp).write_text(page_html, encoding="utf-8")
    log.info("wrote %s (%d kB, %d figures)", args.out, len(page_html) // 1024, page_html.count("<img "))
    return 0
