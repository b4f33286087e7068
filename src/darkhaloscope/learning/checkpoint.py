"""Checkpoints of a training run: the file format (``save_checkpoint``, ``load_checkpoint``, ``load_model``), the
resume fingerprint, which epoch becomes ``best.pt`` (``selection_key``), where a run stands (``Progress``) and
what it writes (``Checkpoints``: ``best.pt``, ``last.pt``, ``history.json``). Format: docs/architecture.md."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from darkhaloscope import metrics
from darkhaloscope.errors import DHSError
from darkhaloscope.io import atomic_output, finite_or_null
from darkhaloscope.learning.arguments import OPTIONAL_INPUTS, OPTIONAL_RESULT_ARGS, RESULT_ARGS
from darkhaloscope.learning.model import LensClassifier, build_model, unwrap
from darkhaloscope.learning.runtime import Dist, rng_state, set_rng_state
from darkhaloscope.stamps.contract import check_meta_columns

if TYPE_CHECKING:  # annotations only
    from darkhaloscope.learning.train import Setup

CKPT_FORMAT = "darkhaloscope-ckpt-v1"


def save_checkpoint(path: str | os.PathLike, **fields) -> None:
    """torch.save a checkpoint dict atomically (temporary name, then rename). ``format`` is added."""
    fields = {"format": CKPT_FORMAT, **fields}
    with atomic_output(path) as tmp:
        torch.save(fields, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a darkhaloscope checkpoint dict; any unreadable or foreign file -> DHSError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DHSError(f"checkpoint {path} is a directory, not a checkpoint file (e.g. {path}/best.pt)")
    if not path.is_file():
        raise DHSError(f"checkpoint {path} does not exist")
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings, lists and dicts, nothing executable.
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise DHSError(f"checkpoint {path} is unreadable: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise DHSError(f"{path} is not a darkhaloscope checkpoint (no format '{CKPT_FORMAT}')")
    for key in ("model_kwargs", "state_dict", "meta_cols", "meta_mean", "meta_std"):
        if key not in ckpt:
            raise DHSError(f"checkpoint {path} lacks '{key}'")
    return ckpt


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[LensClassifier, dict]:
    """Rebuild the network from the checkpoint alone -> (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path, map_location)
    kwargs = ckpt["model_kwargs"]
    try:  # the allow-list is re-checked: a checkpoint is input too
        meta_cols = check_meta_columns(list(ckpt["meta_cols"]))
    except DHSError as exc:
        raise DHSError(f"checkpoint {path}: {exc}") from None
    mean = np.asarray(ckpt["meta_mean"], np.float64)
    std = np.asarray(ckpt["meta_std"], np.float64)
    if not (mean.shape == std.shape == (len(meta_cols),)):
        raise DHSError(f"checkpoint {path}: meta_mean/meta_std do not have one value per meta column "
                       f"({','.join(meta_cols) or 'none'})")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise DHSError(f"checkpoint {path}: meta_std must be finite and > 0 and meta_mean finite "
                       f"(meta_mean {mean.tolist()}, meta_std {std.tolist()})")
    if not isinstance(kwargs, Mapping) or not isinstance(kwargs.get("arch"), str):
        raise DHSError(f"checkpoint {path}: model_kwargs is not a dict with an 'arch'")
    if int(kwargs.get("n_meta", 0)) != len(meta_cols):
        raise DHSError(f"checkpoint {path}: model_kwargs n_meta {kwargs.get('n_meta')} != {len(meta_cols)} meta columns")
    try:
        model = build_model(**kwargs)
    except DHSError as exc:
        raise DHSError(f"checkpoint {path}: {exc}") from None
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError) as exc:
        raise DHSError(f"checkpoint {path}: model_kwargs {dict(kwargs)} do not build a model: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise DHSError(f"checkpoint {path}: weights do not fit {ckpt['model_kwargs']}: "
                       f"{str(exc).splitlines()[0]}") from None
    model.eval()
    return model, ckpt


def resolve_start(mode: str | None, ckpt: dict | None, path: str, auto_resume: bool, state_last: Path,
                  fingerprint_: str) -> tuple[str | None, dict | None, str, str]:
    """Where a run starts: the checkpoint named on the command line (``mode`` 'continue' | 'warm' | None, its
    checkpoint and path), unless --auto_resume finds an unfinished ``state_last`` with the same fingerprint
    ('auto'). Returns (mode, checkpoint, path, a note on a last.pt that was not taken)."""
    auto_note = ""
    if auto_resume and mode != "continue" and state_last.exists():
        try:
            last = load_checkpoint(state_last)
        except DHSError as exc:
            auto_note = f"--auto_resume: ignoring {state_last} ({exc}); "
        else:
            if last.get("fingerprint") == fingerprint_ and not last.get("finished"):
                mode, ckpt, path = "auto", last, str(state_last)
            elif last.get("finished"):
                auto_note = f"--auto_resume: {state_last} is a finished run, not continued; "
            else:
                auto_note = (f"--auto_resume: {state_last} has fingerprint {last.get('fingerprint')} != "
                             f"{fingerprint_} (arguments or inputs changed); ")
    return mode, ckpt, path, auto_note


def file_identity(path: str | None) -> list | None:
    if not path:
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, int(st.st_mtime)]


def data_identity(fs, files: list[str]) -> list:
    return [[os.path.basename(f), fs.get_file_info(f).size] for f in files]


def fingerprint(result_args: dict, inputs: dict) -> str:
    """Hash of the arguments that change the result (``RESULT_ARGS``, as the run uses them, and
    ``OPTIONAL_RESULT_ARGS`` away from their defaults) and the inputs (``OPTIONAL_INPUTS`` when given)."""
    fields = {k: result_args[k] for k in RESULT_ARGS}
    fields.update({k: result_args[k] for k, default in OPTIONAL_RESULT_ARGS.items() if result_args[k] != default})
    fields["inputs"] = {k: v for k, v in inputs.items() if not (k in OPTIONAL_INPUTS and v is None)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


SELECTION_FPRS = (1e-4, 1e-3, 1e-2)


# A validation tpr@fpr t counts for the selection only when the threshold is set by at least this many
# validation controls (n_neg * t >= 10): the threshold is an order statistic of the controls' scores, and
# with k controls above it the estimate moves by ~1/sqrt(k) between epochs by chance alone. With 2.6 (the
# demo's 2568 controls at 1e-3) the pick was noise: it kept an earlier epoch whose test tpr was lower than
# the last epoch's on every target (docs/finder.md, row 30).
SELECTION_MIN_FP = 10


def selection_key(m: dict) -> tuple:
    """best.pt: highest val tpr@fpr1e-4, ties by tpr@fpr1e-3, then AUROC (NaN counts as worst).

    Only FPR targets the validation controls resolve with at least ``SELECTION_MIN_FP`` false positives
    count (metrics.fpr_target_estimable): with fewer, tpr@fpr t rests on a handful of controls (or is merely
    the TPR at zero false positives), a noisy pick. The two lowest such targets of 1e-4, 1e-3, 1e-2 lead, so
    small validation sets select on tpr@fpr1e-2 and AUROC."""
    return tuple(-math.inf if not np.isfinite(m.get(k, math.nan)) else m[k] for k in selection_metrics(m))


def selection_metrics(m: dict) -> list[str]:
    """The metric names ``selection_key`` ranks by, in order, for validation metrics ``m``."""
    n_neg = int(m.get("n_neg", 0))
    fprs = [t for t in SELECTION_FPRS if metrics.fpr_target_estimable(n_neg, t, SELECTION_MIN_FP)][:2]
    return [f"tpr@fpr{t:g}" for t in fprs] + ["auroc"]


@dataclass
class Progress:
    """Where a run stands: what last.pt saves and a resumed run restores."""
    epoch: int = 0               # the epoch in progress (0-based)
    batches_done: int = 0        # of that epoch
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict | None = None
    partial: tuple = (0.0, 0, 0, 0)  # loss_sum, n_seen, n_bad, n_planned of the epoch in progress (this rank)


class Checkpoints:
    """What a run writes: ``best.pt``, ``history.json`` (out_dir) and ``last.pt`` (state_dir), and the restore
    of a ``last.pt`` (format: docs/architecture.md, 'Checkpoint format')."""

    def __init__(self, setup: Setup, ranks: Dist, model, model_kw: dict, opt):
        self.setup, self.ranks, self.model, self.model_kw, self.opt = setup, ranks, model, model_kw, opt
        self.out_dir = Path(setup.args.out_dir)
        self.last = Path(setup.args.state_dir or setup.args.out_dir) / "last.pt"

    def _common(self, kind: str, epoch: int, metrics_: dict, finished: bool) -> dict:
        setup = self.setup
        return dict(kind=kind, arch=setup.args.arch, model_kwargs=self.model_kw,
                    state_dict=unwrap(self.model).state_dict(), meta_cols=setup.meta_cols, meta_mean=setup.meta_mean,
                    meta_std=setup.meta_std, variant=setup.variant, args=vars(setup.args), epoch=epoch,
                    metrics=metrics_, finished=finished, fingerprint=setup.fingerprint)

    def save_last(self, progress: Progress, finished: bool) -> None:
        """last.pt at ``progress``; the partial-epoch sums are summed over ranks (a collective: every rank calls it)."""
        sums = self.ranks.sum([float(x) for x in progress.partial])
        if not self.ranks.main:
            return
        args = self.setup.args
        last_metrics = progress.history[-1] if progress.history else {}
        save_checkpoint(self.last, **self._common("last", progress.epoch, last_metrics, finished),
                        optimizer=self.opt.state_dict(),
                        scheduler={"kind": "warmup-cosine", "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                                   "base_lr": args.lr}, scaler=None, rng=rng_state(),
                        sampler={"epoch": progress.epoch, "batches_done": progress.batches_done, "seed": args.seed,
                                 "partial": sums},
                        global_step=progress.global_step, history=progress.history, best=progress.best)

    def restore(self, ck: dict) -> Progress:
        """Model, optimizer and RNG state of an interrupted run's last.pt, and where it stood."""
        self.model.load_state_dict(ck["state_dict"])
        self.opt.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        # the partial-epoch sums are over all ranks: rank 0 carries them, the others restart from 0
        partial = tuple(ck["sampler"].get("partial", (0.0, 0, 0, 0))) if self.ranks.main else (0.0, 0, 0, 0)
        return Progress(ck["sampler"]["epoch"], ck["sampler"]["batches_done"], ck["global_step"], ck["history"],
                        ck.get("best"), partial)

    def save_best(self, epoch: int, row: dict) -> None:
        metrics_ = {"val_cut": row["val_cut"], "val_all": row["val_all"],
                    "selected_by": "val_cut " + ", then ".join(selection_metrics(row["val_cut"]))}
        save_checkpoint(self.out_dir / "best.pt", **self._common("best", epoch, metrics_, False))

    def mark_best_finished(self) -> None:
        """best.pt becomes a finished stage's checkpoint (what --resume of the next stage looks for)."""
        ck = load_checkpoint(self.out_dir / "best.pt")
        ck["finished"] = True
        save_checkpoint(self.out_dir / "best.pt", **{k: v for k, v in ck.items() if k != "format"})

    def write_history(self, progress: Progress) -> None:
        _write_history(self.out_dir / "history.json", self.setup, progress.history, progress.best)


def _write_history(path: Path, setup: Setup, history: list, best: dict | None) -> None:
    """history.json: one shape, ``{"args", "variant", ..., "best", "epochs": [per-epoch rows]}`` (the report
    reads ``epochs``; a workflow that takes an existing Gen2 checkpoint writes ``{"epochs": []}``)."""
    args = setup.args
    doc = {"args": vars(args), "variant": setup.variant, "fingerprint": setup.fingerprint,
           "meta_cols": setup.meta_cols, "meta_mean": setup.meta_mean, "meta_std": setup.meta_std,
           "curriculum": {"min_theta_over_psf": args.min_theta_over_psf, "min_arc_snr": args.min_arc_snr,
                          "match_controls": setup.match, "condition_columns": setup.cond_cols,
                          "n_train_kept": len(setup.train_index), "n_train_all": setup.n_train_all,
                          "meta_auc_filtered": setup.meta_auc_before, "meta_auc_sampled": setup.meta_auc_after},
           "cutout_failed": {"train": setup.train_index.n_cutout_failed, "val": setup.val_index.n_cutout_failed},
           "hard_negatives": {"path": args.hard_negs, "n_matched": setup.n_hard, "weight": args.hard_neg_weight},
           "best": best, "epochs": history}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(finite_or_null(doc), indent=2, default=_json_default, allow_nan=False))


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)
