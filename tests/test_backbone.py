"""Visual backbone: frozen BN, DETR sine positions, ResNet/tiny token shapes, padding, freezing, weight loading."""

import math
import re

import pytest
import torch
import torchvision
from torch import nn

from e2evlp.models.backbone import (
    FrozenBatchNorm2d,
    SinePositionEncoding,
    TinyCNN,
    VisualBackbone,
    VisualTokens,
)
from tests.helpers import gen


def random_bn(channels, seed=0):
    bn = nn.BatchNorm2d(channels)
    g = gen(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    bn.num_batches_tracked.fill_(7)
    return bn.eval()


def resnet_features(model, x):
    """torchvision ResNet's layer4 output, the way its forward computes it."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
    return x


# --- FrozenBatchNorm2d ---

def test_frozen_bn_equals_eval_batchnorm():
    bn = random_bn(5)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # carries num_batches_tracked, which must be ignored
    x = torch.randn(2, 5, 7, 3, generator=gen(1))
    torch.testing.assert_close(frozen(x), bn(x))
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []  # nothing for an optimizer to update


def test_frozen_bn_custom_eps():
    bn = random_bn(3)
    bn.eps = 1e-3
    frozen = FrozenBatchNorm2d(3, eps=1e-3)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(1, 3, 4, 4, generator=gen(2))
    torch.testing.assert_close(frozen(x), bn(x))


# --- SinePositionEncoding ---

def sine_reference(mask, num_pos_feats, temperature=10000.0, scale=2 * math.pi):
    """Loop-by-loop DETR encoding of one [h, w] mask: normalized cumulative counts, sin on even, cos on odd feats."""
    h, w = mask.shape
    out = torch.zeros(2 * num_pos_feats, h, w, dtype=torch.float64)
    m = mask.double()
    for i in range(h):
        for j in range(w):
            y = m[: i + 1, j].sum() / (m[:, j].sum() + 1e-6) * scale
            x = m[i, : j + 1].sum() / (m[i, :].sum() + 1e-6) * scale
            for k in range(num_pos_feats):
                freq = temperature ** (2 * (k // 2) / num_pos_feats)
                f = torch.sin if k % 2 == 0 else torch.cos
                out[k, i, j] = f(y / freq)
                out[num_pos_feats + k, i, j] = f(x / freq)
    return out


@pytest.mark.parametrize("num_pos_feats", [6, 7])
def test_sine_matches_loop_reference(num_pos_feats):
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[0] = True
    mask[1, :3, :4] = True
    pos = SinePositionEncoding(num_pos_feats)(mask)
    assert pos.shape == (2, 2 * num_pos_feats, 5, 6) and pos.dtype == torch.float32
    for b in range(2):
        expected = sine_reference(mask[b], num_pos_feats).float()
        torch.testing.assert_close(pos[b][:, mask[b]], expected[:, mask[b]], atol=1e-5, rtol=1e-5)


def test_sine_range_and_batch_invariance():
    mask = torch.ones(3, 4, 9, dtype=torch.bool)
    pos = SinePositionEncoding(16)(mask)
    assert pos.shape == (3, 32, 4, 9)
    assert pos.abs().max() <= 1.0
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])


def test_sine_padding_keeps_real_layout():
    """A real 3x4 region padded to 6x8 encodes like an unpadded 3x4 image; its last row/column sit at `scale`."""
    enc = SinePositionEncoding(8)
    padded = torch.zeros(1, 6, 8, dtype=torch.bool)
    padded[0, :3, :4] = True
    small = enc(torch.ones(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(enc(padded)[..., :3, :4], small)
    # Features 0 and 1 are sin and cos of the normalized position itself (frequency 1): the last real row and
    # column sit at angle `scale` = 2*pi.
    angle_y = torch.tensor([1 / 3, 2 / 3, 1.0]) * 2 * math.pi
    angle_x = torch.tensor([0.25, 0.5, 0.75, 1.0]) * 2 * math.pi
    torch.testing.assert_close(small[0, 0, :, 0], angle_y.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(small[0, 1, :, 0], angle_y.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(small[0, 8, 0], angle_x.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(small[0, 9, 0], angle_x.cos(), atol=1e-5, rtol=0)


def test_sine_rejects_non_bool_mask():
    with pytest.raises(ValueError, match=r"bool \[B, h, w\]"):
        SinePositionEncoding(4)(torch.ones(1, 2, 2))


# --- VisualBackbone: shapes, masks, positions ---

@pytest.mark.parametrize("name,hidden,stride,grid", [("tiny", 64, 16, (7, 9)), ("resnet18", 32, 32, (4, 5))])
def test_forward_shapes_odd_size(name, hidden, stride, grid):
    backbone = VisualBackbone(name, hidden).eval()
    assert backbone.stride == stride
    out = backbone(torch.randn(2, 3, 97, 131, generator=gen(3)))
    assert isinstance(out, VisualTokens)
    h, w = grid
    assert out.grid == grid
    assert out.tokens.shape == (2, h * w, hidden) and out.position.shape == (2, h * w, hidden)
    assert out.padding_mask.shape == (2, h * w) and out.padding_mask.dtype == torch.bool
    assert not out.padding_mask.any()


def test_tokens_are_row_major_projected_features():
    torch.manual_seed(0)
    backbone = VisualBackbone("tiny", 16).eval()
    x = torch.randn(1, 3, 48, 80, generator=gen(4))
    out = backbone(x)
    features = backbone.proj(backbone.body(x))  # [1, 16, 3, 5]
    assert out.grid == (3, 5)
    torch.testing.assert_close(out.tokens.view(1, 3, 5, 16), features.permute(0, 2, 3, 1))
    expected_pos = SinePositionEncoding(8)(torch.ones(1, 3, 5, dtype=torch.bool))
    torch.testing.assert_close(out.position.view(1, 3, 5, 16), expected_pos.permute(0, 2, 3, 1))


def test_padding_mask_downsampling():
    backbone = VisualBackbone("tiny", 16).eval()
    x = torch.randn(2, 3, 96, 128, generator=gen(5))  # tiny grid 6x8
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[0] = True
    mask[1, :48, :64] = True  # real region covers grid rows 0-2, columns 0-3
    out = backbone(x, mask)
    expected = torch.ones(2, 6, 8, dtype=torch.bool)
    expected[0] = False
    expected[1, :3, :4] = False
    assert torch.equal(out.padding_mask.view(2, 6, 8), expected)
    # DETR's nearest rule on an odd size, and integer masks (Hugging Face style, 1 = real) read the same.
    mask = torch.zeros(1, 97, 131, dtype=torch.long)
    mask[0, :70, :50] = 1
    out = backbone(torch.randn(1, 3, 97, 131, generator=gen(6)), mask)
    nearest = torch.nn.functional.interpolate(mask[None].float(), size=out.grid)[0].bool()
    assert torch.equal(out.padding_mask, ~nearest.flatten(1))
    # Real cells' positions are those of an unpadded image of the real grid's size.
    h_real, w_real = int(nearest[0].any(1).sum()), int(nearest[0].any(0).sum())
    pos = out.position.view(1, *out.grid, 16)[:, :h_real, :w_real]
    expected_pos = SinePositionEncoding(8)(torch.ones(1, h_real, w_real, dtype=torch.bool)).permute(0, 2, 3, 1)
    torch.testing.assert_close(pos, expected_pos)


def test_no_mask_equals_all_real_mask():
    backbone = VisualBackbone("tiny", 16).eval()
    x = torch.randn(2, 3, 64, 64, generator=gen(7))
    a, b = backbone(x), backbone(x, torch.ones(2, 64, 64, dtype=torch.bool))
    for u, v in zip(a, b):
        assert u == v if isinstance(u, tuple) else torch.equal(u, v)


def test_dilation_gives_stride_16():
    backbone = VisualBackbone("resnet50", 32, dilation=True).eval()
    assert backbone.stride == 16 and backbone.num_channels == 2048
    assert backbone(torch.randn(1, 3, 64, 80, generator=gen(8))).grid == (4, 5)


def test_gradients_reach_projection_and_trainable_stages():
    backbone = VisualBackbone("tiny", 16, trainable_stages=2)
    out = backbone(torch.randn(2, 3, 64, 64, generator=gen(9)))
    out.tokens.sum().backward()
    assert backbone.proj.weight.grad is not None
    grads = [all(p.grad is not None for p in stage.parameters()) for stage in backbone.body.stages]
    assert grads == [False, False, True, True]


# --- freezing ---

@pytest.mark.parametrize("trainable", [0, 1, 2, 3, 4])
def test_resnet_trainable_stages(trainable):
    backbone = VisualBackbone("resnet18", 32, trainable_stages=trainable)
    body = backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())  # the stem is always frozen
    per_stage = [[p.requires_grad for p in getattr(body, f"layer{i}").parameters()] for i in range(1, 5)]
    for i, flags in enumerate(per_stage):
        assert flags and all(flags) == (i >= 4 - trainable) and any(flags) == (i >= 4 - trainable)
    assert all(p.requires_grad for p in backbone.proj.parameters())
    assert list(backbone.buffers()) and all(not b.requires_grad for b in backbone.buffers())


@pytest.mark.parametrize("trainable", [0, 4])
def test_tiny_trainable_stages(trainable):
    backbone = VisualBackbone("tiny", 16, trainable_stages=trainable)
    flags = [all(p.requires_grad for p in s.parameters()) for s in backbone.body.stages]
    assert flags == [i >= 4 - trainable for i in range(4)]


def test_tiny_cnn_attributes():
    net = TinyCNN(32)
    assert net.stride == 16 and net.num_channels == 32
    assert net(torch.randn(1, 3, 33, 17, generator=gen(10))).shape == (1, 32, 3, 2)


# --- weights_path ---

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so the check sees them
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    source.eval()
    state = source.state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    backbone = VisualBackbone("resnet18", 32, weights_path=path).eval()
    loaded = backbone.body.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    for k, v in loaded.items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(1, 3, 64, 64, generator=gen(11))
    with torch.no_grad():
        torch.testing.assert_close(backbone.body(x), resnet_features(source, x))


def test_weights_missing_keys_named(tmp_path):
    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
             if not k.startswith("layer4.1.")}
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: layer4\.1\.conv1\.weight"):
        VisualBackbone("resnet18", 32, weights_path=path)


def test_weights_wrong_architecture(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="missing keys: .*conv3"):
        VisualBackbone("resnet50", 32, weights_path=path)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        VisualBackbone("resnet18", 32, weights_path=tmp_path / "nope.pt")


# --- bad arguments and inputs ---

@pytest.mark.parametrize("kwargs,message", [
    (dict(name="resnet152"), "name must be one of resnet18, resnet34, resnet50, resnet101, tiny; got 'resnet152'"),
    (dict(name="tiny", hidden_size=33), "hidden_size must be even"),
    (dict(name="tiny", trainable_stages=5), "trainable_stages must be an int in 0..4, got 5"),
    (dict(name="tiny", trainable_stages=-1), "trainable_stages must be an int in 0..4, got -1"),
    (dict(name="tiny", dilation=True), "dilation applies to ResNet backbones only"),
    (dict(name="resnet18", dilation=True), "dilation needs a bottleneck ResNet"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VisualBackbone(**{"hidden_size": 16, **kwargs})


@pytest.fixture(scope="module")
def tiny_backbone():
    return VisualBackbone("tiny", 16).eval()


@pytest.mark.parametrize("pixels,mask,message", [
    ((3, 64, 64), None, "pixel_values must be [B, 3, H, W], got shape (3, 64, 64)"),
    ((2, 1, 64, 64), None, "pixel_values must be [B, 3, H, W], got shape (2, 1, 64, 64)"),
    ((2, 3, 64, 64), (2, 64, 63), "pixel_mask must be [B, H, W] = [2, 64, 64], got shape (2, 64, 63)"),
    ((2, 3, 64, 64), (64, 64), "pixel_mask must be [B, H, W] = [2, 64, 64], got shape (64, 64)"),
    ((2, 3, 64, 64), (3, 64, 64), "pixel_mask has batch size 3 but pixel_values has 2"),
    ((1, 3, 15, 64), None, "images must be at least 16x16 pixels for this backbone, got 15x64"),
    ((1, 3, 64, 8), None, "images must be at least 16x16 pixels for this backbone, got 64x8"),
])
def test_bad_inputs(tiny_backbone, pixels, mask, message):
    pixel_mask = None if mask is None else torch.ones(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_backbone(torch.zeros(pixels), pixel_mask)


def test_bad_dtypes(tiny_backbone):
    with pytest.raises(TypeError, match="pixel_values must be a floating-point tensor, got torch.uint8"):
        tiny_backbone(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="pixel_mask must be bool"):
        tiny_backbone(torch.zeros(1, 3, 32, 32), torch.ones(1, 32, 32))


def test_resnet_minimum_size_message():
    backbone = VisualBackbone("resnet18", 16).eval()
    with pytest.raises(ValueError, match="images must be at least 32x32 pixels for this backbone, got 31x40"):
        backbone(torch.zeros(1, 3, 31, 40))
