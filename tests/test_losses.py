"""Focal loss and BCE from float32 logits, against direct formulas and a reference library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from darkhaloscope.learning.losses import bce_loss, focal_loss, make_loss


def _focal_direct(z, y, alpha, gamma):
    """Lin et al. (2017) written out: FL = -alpha_t (1 - p_t)^gamma log p_t, alpha_t = alpha for y = 1."""
    p = 1.0 / (1.0 + np.exp(-z))
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha)
    return np.mean(-alpha_t * (1 - p_t) ** gamma * np.log(p_t))


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 1.0)])
def test_focal_matches_the_direct_formula(alpha, gamma):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 500)
    y = rng.integers(0, 2, 500)
    got = focal_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(y), alpha, gamma).item()
    assert got == pytest.approx(_focal_direct(z, y, alpha, gamma), rel=1e-5)


def test_alpha_weights_the_positive_class():
    z = torch.tensor([0.0])
    pos = focal_loss(z, torch.tensor([1.0]), alpha=0.25, gamma=2.0).item()
    neg = focal_loss(z, torch.tensor([0.0]), alpha=0.25, gamma=2.0).item()
    assert neg / pos == pytest.approx(0.75 / 0.25)  # at p = 0.5 only alpha_t differs


def test_bce_matches_sklearn_and_focal_reduces_to_it():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 300)
    y = rng.integers(0, 2, 300)
    p = 1 / (1 + np.exp(-z))
    zt, yt = torch.tensor(z, dtype=torch.float32), torch.tensor(y)
    assert bce_loss(zt, yt).item() == pytest.approx(log_loss(y, p), rel=1e-5)
    assert focal_loss(zt, yt, alpha=-1, gamma=0.0).item() == pytest.approx(log_loss(y, p), rel=1e-5)


def test_losses_use_float32_logits_and_stay_finite_when_saturated():
    z = torch.tensor([40.0, -40.0, 40.0, -40.0], dtype=torch.bfloat16)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    for fn in (make_loss("bce"), make_loss("focal", 0.25, 2.0)):
        loss = fn(z, y)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # a confidently wrong logit of 40 costs ~40 nats in BCE (a probability rounded to 1.0 would give inf)
    assert bce_loss(torch.tensor([40.0]), torch.tensor([0.0])).item() == pytest.approx(40.0, rel=1e-4)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.6, 0.5)])
def test_make_loss_focal_passes_alpha_and_gamma_in_order(alpha, gamma):
    """``--loss focal --focal_alpha a --focal_gamma g`` is the focal loss with alpha = a and gamma = g
    (the values differ from each other and from the defaults, so a swap or a dropped argument shows)."""
    rng = np.random.default_rng(4)
    z, y = rng.normal(0, 2, 200), rng.integers(0, 2, 200)
    got = make_loss("focal", alpha, gamma)(torch.tensor(z, dtype=torch.float32), torch.tensor(y)).item()
    assert got == pytest.approx(_focal_direct(z, y, alpha, gamma), rel=1e-5)
    assert got != pytest.approx(_focal_direct(z, y, gamma, alpha), rel=1e-3)


def test_gradients_flow_and_empty_batches_are_zero():
    z = torch.zeros(4, requires_grad=True)
    focal_loss(z, torch.tensor([1.0, 0.0, 1.0, 0.0])).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert bce_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0
    with pytest.raises(ValueError):
        make_loss("hinge")
