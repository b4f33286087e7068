"""`dhs train`: the lens-classifier training engine (Gen2 baseline and Gen3 curriculum stages).

Gen2 and Gen3 are configurations of this one code path (see docs/training.md):
Gen2 = ``--loss bce`` on Gaussian-PSF data without cuts; Gen3 A1 = ``--loss focal`` with the strict cuts
and hard negatives; Gen3 A2 = A1's best weights (``--init_from`` or the seed's ``--resume A1/best.pt``)
with a fresh optimizer and schedule at its own LR and cuts.

Runs on CPU, on one GPU (bf16 autocast) and under torchrun (DDP; detected from RANK/WORLD_SIZE) with the
same code. All bad input is rejected with a one-line DHSError before the first step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from darkhaloscope.errors import DHSError
from darkhaloscope import metrics
from darkhaloscope.io import check_writable, check_writable_dir
from darkhaloscope.learning import sampling, stream
from darkhaloscope.learning.arguments import OPTIONAL_RESULT_ARGS, RESULT_ARGS
from darkhaloscope.learning.checkpoint import (Checkpoints, Progress, data_identity, file_identity, fingerprint,
                                               load_checkpoint, resolve_start, selection_key)
from darkhaloscope.learning.losses import LOSSES, make_loss
from darkhaloscope.learning.meta import meta_statistics
from darkhaloscope.learning.model import DEFAULT_STEM_STRIDE, STRETCHES, build_model, model_kwargs, unwrap
from darkhaloscope.learning.runtime import Dist, bf16_enabled, log, lr_at
from darkhaloscope.stamps import contract
from darkhaloscope.stamps.contract import STAMP_SIZE
from darkhaloscope.stamps import dataset


KILL_ENV = "DHS_TRAIN_STOP_AFTER_STEPS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Phase 4c parquet root (Hive region_split=); local or s3://")
    parser.add_argument("--out_dir", required=True, help="writes best.pt and history.json here")
    parser.add_argument("--arch", default="convnext_tiny", help="any timm model name")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=256, help="per rank; batches are near-equal, <= this")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight_decay", type=float, default=1e-2)
    parser.add_argument("--dropout", type=float, default=0.10)
    parser.add_argument("--drop_path", type=float, default=0.0, help="stochastic depth rate of the backbone")
    parser.add_argument("--stem_stride", type=int, default=4, choices=(1, 2, 4),
                   help="stem stride: 4 = timm default; 2 = finer features for 64x64 stamps (ConvNeXt, ResNet; "
                        "~4x cost); 1 = ResNet-style stems only")
    parser.add_argument("--crop", type=int, default=64,
                   help="the network sees the central crop x crop pixels of each stamp (even, 16-64; 64 = all)")
    parser.add_argument("--stretch", choices=STRETCHES, default="clip",
                   help="input stretch of the sky-normalised stamps: clip = +-10 sigma (the seed's); asinh = "
                        "10 asinh(x/10), which keeps an arc on a bright host's core")
    parser.add_argument("--rot180_residual", action="store_true",
                   help="3 more input channels: each band minus its 180-degree rotation about the stamp centre, "
                        "which removes the point-symmetric host and keeps the arc")
    parser.add_argument("--timm_kwargs", default="",
                   help='extra timm.create_model arguments as JSON, e.g. \'{"depths": [1,1,1,1]}\'')
    parser.add_argument("--use_bf16", action="store_true", help="bf16 autocast (GPU; CPU only with native bf16)")
    parser.add_argument("--augment", action="store_true", help="random rot90 + flips")
    parser.add_argument("--loss", choices=LOSSES, default="bce")
    parser.add_argument("--focal_alpha", type=float, default=0.25, help="weight of the positive (lens) class")
    parser.add_argument("--focal_gamma", type=float, default=2.0)
    parser.add_argument("--min_theta_over_psf", type=float, default=0.0, help="curriculum: drop positives below")
    parser.add_argument("--min_arc_snr", type=float, default=0.0, help="curriculum: drop positives below")
    parser.add_argument("--match_controls", choices=("auto", "on", "off"), default="auto",
                   help="reweight controls to the kept positives' (psfsize_r, psfdepth_r); auto = when cuts")
    parser.add_argument("--meta_cols", default="", help="comma-separated observing-condition inputs")
    parser.add_argument("--resume", default=None, help="last.pt: continue; a finished stage's best.pt: warm start")
    parser.add_argument("--init_from", default=None, help="warm start: weights only, fresh optimizer and schedule")
    parser.add_argument("--init_backbone_from", default=None,
                   help="warm start of the image backbone only, from another stage's checkpoint (e.g. Gen2's best.pt, "
                        "whose meta inputs may differ): the meta MLP and the head start fresh")
    parser.add_argument("--hard_negs", default=None, help="mined hard-negative parquet (task_id)")
    parser.add_argument("--hard_neg_weight", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--warmup_epochs", type=float, default=0.5, help="linear warm-up, in (fractional) epochs")
    parser.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    parser.add_argument("--val_every", type=int, default=1,
                   help="validate (and consider for best.pt) every N epochs and always after the last")
    parser.add_argument("--val_split", default="val")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--max_skip_frac", type=float, default=0.01,
                   help="stop when more than this fraction of stamps fail to decode")
    parser.add_argument("--variant", default=None, help="data variant recorded in the checkpoint (default: data dir name)")
    parser.add_argument("--state_dir", default=None, help="where last.pt lives (default: out_dir)")
    parser.add_argument("--auto_resume", action="store_true",
                   help="continue state_dir/last.pt if it is an unfinished run with the same fingerprint")
    parser.add_argument("--save_every_steps", type=int, default=0, help="also write last.pt every N steps")
    # test hooks: stop after N optimiser steps. The flag ends the run cleanly (rc 0); the environment variable
    # DHS_TRAIN_STOP_AFTER_STEPS simulates a kill inside a workflow job (non-zero exit, no final save).
    parser.add_argument("--stop_after_steps", type=int, default=int(os.environ.get(KILL_ENV, 0) or 0),
                   help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Setup: every check happens here, before the first step
# ----------------------------------------------------------------------------------------------------

def _explicit_source(args) -> tuple[str | None, dict | None, str]:
    """The checkpoint named on the command line: ('continue' | 'warm' | None, ckpt, path).
    --resume of an unfinished last.pt continues it; --resume of a best.pt or of a finished run's
    last.pt, and --init_from, warm-start from its weights."""
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        finished = ckpt.get("kind") == "best" or bool(ckpt.get("finished"))
        if finished and args.init_from:
            raise DHSError(f"--resume {args.resume} is a finished stage's checkpoint and --init_from is given too: "
                           "use one of them")
        return ("warm" if finished else "continue"), ckpt, args.resume
    if args.init_from:
        return "warm", load_checkpoint(args.init_from), args.init_from
    return None, None, ""


def _check_ckpt_matches(ckpt: dict, path: str, args, meta_cols: list[str] | None) -> None:
    """The checkpoint's network is the one the flags build (meta_cols None: the backbone only)."""
    kw = ckpt["model_kwargs"]
    if kw.get("arch") != args.arch:
        raise DHSError(f"checkpoint {path} is a '{kw.get('arch')}' but --arch is '{args.arch}'")
    if meta_cols is not None and list(ckpt["meta_cols"]) != meta_cols:
        raise DHSError(f"checkpoint {path} has meta columns {','.join(ckpt['meta_cols']) or '(none)'} but "
                       f"--meta_cols is {','.join(meta_cols) or '(none)'}")
    if (kw.get("timm_kwargs") or None) != (json.loads(args.timm_kwargs) if args.timm_kwargs else None):
        raise DHSError(f"checkpoint {path} has timm_kwargs {kw.get('timm_kwargs')}, flags say {args.timm_kwargs!r}")
    # the network's input and stem: (model_kwargs key = flag, name in the message, value in a checkpoint from before
    # the key existed), compared as the flag's type
    for key, label, before in (("crop", "crop", STAMP_SIZE), ("stretch", "input stretch", "clip"),
                               ("rot180_residual", "rot180_residual", False),
                               ("stem_stride", "stem_stride", DEFAULT_STEM_STRIDE)):
        flag = getattr(args, key)
        have = type(flag)(kw.get(key, before))
        if have != flag:
            raise DHSError(f"checkpoint {path} has {label} {have}, flags say {flag}")


def _open_and_index(args, split: str, meta_cols: list[str], need_cuts: bool, need_match: bool):
    sp = stream.open_split(args.data, split)
    scalars = list(meta_cols) + (list(sampling.CUT_COLUMNS) if need_cuts else []) + \
        (list(sampling.MATCH_COLUMNS) if need_match else [])
    sp.require(list(contract.READ_COLUMNS) + scalars)
    index = stream.build_index(sp.fs, sp.files, scalars)
    dataset.check_unique_ids(index.task_id, sp.where, dataset.STALE_SHARD_HINT)
    return sp.fs, sp.files, index


def _check_classes(index, split: str, what: str) -> None:
    n_pos = int((index.label == 1).sum())
    n_neg = int((index.label == 0).sum())
    if n_pos == 0:
        raise DHSError(f"split '{split}' has no positives {what}")
    if n_neg == 0:
        raise DHSError(f"split '{split}' has no controls {what}")


def check_numbers(args) -> None:
    """Every numeric flag in its range (NaN fails every comparison, so it is refused too)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DHSError(what)

    finite = math.isfinite
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    need(args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}")
    need(finite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}")
    need(finite(args.weight_decay) and args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}")
    need(0.0 <= args.dropout < 1.0, f"--dropout must be a probability in [0, 1), got {args.dropout}")
    need(0.0 <= args.drop_path < 1.0, f"--drop_path must be a probability in [0, 1), got {args.drop_path}")
    need(0.0 <= args.focal_alpha <= 1.0, f"--focal_alpha must be in [0, 1], got {args.focal_alpha}")
    need(finite(args.focal_gamma) and args.focal_gamma >= 0, f"--focal_gamma must be >= 0, got {args.focal_gamma}")
    need(finite(args.min_theta_over_psf) and args.min_theta_over_psf >= 0,
         f"--min_theta_over_psf must be >= 0, got {args.min_theta_over_psf}")
    need(finite(args.min_arc_snr) and args.min_arc_snr >= 0, f"--min_arc_snr must be >= 0, got {args.min_arc_snr}")
    need(finite(args.hard_neg_weight) and args.hard_neg_weight > 0,
         f"--hard_neg_weight must be a finite number > 0, got {args.hard_neg_weight}")
    need(args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}")
    need(finite(args.warmup_epochs) and args.warmup_epochs >= 0, f"--warmup_epochs must be >= 0, got {args.warmup_epochs}")
    need(finite(args.grad_clip) and args.grad_clip >= 0, f"--grad_clip must be >= 0, got {args.grad_clip}")
    need(0.0 <= args.max_skip_frac <= 1.0, f"--max_skip_frac must be in [0, 1], got {args.max_skip_frac}")
    need(args.val_every >= 1, f"--val_every must be >= 1, got {args.val_every}")
    need(args.save_every_steps >= 0, f"--save_every_steps must be >= 0, got {args.save_every_steps}")


class Setup:
    """Everything a run needs, validated. ``args`` stays as parsed (checkpoints store the user's flags);
    values derived from it live here: ``meta_cols`` (a checked list), ``variant`` (default: the data
    directory's name) and ``result_args`` (what the fingerprint hashes)."""

    def __init__(self, args, ranks: Dist):
        self.args = args
        self._check_arguments()
        self._check_architecture()
        mode, ckpt, path = _explicit_source(args)
        if args.init_backbone_from and mode == "warm":
            raise DHSError(f"--init_backbone_from and a warm start of the whole network ({path}) are both given: "
                           "use one of them")
        self.hard_ids = sampling.read_hard_negatives(args.hard_negs) if args.hard_negs else None
        self._index_splits()
        self._fingerprint(path if mode == "warm" else None, ranks.world)
        state_last = Path(args.state_dir or args.out_dir) / "last.pt"
        self._start(*resolve_start(mode, ckpt, path, args.auto_resume, state_last, self.fingerprint))
        self._backbone_start()
        self._meta_statistics()
        self._weights(args)

    def _check_arguments(self) -> None:
        """Numbers in range, writable outputs, the meta columns, the variant and what the fingerprint hashes."""
        args = self.args
        check_numbers(args)
        check_writable_dir(args.out_dir, "--out_dir")  # before any work, not after the first epoch
        check_writable(Path(args.out_dir) / "best.pt", "--out_dir")
        check_writable_dir(args.state_dir or args.out_dir, "--state_dir")
        self.meta_cols = contract.parse_meta_columns(args.meta_cols)
        self.variant = args.variant if args.variant is not None else Path(str(args.data).rstrip("/")).name
        self.result_args = {**{k: getattr(args, k) for k in (*RESULT_ARGS, *OPTIONAL_RESULT_ARGS)},
                            "meta_cols": ",".join(self.meta_cols), "variant": self.variant}
        self.cuts = sampling.cuts_active(args.min_theta_over_psf, args.min_arc_snr)
        self.match = args.match_controls == "on" or (args.match_controls == "auto" and self.cuts)

    def _check_architecture(self) -> None:
        """The timm architecture and --timm_kwargs build a network (here, not after the data scan)."""
        import timm  # as in model.py: only where a network is built

        args = self.args
        if not timm.is_model(args.arch):
            raise DHSError(f"unknown architecture '{args.arch}': not a timm model name")
        try:
            self.timm_kwargs = json.loads(args.timm_kwargs) if args.timm_kwargs else None
        except json.JSONDecodeError as exc:
            raise DHSError(f"--timm_kwargs is not JSON: {exc}") from None
        build_model(args.arch, 0, timm_kwargs=self.timm_kwargs)

    def _index_splits(self) -> None:
        """Index the train and val splits (scalars only), check classes and columns, apply the curriculum cuts."""
        args = self.args
        self.fs, self.train_files, train_index = _open_and_index(args, args.train_split, self.meta_cols,
                                                                 self.cuts, self.match)
        _, self.val_files, val_index = _open_and_index(args, args.val_split, self.meta_cols, self.cuts, False)
        _check_classes(train_index, args.train_split, "")
        _check_classes(val_index, args.val_split, "")
        keep = sampling.curriculum_mask(train_index, args.min_theta_over_psf, args.min_arc_snr)
        self.n_train_all = len(train_index)
        self.train_index = train_index.take(keep)
        _check_classes(self.train_index, args.train_split,
                       f"after the cuts theta_E/PSF >= {args.min_theta_over_psf}, arc_snr >= {args.min_arc_snr}")
        self.val_index = val_index
        self.val_cut = sampling.curriculum_mask(val_index, args.min_theta_over_psf, args.min_arc_snr)
        _check_classes(val_index.take(self.val_cut), args.val_split, "after the curriculum cuts")

    def _fingerprint(self, warm_path: str | None, world_size: int) -> None:
        """The identity of the inputs and the fingerprint of arguments and inputs (what --auto_resume compares)."""
        args = self.args
        self.inputs = {"train": data_identity(self.fs, self.train_files), "val": data_identity(self.fs, self.val_files),
                       "init_from": file_identity(args.init_from), "hard_negs": file_identity(args.hard_negs),
                       "warm_start": file_identity(warm_path) if warm_path != args.init_from else None,
                       "init_backbone_from": file_identity(args.init_backbone_from), "world_size": world_size}
        self.fingerprint = fingerprint(self.result_args, self.inputs)

    def _start(self, mode: str | None, ckpt: dict | None, path: str, auto_note: str) -> None:
        """Check the checkpoint the run starts from (``resolve_start``) and say how it starts."""
        args = self.args
        self.resume_ckpt = None
        self.init_ckpt = None
        if mode in ("continue", "auto"):
            _check_ckpt_matches(ckpt, path, args, self.meta_cols)
            if ckpt.get("fingerprint") != self.fingerprint:
                used = {**ckpt.get("args", {}), "meta_cols": ",".join(ckpt["meta_cols"]), "variant": ckpt.get("variant")}
                diff = [k for k in (*RESULT_ARGS, *OPTIONAL_RESULT_ARGS)
                        if str(used.get(k, OPTIONAL_RESULT_ARGS.get(k))) != str(self.result_args[k])]
                raise DHSError(f"--resume {path}: that run used different arguments or inputs "
                               f"({', '.join(diff) or 'input files'} differ); use --init_from for a warm start")
            self.resume_ckpt = ckpt
            self.resume_note = (f"--auto_resume: " if mode == "auto" else "") + \
                f"continuing the interrupted run in {path} at epoch {ckpt['sampler']['epoch'] + 1}, " \
                f"batch {ckpt['sampler']['batches_done']} (fingerprint {self.fingerprint})"
        elif mode == "warm":
            _check_ckpt_matches(ckpt, path, args, self.meta_cols)
            self.init_ckpt = ckpt
            how = "--resume points at a finished stage's best.pt" if args.resume else "--init_from"
            self.resume_note = auto_note + (f"{how} ({path}): warm start with a fresh optimizer at lr {args.lr:g} "
                                            f"and a new {args.epochs}-epoch schedule")
        else:
            self.resume_note = auto_note + "starting fresh"

    def _backbone_start(self) -> None:
        """A backbone-only warm start (not when continuing: last.pt holds the whole network)."""
        args = self.args
        self.backbone_ckpt = None
        if args.init_backbone_from and self.resume_ckpt is None:
            self.backbone_ckpt = load_checkpoint(args.init_backbone_from)
            _check_ckpt_matches(self.backbone_ckpt, args.init_backbone_from, args, None)
            self.resume_note += (f"; image backbone from {args.init_backbone_from}, meta MLP and head fresh")

    def _meta_statistics(self) -> None:
        """Meta standardisation: continue/warm start keep the statistics the weights were trained with."""
        source = self.resume_ckpt or self.init_ckpt
        if source is not None:
            self.meta_mean, self.meta_std = list(source["meta_mean"]), list(source["meta_std"])
        else:
            raw = np.column_stack([self.train_index.columns[c] for c in self.meta_cols]) if self.meta_cols else \
                np.zeros((len(self.train_index), 0))
            self.meta_mean, self.meta_std = meta_statistics(raw)

    def _weights(self, args) -> None:
        """Sampling weights of the training rows: positives 1; controls hard_neg_weight if mined, then
        matched to the kept positives' conditions when matching is on."""
        idx = self.train_index
        ctrl = idx.label == 0
        base = np.ones(len(idx))
        self.n_hard = 0
        if self.hard_ids is not None:
            dataset.ids_compatible(self.hard_ids, idx.task_id, f"hard-negative file {args.hard_negs}",
                                   f"split '{args.train_split}' of {args.data}")
            hard = ctrl & np.isin(idx.task_id, self.hard_ids)
            self.n_hard = int(hard.sum())
            if len(self.hard_ids) and self.n_hard == 0:
                raise DHSError(f"none of the {len(self.hard_ids)} task_ids in {args.hard_negs} is a control in "
                               f"split '{args.train_split}'")
            base[hard] = args.hard_neg_weight
        weight = base.copy()
        cond_cols = [c for c in sampling.MATCH_COLUMNS if c in idx.columns] or \
            [c for c in self.meta_cols if c in idx.columns]
        cond = np.column_stack([idx.columns[c] for c in cond_cols]) if cond_cols else None
        if self.match and cond is not None:
            w_ctrl = sampling.control_match_weights(cond[~ctrl], cond[ctrl], base[ctrl])
            weight[ctrl] = w_ctrl
        elif ctrl.any():
            weight[ctrl] = base[ctrl] * (ctrl.sum() / base[ctrl].sum())
        self.weight = None if np.all(weight == 1.0) else weight
        self.meta_auc_before = self.meta_auc_after = math.nan
        if cond is not None:
            self.meta_auc_before = sampling.metadata_auc(cond, idx.label)
            self.meta_auc_after = sampling.metadata_auc(cond, idx.label, weight)
        self.cond_cols = cond_cols


# ----------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------

def run(args) -> int:
    ranks = Dist()
    try:
        return _run(args, ranks)
    finally:
        ranks.close()


def _log_setup(setup: Setup, ranks: Dist) -> None:
    args, idx = setup.args, setup.train_index
    log(ranks, f"data {args.data} variant {setup.variant}: train {len(idx)} rows kept of {setup.n_train_all} "
           f"({int((idx.label == 1).sum())} positives, {int((idx.label == 0).sum())} controls, "
           f"{idx.n_cutout_failed} declared cutout failures (cutout_ok != 1) excluded); "
           f"val {len(setup.val_index)} rows ({setup.val_index.n_cutout_failed} declared cutout failures excluded)")
    if setup.cuts:
        log(ranks, f"curriculum: theta_E/PSF >= {args.min_theta_over_psf}, arc_snr >= {args.min_arc_snr}; "
               f"controls {'matched' if setup.match else 'NOT matched'} to the kept positives on "
               f"{','.join(setup.cond_cols)}")
    if setup.hard_ids is not None:
        log(ranks, f"hard negatives: {setup.n_hard} controls from {args.hard_negs} weighted x{args.hard_neg_weight:g}")
    log(ranks, f"metadata-only AUC ({','.join(setup.cond_cols) or 'no condition columns'}) of the training set: "
           f"{setup.meta_auc_before:.3f} as filtered, {setup.meta_auc_after:.3f} as sampled (0.5 = no leak)")
    log(ranks, setup.resume_note)
    for name, index in (("train", idx), ("val", setup.val_index)):
        bad = {c: int((~np.isfinite(index.columns[c])).sum()) for c in setup.meta_cols}
        if any(bad.values()):
            log(ranks, f"warning: {name} meta values that are NaN/inf are replaced by the training mean: "
                   + ", ".join(f"{c} {n}" for c, n in bad.items() if n))


def _optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm parameters (ndim <= 1)."""
    decay = [param for n, param in model.named_parameters() if param.ndim > 1]
    no_decay = [param for n, param in model.named_parameters() if param.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


def _run(args, ranks: Dist) -> int:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    setup = Setup(args, ranks)
    _log_setup(setup, ranks)
    use_bf16 = bf16_enabled(args.use_bf16, ranks.device)
    if args.use_bf16 and not use_bf16:
        log(ranks, "bf16 autocast requested but off: this device has no native bf16")
    kwargs = model_kwargs(args.arch, len(setup.meta_cols), args.dropout, drop_path=args.drop_path,
                          stem_stride=args.stem_stride, timm_kwargs=setup.timm_kwargs, crop=args.crop,
                          stretch=args.stretch, rot180_residual=args.rot180_residual)
    model = build_model(**kwargs)
    if setup.init_ckpt is not None:
        model.load_state_dict(setup.init_ckpt["state_dict"])
    if setup.backbone_ckpt is not None:
        prefix = "backbone."
        model.backbone.load_state_dict({k[len(prefix):]: v for k, v in setup.backbone_ckpt["state_dict"].items()
                                        if k.startswith(prefix)})
    model.to(ranks.device)
    opt = _optimizer(model, args)
    ckpts = Checkpoints(setup, ranks, model, kwargs, opt)
    progress = ckpts.restore(setup.resume_ckpt) if setup.resume_ckpt is not None else Progress()
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if ranks.device.type == "cuda" else None)
    loss_fn = make_loss(args.loss, args.focal_alpha, args.focal_gamma)

    train_ds = stream.StampStream(setup.train_index, setup.fs, setup.meta_cols, setup.meta_mean, setup.meta_std,
                                  weight=setup.weight, batch_size=args.batch_size, shuffle=True, augment=args.augment,
                                  seed=args.seed, rank=ranks.rank, world_size=ranks.world, num_workers=args.num_workers)
    val_ds = stream.StampStream(setup.val_index, setup.fs, setup.meta_cols, setup.meta_mean, setup.meta_std,
                                weight=None, batch_size=max(args.batch_size, 256), shuffle=False, augment=False,
                                seed=args.seed, rank=ranks.rank, world_size=ranks.world, num_workers=args.num_workers)
    train_dl = _loader(train_ds, args.num_workers, ranks)
    val_dl = _loader(val_ds, args.num_workers, ranks)

    for epoch in range(progress.epoch, args.epochs):
        lr, stopped = train_one_epoch(net, model, opt, loss_fn, train_dl, train_ds, progress, epoch, setup, ranks,
                                      use_bf16, ckpts)
        if stopped:
            log(ranks, f"stopping after {progress.global_step} steps (--stop_after_steps)")
            if os.environ.get(KILL_ENV):
                raise DHSError(f"interrupted after {progress.global_step} steps ({KILL_ENV}: a simulated kill)")
            return 0
        loss_sum, n_seen, n_bad, n_planned = ranks.sum(list(progress.partial))
        _check_skips(n_bad, n_planned, args.max_skip_frac, final=True)
        # the epochs --val_every skips have no validation in their history row and cannot become best.pt
        validated = (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs
        val = validate(net, val_dl, val_ds, setup, ranks, use_bf16) if validated else {}
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1), "lr": lr, "steps": progress.global_step,
               "n_train": int(n_seen), "n_skipped": int(n_bad), **val}
        progress.history.append(row)
        improved = validated and (progress.best is None or
                                  selection_key(val["val_cut"]) > selection_key(progress.best["val_cut"]))
        if improved:
            progress.best = {"epoch": epoch + 1, "val_cut": val["val_cut"], "val_all": val["val_all"]}
        log(ranks, _format_epoch(row, improved))
        if ranks.main:
            if improved:
                ckpts.save_best(epoch + 1, row)
            ckpts.write_history(progress)
        progress.epoch, progress.batches_done, progress.partial = epoch + 1, 0, (0.0, 0, 0, 0)
        ckpts.save_last(progress, finished=epoch + 1 == args.epochs)
    if ranks.main:
        ckpts.mark_best_finished()
        log(ranks, f"done: best epoch {progress.best['epoch']} ({_fmt(progress.best['val_cut'])}) -> "
               f"{ckpts.out_dir / 'best.pt'}")
    return 0


def train_one_epoch(net, model, opt, loss_fn, loader, ds, progress: Progress, epoch: int, setup: Setup, ranks: Dist,
                    use_bf16: bool, ckpts: Checkpoints) -> tuple[float, bool]:
    """One epoch (or the rest of an interrupted one, from ``p.batches_done``): the warm-up + cosine LR per
    step, last.pt every ``--save_every_steps``. Updates ``p`` (steps, this rank's partial sums); returns the
    last LR and whether ``--stop_after_steps`` ended the run."""
    args = setup.args
    first = progress.batches_done if epoch == progress.epoch else 0
    if epoch != progress.epoch:
        progress.epoch, progress.batches_done, progress.partial = epoch, 0, (0.0, 0, 0, 0)
    ds.set_epoch(epoch, first)
    n_batches = len(ds)
    net.train()
    loss_sum, n_seen, n_bad, n_planned = progress.partial
    bar = tqdm(total=n_batches, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not ranks.main,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    lr = math.nan
    try:
        for batch in loader:
            lr = lr_at(epoch + progress.batches_done / n_batches, args.lr, args.epochs, args.warmup_epochs)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = _train_step(net, model, opt, loss_fn, batch, ranks.device, use_bf16, args.grad_clip)
            n = len(batch["label"])
            loss_sum += loss * n
            n_seen += n
            n_bad += batch["n_bad"]
            n_planned += batch["n_planned"]
            progress.partial = (loss_sum, n_seen, n_bad, n_planned)
            progress.batches_done += 1
            progress.global_step += 1
            _check_skips(n_bad, n_planned, args.max_skip_frac, final=False)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if (args.save_every_steps and progress.batches_done % args.save_every_steps == 0
                    and progress.batches_done < n_batches):
                ckpts.save_last(progress, finished=False)
            if args.stop_after_steps and progress.global_step >= args.stop_after_steps:
                return lr, True
    finally:
        bar.close()
    return lr, False


def _loader(ds, num_workers: int, ranks: Dist):
    # a private generator: the loader must not draw from the global torch RNG (dropout's), or a resumed
    # run would diverge from an uninterrupted one
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, pin_memory=ranks.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(0),
                                       prefetch_factor=4 if num_workers > 0 else None)


def _train_step(net, model, opt, loss_fn, batch, device, use_bf16: bool, grad_clip: float) -> float:
    images = batch["images"].to(device, non_blocking=True)
    meta = batch["meta"].to(device, non_blocking=True) if model.n_meta else None
    target = batch["label"].to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = net(images, meta)
    loss = loss_fn(logits.float(), target)  # float32 logits, never rounded probabilities
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def _check_skips(n_bad: float, n_planned: float, max_frac: float, final: bool, what: str = "training") -> None:
    if (final or n_planned >= 1000) and n_planned and n_bad / n_planned > max_frac:
        raise DHSError(f"{int(n_bad)} of {int(n_planned)} stamps did not decode, were not 3x64x64 or not finite in "
                       f"{what} ({n_bad / n_planned:.2%} > --max_skip_frac {max_frac:.2%})")


@torch.no_grad()
def validate(net, loader, val_ds, setup: Setup, ranks: Dist, use_bf16: bool) -> dict:
    """Validation logits (float32) on the whole val split -> roc_summary with and without the cuts."""
    net.eval()
    val_ds.set_epoch(0)
    ids, logits, n_bad = [], [], 0
    model = unwrap(net)
    for batch in tqdm(loader, total=len(val_ds), desc="val", disable=not ranks.main, file=sys.stderr, leave=False):
        images = batch["images"].to(ranks.device, non_blocking=True)
        meta = batch["meta"].to(ranks.device) if model.n_meta else None
        with torch.autocast(device_type=ranks.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(images, meta)
        logits.append(out.float().cpu().numpy())
        ids.append(batch["row"].numpy())
        n_bad += batch["n_bad"]
    parts = ranks.gather((np.concatenate(ids), np.concatenate(logits), n_bad))
    ids = np.concatenate([part[0] for part in parts])
    logit = np.concatenate([part[1] for part in parts])
    n_bad = sum(part[2] for part in parts)
    _check_skips(n_bad, len(setup.val_index), setup.args.max_skip_frac, final=True, what="validation")
    where = ids.astype(np.int64)  # positions in the validation index
    label = setup.val_index.label[where]
    cut = setup.val_cut[where]
    return {"val_cut": metrics.roc_summary(label[cut], logit[cut]),
            "val_all": metrics.roc_summary(label, logit), "val_skipped": int(n_bad)}


def _fmt(m: dict) -> str:
    return (f"tpr@1e-2 {m['tpr@fpr0.01']:.3f} tpr@1e-3 {m['tpr@fpr0.001']:.3f} tpr@1e-4 {m['tpr@fpr0.0001']:.3f} "
            f"fpr@0.85 {m['fpr@tpr0.85']:.2e} AUROC {m['auroc']:.4f} n_neg {m['n_neg']} tied_top {m['n_tied_top']}")


def _format_epoch(row: dict, improved: bool) -> str:
    return (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} lr {row['lr']:.2e}, skipped stamps: "
            f"{row['n_skipped']} of {row['n_skipped'] + row['n_train']} in training, {row.get('val_skipped', 0)} in "
            f"validation (did not decode / not 3x64x64 / not finite)\n"
            + (f"    val (cuts)    {_fmt(row['val_cut'])}\n    val (no cuts) {_fmt(row['val_all'])}" if "val_cut" in row
               else "    not validated (--val_every)")
            + ("\n    -> new best.pt" if improved else ""))


