"""The lens classifier: a timm ConvNeXt image backbone joined with a small MLP over observing conditions.

Also the checkpoint format (docs/architecture.md) and the one meta standardisation that training and
inference share. ``load_model`` is the only way a network is rebuilt from a checkpoint.

64x64 adaptation: timm's ConvNeXt has a 4x4/stride-4 patch stem, so a 64x64 stamp becomes a 16x16 map
and the last stage sees 2x2. ``stem_stride=2`` keeps 2x the resolution (32x32 -> 4x4 at the last
stage), at about 4x the compute and activation memory. ResNet-family stems (conv1 + max-pool, stride 4
together) take ``stem_stride`` 2 (no max-pool) or 1 (CIFAR-style: conv1 stride 1, no max-pool). The default is the
seed's unmodified timm model (stride 4); the choice is recorded in the checkpoint's ``model_kwargs``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from darkhaloscope.errors import DHSError
from darkhaloscope.stamps.contract import NORM_CLIP, STAMP_SIZE

DEFAULT_STEM_STRIDE = 4
STRETCHES = ("clip", "asinh")
STRETCH_SCALE = NORM_CLIP  # sigma: the seed's clip, and where the asinh stretch turns from linear to logarithmic


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` pixels of (N, C, 64, 64) stamps (``size`` even, so the crop keeps the
    stamp centre (63/2, 63/2), where the host sits, at its own centre and the 8 augmentation symmetries
    commute with it). ``size`` 64 returns the stamps unchanged."""
    lo = (images.shape[-1] - size) // 2
    return images if lo == 0 else images[..., lo:lo + size, lo:lo + size]


def rot180_residual(images: torch.Tensor) -> torch.Tensor:
    """x - rot180(x) per band, the rotation about the stamp centre ((N, C, H, W), H and W even).

    A host galaxy (elliptical Sersic light convolved with a point-symmetric PSF, centred within 0.3 px of the
    stamp centre) is point-symmetric about that centre, so this residual removes it, up to a dipole from the
    centring offset, and keeps what is not symmetric: an arc and its fainter counter-image, which otherwise sit
    as a few-sigma bump on a host core hundreds of sigma bright. (Hand-written: one flip; no library has this
    as a named operation.)"""
    return images - torch.flip(images, dims=(-2, -1))


def stretch(images: torch.Tensor, name: str = "clip") -> torch.Tensor:
    """The network's input stretch of sky-normalised stamps (units of the sky noise, unclipped).

    ``clip``: clip to +-10 sigma, the seed's normalisation (the values of ``contract.normalize_stamps``).
    ``asinh``: 10 * asinh(x / 10), linear within a few sigma and logarithmic beyond, so an arc lying on a
    host's core tens to hundreds of sigma above the sky keeps its contrast instead of being clipped away
    (with the clip, deep images of bright hosts lose the arc wherever the host exceeds 10 sigma)."""
    if name == "clip":
        return images.clamp(-STRETCH_SCALE, STRETCH_SCALE)
    if name == "asinh":
        scaled = images / STRETCH_SCALE
        if scaled.device.type == "cpu" and not scaled.requires_grad and scaled.dtype == torch.float32:
            # torch's CPU asinh is scalar code: 6.6 ms per 128x3x32x32 batch on one core, 8.8x numpy's vectorised
            # arcsinh (benchmarks/bench_stretch.py, docs/benchmarks.md). Same function, within an ulp.
            return torch.from_numpy(np.arcsinh(scaled.numpy())) * STRETCH_SCALE
        return torch.asinh(scaled) * STRETCH_SCALE
    raise DHSError(f"unknown input stretch {name!r}; choose one of {', '.join(STRETCHES)}")


class LensClassifier(nn.Module):
    """Image features (timm backbone, global pooled) concatenated with an MLP embedding of the
    standardised meta inputs, then dropout and one linear layer -> one float32 logit per stamp."""

    def __init__(self, arch: str, n_meta: int = 0, dropout: float = 0.1, drop_path: float = 0.0,
                 stem_stride: int = DEFAULT_STEM_STRIDE, meta_hidden: int = 32, timm_kwargs: dict | None = None,
                 crop: int = STAMP_SIZE, stretch: str = "clip", rot180_residual: bool = False):
        super().__init__()
        import timm

        if not (isinstance(crop, int) and 16 <= crop <= STAMP_SIZE and crop % 2 == 0):
            raise DHSError(f"crop must be an even number of pixels in [16, {STAMP_SIZE}], got {crop!r}")
        if stretch not in STRETCHES:
            raise DHSError(f"unknown input stretch {stretch!r}; choose one of {', '.join(STRETCHES)}")
        self.crop = crop
        self.stretch = stretch
        if not isinstance(rot180_residual, bool):
            raise DHSError(f"rot180_residual must be true or false, got {rot180_residual!r}")
        self.rot180_residual = rot180_residual
        in_chans = 6 if rot180_residual else 3

        if not timm.is_model(arch):
            raise DHSError(f"unknown architecture '{arch}': not a timm model name (see timm.list_models())")
        for name, rate in (("dropout", dropout), ("drop_path", drop_path)):
            if not (isinstance(rate, (int, float)) and 0.0 <= float(rate) < 1.0):
                raise DHSError(f"{name} must be a probability in [0, 1), got {rate}")
        if timm_kwargs is not None and not isinstance(timm_kwargs, Mapping):
            raise DHSError(f"timm_kwargs must be a JSON object of timm.create_model arguments, got {timm_kwargs!r}")
        self.arch = arch
        self.n_meta = int(n_meta)
        try:
            self.backbone = timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0,
                                              drop_path_rate=float(drop_path), **(timm_kwargs or {}))
        except (TypeError, ValueError, AssertionError, IndexError, KeyError, RuntimeError) as exc:
            raise DHSError(f"timm model '{arch}' does not accept {timm_kwargs}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if stem_stride != DEFAULT_STEM_STRIDE:
            self._set_stem_stride(int(stem_stride))
        if crop != STAMP_SIZE:  # a crop too small for the backbone's downsampling fails here, not mid-training
            try:
                with torch.no_grad():
                    self.backbone.eval()(torch.zeros(1, in_chans, crop, crop))
            except RuntimeError:
                raise DHSError(f"crop {crop} is too small for '{arch}' with stem_stride {stem_stride}") from None
            self.backbone.train()
        # channels-last (NHWC) weights and inputs: oneDNN's CPU convolutions skip a layout conversion per
        # layer, ~1.2x faster training of convnext_atto on 32x32 crops (docs/benchmarks.md); the same on GPUs.
        self.backbone.to(memory_format=torch.channels_last)
        n_feat = self.backbone.num_features
        if self.n_meta > 0:
            self.meta_mlp = nn.Sequential(nn.Linear(self.n_meta, meta_hidden), nn.GELU(),
                                          nn.Linear(meta_hidden, meta_hidden), nn.GELU())
            n_feat += meta_hidden
        else:
            self.meta_mlp = None
        self.dropout = nn.Dropout(float(dropout))
        self.head = nn.Linear(n_feat, 1)

    def _set_stem_stride(self, stride: int) -> None:
        """Make the stem downsample by ``stride`` instead of 4, so every later stage runs at a finer scale.

        ConvNeXt (a 4x4/4 patch stem): stride 2 replaces it by a 4x4/2 convolution (padding 1). (timm's
        ``patch_size=2`` would not do this: it moves the missing stride-2 into the first stage.)
        ResNet-family models (``conv1`` + ``maxpool``, stride 2 each): stride 2 drops the max-pool, stride 1
        also makes ``conv1`` stride 1 (the CIFAR-style stem for small images)."""
        stem = getattr(self.backbone, "stem", None)
        conv = stem[0] if isinstance(stem, nn.Sequential) and len(stem) else None
        if isinstance(conv, nn.Conv2d) and conv.stride == (4, 4) and stride == 2:
            stem[0] = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=4, stride=2, padding=1)
            return
        conv1 = getattr(self.backbone, "conv1", None)
        if stride in (1, 2) and isinstance(getattr(self.backbone, "maxpool", None), nn.MaxPool2d):
            first = conv1[0] if isinstance(conv1, nn.Sequential) else conv1  # deep stems: the first conv strides
            if isinstance(first, nn.Conv2d) and first.stride == (2, 2):
                self.backbone.maxpool = nn.Identity()
                if stride == 1:
                    first.stride = (1, 1)
                return
        raise DHSError(f"stem_stride {stride} is supported as 2 for ConvNeXt patch stems and as 1 or 2 for "
                       f"ResNet-style stems (conv1 + maxpool), not for '{self.arch}'")

    def forward(self, images: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        images = centre_crop(images, self.crop)
        if self.rot180_residual:  # subtract before the stretch, which would compress an arc on a bright core first
            images = torch.cat([images, rot180_residual(images)], dim=1)
        images = stretch(images, self.stretch)
        feats = self.backbone(images.contiguous(memory_format=torch.channels_last))
        if self.meta_mlp is not None:
            if meta is None or meta.shape[-1] != self.n_meta:
                got = None if meta is None else tuple(meta.shape)
                raise DHSError(f"model expects {self.n_meta} meta inputs, got {got}")
            feats = torch.cat([feats, self.meta_mlp(meta.to(feats.dtype))], dim=1)
        # The head runs in float32 even under bf16 autocast: logits are ranked at 1e-4 FPR, so they
        # must not be rounded to bf16's 8 bits of mantissa.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            logits = self.head(self.dropout(feats.float()))
        return logits.squeeze(-1)


def build_model(arch: str, n_meta: int, dropout: float = 0.1, **kwargs) -> LensClassifier:
    """``kwargs``: ``drop_path`` (stochastic depth rate), ``stem_stride`` (4 = timm default, 2 = finer
    stem for 64x64 stamps), ``crop`` (the network sees the central crop x crop pixels), ``stretch`` (the input
    stretch of the sky-normalised stamps: ``clip`` or ``asinh``), ``rot180_residual`` (3 more input channels:
    each band minus its 180-degree rotation about the stamp centre, stretched the same way), ``meta_hidden``,
    ``timm_kwargs`` (extra ``timm.create_model`` arguments, e.g. smaller ``depths``/``dims``). Everything passed
    here is stored as ``model_kwargs``."""
    return LensClassifier(arch, n_meta=n_meta, dropout=dropout, **kwargs)


def model_kwargs(arch: str, n_meta: int, dropout: float, **kwargs) -> dict:
    """The dict stored in a checkpoint such that ``build_model(**model_kwargs)`` rebuilds the network."""
    return {"arch": arch, "n_meta": int(n_meta), "dropout": float(dropout), **kwargs}


# ----------------------------------------------------------------------------------------------------
# Meta inputs
# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


