"""Losses computed from float32 logits (never from rounded probabilities).

Label convention: y = 1 for an injected lens (positive), 0 for a control, i.e. ``1 - is_control``.

Focal loss (Lin et al. 2017): FL = -alpha_t (1 - p_t)^gamma log(p_t), with p_t = p for y = 1 and
1 - p for y = 0, and alpha_t = alpha for y = 1 (the POSITIVE class, lenses) and 1 - alpha for y = 0.
The seed's alpha = 0.25 therefore weights lenses by 0.25 and controls by 0.75, as in the paper, where
gamma does the work of focusing on hard examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("focal", "bce")


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy from logits (log-sum-exp form, stable for any logit)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return _mean(loss)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss from logits; alpha weights the positive class (y = 1), see the module docstring.
    alpha < 0 disables class weighting."""
    logits, targets = logits.float(), targets.float()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # = -log(p_t)
    p_t = torch.exp(-ce)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1.0 - alpha) * (1.0 - targets))
    return _mean(loss)


def _mean(loss: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (sampling weights act through the sampler, not here); 0 for an empty batch."""
    return loss.mean() if loss.numel() else loss.sum()


def make_loss(name: str, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
    """Loss function ``f(logits, targets) -> scalar`` for ``--loss focal|bce``."""
    if name == "bce":
        return bce_loss
    if name == "focal":
        return lambda logits, targets: focal_loss(logits, targets, focal_alpha, focal_gamma)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
