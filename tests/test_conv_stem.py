"""The convolutional stem (``patch_embed="conv"``): shapes, exact equivariance through the lifting, no folding, and
errors that name the fix."""

import pytest
import torch

from helpers import max_equivariance_error
from nnunet_equiflex.blocks import ConvStem
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import EquiFlexFormer

BOUND = 1e-4


def network(preset, **overrides):
    net = EquiFlexFormer.from_preset(preset, 1, 3, patch_embed="conv", **overrides)
    with torch.no_grad():
        if net.decoder.refinement is not None:
            torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)  # the zero init would hide it
    return net.eval()


@pytest.mark.parametrize(
    "token,size,grid",
    [
        ((4, 4), (40, 48), (10, 12)),
        ((8, 8), (32, 16), (4, 2)),
        ((2, 4, 4), (8, 16, 12), (4, 4, 3)),
        ((2, 2), (6, 6), (3, 3)),
    ],
)
def test_stem_downsamples_by_the_token_size_per_axis(token, size, grid):
    stem = ConvStem(2, 16, token)  # 8 hidden channels (16 // 2)
    strided = [m for m in stem.stages if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert len(strided) == max(token).bit_length() - 1  # one stride-2 stage per halving of the largest token side
    assert stem(torch.randn(3, 2, *size)).shape == (3, torch.Size(grid).numel(), 16)


@pytest.mark.parametrize(
    "preset,overrides,shape",
    [
        ("tiny_lift4", {}, (2, 1, 40, 48)),  # every block lifted: the stem runs on the 4 copies
        ("tiny", {}, (2, 1, 40, 48)),  # 1 lifted block, max pooling
        ("tiny", {"n_lifted_blocks": 0, "group_pooling": "mean", "n_global_blocks": 2}, (1, 1, 32, 40)),  # FlipModel0
        ("tiny", {"group": "d4"}, (1, 1, 48, 48)),
        ("tiny3d", {"patch_size": [2, 4, 4]}, (1, 1, 8, 24, 20)),  # anisotropic tokens, 8 flips
    ],
)
def test_network_with_the_stem_is_equivariant_for_every_element(preset, overrides, shape):
    net = network(preset, **overrides)
    elements = group_elements(net.encoder.group, net.spatial_dims)
    errors = max_equivariance_error(net, torch.randn(*shape), elements)
    assert max(errors.values()) < BOUND, errors


def test_the_stem_is_not_folded_like_a_linear_embedding():
    """With mean pooling and no lifted block a linear embedding folds into one pass; the stem is not linear, so the
    copies run explicitly, and that is what keeps the network equivariant (the folded form would not be)."""
    net = network("tiny", n_lifted_blocks=0, group_pooling="mean", n_global_blocks=2)
    assert not net.encoder.lifting_is_linear
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        lifted = net(x)
        identity_only = EquiFlexFormer.from_preset(
            "tiny", 1, 3, patch_embed="conv", n_lifted_blocks=0, group_pooling="mean", n_global_blocks=2, group="none"
        )
        identity_only.load_state_dict(net.state_dict())
        single = identity_only.eval()(x)
    assert (lifted - single).abs().max().item() > 1e-3  # the mean over the copies is not one pass of the stem


@pytest.mark.parametrize("patch_size", [6, [4, 6]])
def test_a_token_size_that_is_not_a_power_of_two_names_the_fix(patch_size):
    with pytest.raises(ValueError, match="powers of 2.*patch_embed='linear'"):
        EquiFlexFormer.from_preset("tiny", 1, 3, patch_embed="conv", patch_size=patch_size)
