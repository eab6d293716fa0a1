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
    "overrides,message",
    [
        (dict(group="so2"), "unknown group 'so2'"),
        (dict(group_pooling="sum"), "unknown group_pooling 'sum'"),
        (dict(n_lifted_blocks=9), r"n_lifted_blocks must lie in 0..depth \(4\)"),
        (dict(num_heads=5), "embed_dim 64 is not divisible by num_heads 5"),
    ],
)
def test_bad_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        EquiFlexFormer.from_preset("tiny", 1, 2, **overrides)


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
