"""`vitsim.Capture` on random-weight timm models: layer names, activations, q/k, residual norms."""

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import vitsim  # noqa: E402
from vitsim import reference  # noqa: E402
from vitsim.capture import UnsupportedModelError, describe  # noqa: E402

from _data import to_numpy  # noqa: E402

# Attention distance of the hooked q/k (online softmax, float32 inputs) vs the float64 reference
# on timm's explicitly computed float32 attention maps: both see float32-rounded values, so they
# agree to float32 accuracy (relative 1e-5, conventions §8's float32 tolerance).
DIST_RTOL = 1e-5
# Ratio of norms from norms taken inside the hooks (float32) vs the float64 reference on the
# same float32 tensors: relative 1e-5 (conventions §8, float32).
RATIO_RTOL = 1e-5

# (name, timm kwargs, image side, prefix tokens, grid, patch size)
VITS = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 48}, 48, 1, (3, 3), 16),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 48}, 48, 2, (3, 3), 16),
    # 4 of its 12 blocks keep the test fast; the prefix (class token + 4 registers) is the point.
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 42, "depth": 4}, 42, 5, (3, 3), 14),
}


def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def vits():
    return {key: (_model(name, **kw), side, *rest) for key, (name, kw, side, *rest) in VITS.items()}


@pytest.fixture(scope="module")
def resnet18():
    # zero_init_last=False: timm zero-initialises each block's last BatchNorm, which would make
    # every f(z) zero and the ratio of norms infinite.
    return _model("resnet18", zero_init_last=False)


def _images(side, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, side, side, generator=g)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _vit_tokens(model, x):
    """The residual stream entering blocks.0, computed as timm's forward_features does."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


@pytest.mark.parametrize("key", list(VITS))
def test_vit_layer_names_and_geometry(vits, key):
    model, side, prefix, grid, patch = vits[key]
    depth = 4 if key == "registers" else 12
    blocks = describe(model)
    assert blocks.kind == "vit"
    assert blocks.layers == tuple(f"blocks.{i}" for i in range(depth))
    assert blocks.attention == tuple(f"blocks.{i}.attn" for i in range(depth))
    assert blocks.residuals[:2] == ("blocks.0.attn", "blocks.0.mlp") and len(blocks.residuals) == 2 * depth
    assert (blocks.num_prefix_tokens, blocks.grid, blocks.patch_size) == (prefix, grid, patch)
    assert blocks.class_token
    fine = describe(model, granularity="fine")
    assert len(fine.layers) == 6 * depth
    assert fine.layers[:6] == ("blocks.0.norm1", "blocks.0.attn", "blocks.0.attn_residual",
                               "blocks.0.norm2", "blocks.0.mlp.act", "blocks.0")


def test_resnet_layer_names(resnet18):
    spec = describe(resnet18)
    names = tuple(f"layer{s}.{b}" for s in range(1, 5) for b in range(2))
    assert spec.kind == "resnet" and spec.layers == names and spec.residuals == names
    assert spec.attention == () and spec.patch_size is None
    fine = describe(resnet18, granularity="fine")
    assert fine.layers[:3] == ("layer1.0.act1", "layer1.0", "layer1.1.act1") and len(fine.layers) == 16


def test_resnetv2_and_bottleneck_resnets_are_supported():
    v2 = describe(_model("resnetv2_18"), granularity="fine")
    assert v2.layers[:3] == ("stages.0.blocks.0.norm1", "stages.0.blocks.0.norm2", "stages.0.blocks.0")
    assert len(v2.residuals) == 8
    r26 = describe(_model("resnet26"), granularity="fine")
    assert r26.layers[:3] == ("layer1.0.act1", "layer1.0.act2", "layer1.0") and len(r26.residuals) == 8


@pytest.mark.parametrize("key", list(VITS))
def test_vit_activations_and_attention_distance_from_hooked_qk(vits, key):
    model, side, prefix, grid, patch = vits[key]
    x = _images(side)
    maps = {}
    handles = []
    for i, blk in enumerate(model.blocks):
        blk.attn.fused_attn = False  # timm then forms softmax(q kᵀ) explicitly; attn_drop sees it
        handles.append(blk.attn.attn_drop.register_forward_hook(
            lambda m, a, out, i=i: maps.__setitem__(i, out.detach().clone())))
    try:
        with torch.no_grad(), vitsim.Capture(model) as cap:
            model(x)
            acts, qk = dict(cap.activations), dict(cap.qk)
            assert cap.grid == grid
        # The same (unfused) computation, block by block: bit-identical block outputs.
        with torch.no_grad():
            h = _vit_tokens(model, x)
            for i, blk in enumerate(model.blocks):
                h = blk(h)
                assert torch.equal(acts[f"blocks.{i}"], h)
    finally:
        for handle in handles:
            handle.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = timm.layers.use_fused_attn()
    n_tokens = prefix + grid[0] * grid[1]
    for i, blk in enumerate(model.blocks):
        q, k = qk[f"blocks.{i}.attn"]
        assert q.shape == k.shape == (3, blk.attn.num_heads, n_tokens, blk.attn.head_dim)
        got = vitsim.attention_distance_qk(q, k, scale=blk.attn.scale, patch_size=patch, grid=grid,
                                           num_prefix_tokens=prefix)
        want = reference.attention_distance(to_numpy(maps[i]), patch_size=patch, grid=grid,
                                            num_prefix_tokens=prefix)
        torch.testing.assert_close(got.cpu(), torch.from_numpy(want), rtol=DIST_RTOL, atol=0)


def test_vit_fine_activations_and_residual_norms_with_layerscale():
    # LayerScale (init_values) and a prefix of 1: f(z) must include ls1/ls2.
    model = _model("vit_tiny_patch16_224", img_size=32, depth=2, init_values=0.3)
    x = _images(32, b=4, seed=1)
    with torch.no_grad(), vitsim.Capture(model, granularity="fine", keep_residuals=True) as cap:
        model(x)
        acts, norms, res = dict(cap.activations), dict(cap.norms), dict(cap.residuals)
    with torch.no_grad():
        z = _vit_tokens(model, x)
        for i, blk in enumerate(model.blocks):
            b = f"blocks.{i}"
            n1 = blk.norm1(z)
            attn = blk.attn(n1)
            f_attn = blk.ls1(attn)
            mid = z + f_attn
            n2 = blk.norm2(mid)
            hidden = blk.mlp.act(blk.mlp.fc1(n2))
            f_mlp = blk.ls2(blk.mlp(n2))
            out = mid + f_mlp
            for name, want in ((f"{b}.norm1", n1), (f"{b}.attn", attn), (f"{b}.attn_residual", mid),
                               (f"{b}.norm2", n2), (f"{b}.mlp.act", hidden), (b, out)):
                torch.testing.assert_close(acts[name], want, rtol=1e-6, atol=1e-6)
            for sub, zz, fz in ((f"{b}.attn", z, f_attn), (f"{b}.mlp", mid, f_mlp)):
                torch.testing.assert_close(res[sub][0], zz, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(res[sub][1], fz, rtol=1e-6, atol=1e-6)
                acc = vitsim.RatioOfNorms("tokens", num_prefix_tokens=1)
                acc.update_norms(*norms[sub])
                want = reference.ratio_of_norms_tokens(to_numpy(zz), to_numpy(fz), num_prefix_tokens=1)
                got = acc.compute()
                assert got["cls"] == pytest.approx(want["cls"], rel=RATIO_RTOL)
                assert got["spatial"] == pytest.approx(want["spatial"], rel=RATIO_RTOL)
            z = out


def test_resnet_activations_and_residual_norms(resnet18):
    x = _images(32, b=4, seed=2)
    with torch.no_grad(), vitsim.Capture(resnet18, granularity="fine") as cap:
        resnet18(x)
        acts, norms = dict(cap.activations), dict(cap.norms)
    with torch.no_grad():
        assert torch.equal(acts["layer4.1"], resnet18.forward_features(x))
        h = resnet18.maxpool(resnet18.act1(resnet18.bn1(resnet18.conv1(x))))
        for s in range(1, 5):
            for j, blk in enumerate(getattr(resnet18, f"layer{s}")):
                name = f"layer{s}.{j}"
                inner = blk.act1(blk.bn1(blk.conv1(h)))
                fz = blk.bn2(blk.conv2(inner))
                z = blk.downsample(h) if blk.downsample is not None else h
                torch.testing.assert_close(acts[f"{name}.act1"], inner)
                want = reference.ratio_of_norms_maps(to_numpy(z), to_numpy(fz))
                acc = vitsim.RatioOfNorms("maps")
                acc.update_norms(*norms[name])
                assert acc.compute() == pytest.approx(want, rel=RATIO_RTOL)
                h = blk(h)
                torch.testing.assert_close(acts[name], h)


def test_hooks_removed_on_exit_and_on_error(vits, resnet18):
    model = vits["vit"][0]
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vitsim.Capture(model, granularity="fine") as cap:
            assert _hook_count(model) > before
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    assert cap.activations == {} and cap.qk == {} and cap.norms == {}
    with vitsim.Capture(resnet18), torch.no_grad():
        resnet18(_images(32, b=2))
    assert _hook_count(resnet18) == 0


def test_on_qk_callback_receives_every_layer_without_storing(vits):
    model, side, *_ = vits["deit_distilled"]
    seen = []
    with torch.no_grad(), vitsim.Capture(model, on_qk=lambda name, q, k: seen.append((name, q.shape))) as cap:
        model(_images(side, b=2))
        assert cap.qk == {}
    assert [name for name, _ in seen] == [f"blocks.{i}.attn" for i in range(12)]
    assert seen[0][1] == (2, 3, 11, 64)


def test_unsupported_model_and_layer_patterns():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU()))
    with pytest.raises(UnsupportedModelError, match="supported: timm VisionTransformer.*layers"):
        describe(net)
    with pytest.raises(UnsupportedModelError, match="resnet"):
        vitsim.Capture(_model("mobilenetv3_small_050"))
    spec = describe(net, layers=r"\d|2\.0")
    assert spec.kind == "custom" and spec.layers == ("0", "1", "2", "2.0")
    with torch.no_grad(), vitsim.Capture(net, layers=r"2\.\d") as cap:
        net(torch.randn(2, 3, 8, 8))
        assert [t.shape for t in cap.layer_outputs()] == [(2, 2, 6, 6), (2, 2, 6, 6)]
    with pytest.raises(ValueError, match="matches no module"):
        describe(net, layers="blocks")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        describe(net, layers="(")
    with pytest.raises(ValueError, match="granularity"):
        describe(net, granularity="layers")
