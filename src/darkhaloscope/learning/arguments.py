"""The arguments of ``dhs train`` that define its result (without torch: the workflow imports this at parse time)."""

from __future__ import annotations


# Arguments that change the result of a run: they (and the identity of the inputs) make the fingerprint
# that --auto_resume compares. --num_workers is one because it sets the lane layout of the batch order.
RESULT_ARGS = ("arch", "timm_kwargs", "epochs", "batch_size", "lr", "weight_decay", "dropout", "drop_path", "stem_stride", "crop",
               "use_bf16", "augment", "loss", "focal_alpha", "focal_gamma", "min_theta_over_psf", "min_arc_snr",
               "meta_cols", "hard_neg_weight", "seed", "num_workers", "warmup_epochs", "grad_clip", "val_split",
               "train_split", "match_controls", "max_skip_frac", "variant")


# Added later: hashed only when not at their default (an input: when given), so the fingerprints of runs without
# them stay as they were.
OPTIONAL_RESULT_ARGS = {"val_every": 1, "stretch": "clip", "rot180_residual": False}


OPTIONAL_INPUTS = ("init_backbone_from",)
