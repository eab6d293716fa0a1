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
        ("tiny_lift4", {"stem_norm": "channel"}, (2, 1, 40, 48)),
        ("tiny3d", {"stem_norm": "channel"}, (1, 1, 8, 16, 16)),
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


def _stem_change_far_away(norm: str, token: tuple[int, ...], size: tuple[int, ...]) -> tuple[float, float]:
    """How much the stem's tokens change, far from and next to a bright block put into one corner of the image."""
    torch.manual_seed(0)
    stem = ConvStem(1, 16, token, norm=norm)
    with torch.no_grad():
        for m in stem.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.ndim == 1:  # affine norms: not the identity
                torch.nn.init.uniform_(m.weight, 0.5, 1.5)
                torch.nn.init.normal_(m.bias, std=0.5)
    x = torch.randn(1, 1, *size)
    bright = x.clone()
    bright[(..., *(slice(0, s // 4) for s in size))] += 10.0
    grid = [s // t for s, t in zip(size, token)]
    with torch.no_grad():
        change = (stem(bright) - stem(x)).abs().amax(dim=-1).reshape(grid)
    return change[(..., *(slice(g // 2, None) for g in grid))].max().item(), change.max().item()


@pytest.mark.parametrize("token,size", [((4, 4), (64, 64)), ((2, 4, 4), (16, 32, 32))])
def test_channel_norm_keeps_the_stem_local_and_instance_norm_does_not(token, size):
    """stem_norm="channel" normalises each pixel over its channels: a bright region changes only the tokens whose
    receptive field it reaches, so a structure far away keeps its features. Instance norm's statistics span the image,
    so the same bright region changes every token (the failure mode this option exists for)."""
    far, near = _stem_change_far_away("channel", token, size)
    assert near > 0.1  # the bright block itself is seen
    assert far == 0.0
    far_instance, _ = _stem_change_far_away("instance", token, size)
    assert far_instance > 0.1


def test_an_unknown_stem_norm_names_the_choices():
    with pytest.raises(ValueError, match="stem_norm 'batch'.*instance, channel"):
        EquiFlexFormer.from_preset("tiny", 1, 3, patch_embed="conv", stem_norm="batch")
    with pytest.raises(ValueError, match="unknown stem_norm"):  # checked whatever the embedding
        EquiFlexFormer.from_preset("tiny", 1, 3, stem_norm="layer")
