"""The classifier (timm ConvNeXt + meta fusion head) and the checkpoint format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from darkhaloscope.errors import DHSError
from darkhaloscope.learning import checkpoint as C
from darkhaloscope.learning import meta
from darkhaloscope.learning import model as M


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return M.build_model("convnext_atto", n_meta=2, dropout=0.1).eval()


def test_forward_gives_float32_logits_also_under_bf16_autocast(net):
    x = torch.randn(3, 3, 64, 64)
    meta = torch.randn(3, 2)
    out = net(x, meta)
    assert out.shape == (3,) and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = net(x, meta)
    assert out16.dtype == torch.float32


def test_meta_inputs_reach_the_logit(net):
    x = torch.randn(2, 3, 64, 64)
    a = net(x, torch.zeros(2, 2))
    b = net(x, torch.full((2, 2), 3.0))
    assert not torch.allclose(a, b)
    with pytest.raises(DHSError, match="meta inputs"):
        net(x, None)


def test_unknown_arch_and_stem_stride():
    with pytest.raises(DHSError, match="unknown architecture"):
        M.build_model("convnext_nonexistent", 0)
    fine = M.build_model("convnext_atto", 0, stem_stride=2)
    coarse = M.build_model("convnext_atto", 0)
    x = torch.randn(1, 3, 64, 64)
    assert fine.backbone.forward_features(x).shape[-1] == 4  # 64 / 2 / 8
    assert coarse.backbone.forward_features(x).shape[-1] == 2  # 64 / 4 / 8


def test_resnet_stem_stride():
    kw = {"timm_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}}
    x = torch.randn(1, 3, 64, 64)
    sizes = {s: M.build_model("resnet18", 0, stem_stride=s, **kw).backbone.forward_features(x).shape[-1]
             for s in (4, 2, 1)}
    assert sizes == {4: 2, 2: 4, 1: 8}  # 64 / stem / 8 (three stride-2 stages)
    assert M.build_model("resnet18", 2, stem_stride=1, **kw)(x, torch.zeros(1, 2)).shape == (1,)
    with pytest.raises(DHSError, match="stem_stride 1"):
        M.build_model("convnext_atto", 0, stem_stride=1)


def test_checkpoint_roundtrip_rebuilds_the_same_network(net, tmp_path):
    kwargs = M.model_kwargs("convnext_atto", 2, 0.1)
    path = tmp_path / "best.pt"
    C.save_checkpoint(path, kind="best", arch="convnext_atto", model_kwargs=kwargs, state_dict=net.state_dict(),
                      meta_cols=["psfsize_r", "psfdepth_r"], meta_mean=[1.2, 24.0], meta_std=[0.2, 0.5],
                      variant="v", args={}, epoch=1, metrics={}, finished=True)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary left behind
    loaded, ckpt = C.load_model(path)
    x, meta = torch.randn(2, 3, 64, 64), torch.randn(2, 2)
    assert torch.equal(loaded(x, meta), net(x, meta))
    assert ckpt["format"] == C.CKPT_FORMAT and ckpt["meta_cols"] == ["psfsize_r", "psfdepth_r"]


def test_unreadable_or_foreign_checkpoints_are_named(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(DHSError, match="garbage.pt"):
        C.load_model(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DHSError, match="not a darkhaloscope checkpoint"):
        C.load_model(foreign)
    with pytest.raises(DHSError, match="does not exist"):
        C.load_model(tmp_path / "missing.pt")


def test_standardize_meta_shared_rule():
    ckpt = {"meta_mean": [1.0, 24.0], "meta_std": [0.5, 2.0]}
    vals = np.array([[2.0, 26.0], [np.nan, 24.0], [1.0, np.inf]])
    out = meta.standardize_meta(vals, ckpt)
    assert out.dtype == np.float32
    assert np.allclose(out, [[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert np.array_equal(out, meta.standardize_meta(vals, ckpt["meta_mean"], ckpt["meta_std"]))
    mean, std = meta.meta_statistics(np.array([[1.0, 5.0], [3.0, 5.0], [np.nan, 5.0]]))
    assert mean == [2.0, 5.0] and std == [1.0, 1.0]  # constant column -> std 1


def test_crop_feeds_the_central_pixels_and_is_stored_in_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = M.build_model("convnext_atto", 0, crop=32).eval()
    x = torch.randn(2, 3, 64, 64)
    inner = x.clone()
    inner[..., :16, :] = inner[..., 48:, :] = 0  # change only pixels outside the central 32x32
    inner[..., :, :16] = inner[..., :, 48:] = 0
    assert torch.equal(net(x), net(inner))
    assert not torch.equal(net(x), net(x.flip(-1)))  # ... but the central pixels are seen
    # the crop is centred on the stamp centre (63/2, 63/2): the 8 symmetries of the stamp commute with it
    sym = x.rot90(1, (-2, -1)).flip(-1)
    assert torch.equal(M.centre_crop(sym, 32), M.centre_crop(x, 32).rot90(1, (-2, -1)).flip(-1))
    path = tmp_path / "best.pt"
    C.save_checkpoint(path, kind="best", arch="convnext_atto", model_kwargs=M.model_kwargs("convnext_atto", 0, 0.1, crop=32),
                      state_dict=net.state_dict(), meta_cols=[], meta_mean=[], meta_std=[], variant="v", args={},
                      epoch=1, metrics={}, finished=True)
    loaded, _ = C.load_model(path)
    assert loaded.crop == 32 and torch.equal(loaded(x), net(x))


def test_bad_crops_are_named():
    for crop in (63, 80, 8, "32"):
        with pytest.raises(DHSError, match="crop must be an even number"):
            M.build_model("convnext_atto", 0, crop=crop)
    with pytest.raises(DHSError, match="crop 16 is too small for 'convnext_atto'"):
        M.build_model("convnext_atto", 0, crop=16)
    assert M.build_model("convnext_atto", 0, crop=16, stem_stride=2).crop == 16


def test_input_stretch_clip_and_asinh():
    """``clip`` is the seed's +-10 sigma clip; ``asinh`` is 10 asinh(x / 10): the same as the identity within a
    sigma or two, odd, monotonic, and it keeps an arc on a host core far above 10 sigma, which the clip erases."""
    x = torch.linspace(-3000, 3000, 60001)
    clip, asinh = M.stretch(x, "clip"), M.stretch(x, "asinh")
    assert torch.equal(clip, x.clamp(-10, 10))
    np.testing.assert_allclose(asinh.numpy(), 10 * np.arcsinh(x.numpy().astype(np.float64) / 10), rtol=1e-5, atol=1e-5)
    assert torch.equal(M.stretch(-x, "asinh"), -asinh) and bool((asinh.diff() > 0).all())
    small = x[x.abs() <= 1]
    assert float((M.stretch(small, "asinh") - small).abs().max()) < 2e-3
    host, arc = torch.full((1, 3, 64, 64), 200.0), torch.zeros(1, 3, 64, 64)
    arc[..., 20:24, 30:40] = 20.0  # a 20-sigma arc on a 200-sigma host core
    assert torch.equal(M.stretch(host + arc, "clip"), M.stretch(host, "clip"))  # clipped away
    assert float((M.stretch(host + arc, "asinh") - M.stretch(host, "asinh")).max()) > 0.5  # kept
    with pytest.raises(DHSError, match="unknown input stretch 'log'"):
        M.build_model("resnet10t", 0, stretch="log")


def test_rot180_residual_removes_a_centred_host_and_keeps_the_arc(tmp_path):
    """The residual channels cancel anything point-symmetric about the stamp centre (a Sersic host on the
    centre, whatever its brightness) and keep an arc; they commute with the 8 test-time symmetries; the option
    is stored in the checkpoint (old checkpoints: off)."""
    from darkhaloscope.evaluation.infer import symmetric_view

    yy, xx = torch.meshgrid(torch.arange(64.0) - 31.5, torch.arange(64.0) - 31.5, indexing="ij")
    r = torch.sqrt((xx / 0.7) ** 2 + yy**2)  # elliptical, centred on the stamp centre (31.5, 31.5)
    host = (500.0 * torch.exp(-r / 3.0)).expand(1, 3, 64, 64)
    arc = torch.zeros(1, 3, 64, 64)
    arc[..., 20:23, 26:38] = 15.0  # an arc above the centre, no counter-image
    assert float(M.rot180_residual(host).abs().max()) < 1e-3  # the host is gone
    res = M.rot180_residual(host + arc)
    assert torch.allclose(res[..., 20:23, 26:38], arc[..., 20:23, 26:38], atol=1e-3)  # the arc is kept
    assert torch.allclose(res, -torch.flip(res, dims=(-2, -1)))  # and mirrored with the opposite sign
    for code in range(8):  # the augmentation's and test-time views' symmetries commute with the rotation by 180
        view = symmetric_view(host + arc, code)
        assert torch.allclose(M.rot180_residual(view), symmetric_view(res, code))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64) * 30
    net = M.build_model("resnet10t", 0, crop=32, stretch="asinh", rot180_residual=True).eval()
    assert net.backbone.conv1[0].in_channels == 6
    kwargs = M.model_kwargs("resnet10t", 0, 0.1, crop=32, stretch="asinh", rot180_residual=True)
    C.save_checkpoint(tmp_path / "r.pt", kind="best", arch="resnet10t", model_kwargs=kwargs,
                      state_dict=net.state_dict(), meta_cols=[], meta_mean=[], meta_std=[], variant="v", args={},
                      epoch=1, metrics={}, finished=True)
    loaded, _ = C.load_model(tmp_path / "r.pt")
    assert loaded.rot180_residual and torch.equal(loaded(x), net(x))
    assert not M.build_model("resnet10t", 0, crop=32).rot180_residual
    with pytest.raises(DHSError, match="rot180_residual must be true or false"):
        M.build_model("resnet10t", 0, rot180_residual="yes")


def test_stretch_is_stored_in_the_checkpoint_and_old_checkpoints_clip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64) * 300  # sky-normalised and unclipped, as the stream gives them
    for name in ("clip", "asinh"):
        net = M.build_model("resnet10t", 0, crop=32, stretch=name).eval()
        path = tmp_path / f"{name}.pt"
        kwargs = M.model_kwargs("resnet10t", 0, 0.1, crop=32, stretch=name)
        if name == "clip":
            del kwargs["stretch"]  # a checkpoint from before the option existed
        C.save_checkpoint(path, kind="best", arch="resnet10t", model_kwargs=kwargs, state_dict=net.state_dict(),
                          meta_cols=[], meta_mean=[], meta_std=[], variant="v", args={}, epoch=1, metrics={},
                          finished=True)
        loaded, _ = C.load_model(path)
        assert loaded.stretch == name and torch.equal(loaded(x), net(x))
        # the clipping network cannot tell values beyond 10 sigma apart; the asinh one can
        assert torch.equal(net(x), net(x.clamp(-10, 10))) == (name == "clip")

