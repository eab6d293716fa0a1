"""Bad inputs and settings fail with messages that name the problem and the fix."""

import pytest
import torch

from helpers import tiny_network
from nnunet_equiflex.network import EquiFlexFormer, preset_kwargs


def test_size_not_divisible_by_token_size():
    net = tiny_network()
    with pytest.raises(ValueError, match=r"input size \(30, 32\) is not divisible by the token size 4.*multiple of 4"):
        net(torch.randn(1, 2, 30, 32))


def test_d4_rejects_rectangles():
    net = tiny_network(group="d4")
    with pytest.raises(ValueError, match="needs a square input, got 32x24; use group='d2'"):
        net(torch.randn(1, 2, 32, 24))


def test_wrong_rank_input():
    with pytest.raises(ValueError, match=r"expected a 2D batch \(B, C, H, W\)"):
        tiny_network()(torch.randn(1, 2, 8, 32, 32))


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.randn(1, 3, 32, 32), r"input has 3 channel\(s\) .*built for in_channels=2; pass images with 2"),
        (torch.randn(1, 1, 32, 32), r"input has 1 channel\(s\) .*or build the network with in_channels=1"),
        (torch.randn(0, 2, 32, 32), r"input of shape \(0, 2, 32, 32\) is empty; pass at least one image"),
        (torch.randn(1, 2, 0, 32), r"input of shape \(1, 2, 0, 32\) is empty.*multiples of the token size 4"),
        (torch.randn(1, 2, 32, 0), r"input of shape \(1, 2, 32, 0\) is empty"),
    ],
    ids=["too-many-channels", "too-few-channels", "empty-batch", "zero-height", "zero-width"],
)
def test_bad_input_shape_names_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_network()(bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64, torch.bool])
def test_integer_input_names_the_fix(dtype):
    with pytest.raises(TypeError, match=rf"input dtype {dtype} is not floating point; convert the images first"):
        tiny_network()(torch.zeros(1, 2, 32, 32, dtype=dtype))


def test_half_precision_input_is_accepted():
    out = tiny_network(attention_backend="sdpa").to(torch.bfloat16)(torch.randn(1, 2, 16, 16, dtype=torch.bfloat16))
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(group="so2"), "unknown group 'so2'"),
        (dict(group_pooling="sum"), "unknown group_pooling 'sum'"),
        (dict(n_lifted_blocks=9), r"n_lifted_blocks must lie in 0..depth \(4\)"),
        (dict(num_heads=5), "embed_dim 64 is not divisible by num_heads 5; pick num_heads that divides embed_dim"),
        (dict(window_radius=-1), r"window_radius must be an integer >= 0 \(the local window is \(2r\+1\)"),
        (dict(window_radius=1.5), "window_radius must be an integer >= 0"),
        (dict(window_dilation=0), "window_dilation must be an integer >= 1, got 0"),
        (dict(attention_backend="triton"), "unknown attention backend 'triton'; choose one of auto, flex, sdpa"),
        (dict(patch_size=0), "patch_size must be an integer >= 1, got 0"),
        (dict(patch_size=-4), "patch_size must be an integer >= 1, got -4"),
        (dict(embed_dim=0), "embed_dim must be an integer >= 1, got 0"),
        (dict(num_heads=0), "num_heads must be an integer >= 1, got 0"),
        (dict(mlp_ratio=0.0), r"mlp_ratio must be > 0 \(the MLP width is mlp_ratio \* embed_dim\), got 0.0"),
        (dict(mlp_ratio=-2.0), "mlp_ratio must be > 0"),
        (dict(refine_dim=0), "refine_dim must be an integer >= 1, got 0"),
        (dict(refine_mode="oriented"), "unknown refine_mode 'oriented'; choose one of symmetric, lifted"),
        (dict(pos_embed_grid=(0, 8)), r"pos_embed_grid must be two integers >= 1 .*got \[0, 8\]"),
        (dict(pos_embed_grid=(8,)), r"pos_embed_grid must be two integers >= 1 .*got \[8\]"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must lie in \[0, 1\) \(1 drops every residual branch"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must lie in \[0, 1\).*recipes use 0.1 to 0.2"),
        (dict(patch_embed="gmr", gmr_rings=0), "gmr_rings must be an integer >= 1 or None"),
        (dict(patch_embed="gmr", gmr_rings=-2), "gmr_rings must be an integer >= 1 or None"),
    ],
)
def test_bad_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        EquiFlexFormer.from_preset("tiny", 1, 2, **overrides)


@pytest.mark.parametrize("in_channels,num_classes,name", [(0, 2, "in_channels"), (1, 0, "num_classes")])
def test_bad_channels_or_classes_fail_at_construction(in_channels, num_classes, name):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0"):
        EquiFlexFormer.from_preset("tiny", in_channels, num_classes)


def test_set_attention_backend_rejects_unknown_names_and_keeps_the_old_one():
    net = tiny_network(attention_backend="sdpa")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'; choose one of auto, flex, sdpa, window"):
        net.set_attention_backend("cuda")
    assert net.encoder.attention_backend == "sdpa"


def test_drop_path_just_below_one_trains_without_nan():
    net = tiny_network(drop_path_rate=0.99, attention_backend="sdpa").train()
    loss = net(torch.randn(4, 2, 16, 16)).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_unknown_preset():
    names = "vit_s8, vit_s8_flip0, vit_s8_flip2, vit_s8_flip4, vit_ti8, tiny"
    with pytest.raises(ValueError, match=f"unknown preset 'vit_h14'; choose one of {names}"):
        preset_kwargs("vit_h14")


def test_vit_s8_preset_shape():
    net = EquiFlexFormer.from_preset("vit_s8", in_channels=1, num_classes=4)
    assert len(net.encoder.blocks) == 12
    assert net.encoder.pos_embed.shape == (1, 785, 384)
    assert net.encoder.blocks[0].attn.qkv.bias is not None
    assert net.encoder.norm.eps == 1e-6
    params = sum(p.numel() for p in net.encoder.parameters())
    assert 21_000_000 < params < 22_000_000  # ViT-S/8 encoder size (1-channel patch embedding)
