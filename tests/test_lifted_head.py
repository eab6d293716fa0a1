"""The lifted head: the head on every unpooled copy, with per-token pixel outputs, averaged back over the group."""

import pytest
import torch

from helpers import max_equivariance_error
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import EquiFlexFormer, preset_kwargs

BOUND = 1e-4


def lifted_head_network(**overrides):
    net = EquiFlexFormer.from_preset("tiny_lifthead", in_channels=1, num_classes=3, **overrides)
    with torch.no_grad():  # both start at zero, which would hide them
        torch.nn.init.normal_(net.decoder.pixel_head.weight, std=0.2)
        if net.decoder.refinement is not None:
            torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)
    return net.eval()


@pytest.mark.parametrize(
    "overrides,count",
    [({}, 4), ({"group": "d4"}, 8), ({"refine_mode": "lifted"}, 4), ({"refine": False}, 4)],
)
def test_lifted_head_is_equivariant_for_every_element(overrides, count):
    net = lifted_head_network(**overrides)
    x = torch.randn(2, 1, 48, 48) if "group" in overrides else torch.randn(2, 1, 48, 40)
    errors = max_equivariance_error(net, x, group_elements(net.encoder.group))
    assert len(errors) == count
    assert max(errors.values()) < BOUND, errors


def test_lifted_head_is_equivariant_in_3d_with_anisotropic_tokens():
    kwargs = preset_kwargs("tiny3d", n_lifted_blocks=3, lifted_head=True, patch_size=[2, 4, 4])
    net = EquiFlexFormer(1, 3, **kwargs)
    torch.nn.init.normal_(net.decoder.pixel_head.weight, std=0.2)
    errors = max_equivariance_error(net.eval(), torch.randn(1, 1, 8, 16, 20), group_elements("flips", 3))
    assert len(errors) == 8 and max(errors.values()) < BOUND, errors


def test_the_pixel_head_without_the_averaging_is_not_equivariant():
    """The bound can fail: one copy's oriented pixel outputs, not averaged over the group, break it."""
    net = lifted_head_network()
    elements = net.encoder.elements
    net.encoder.elements = elements[:1]  # the identity copy only: lifting and averaging removed
    errors = max_equivariance_error(net, torch.randn(2, 1, 48, 40), elements)
    assert min(v for k, v in errors.items() if k != "identity") > 100 * BOUND, errors


def test_each_tokens_pixel_outputs_land_on_its_own_pixels():
    """Unpatchify: output (c, i, j) of token (r, s) is pixel (r * p + i, s * p + j) of channel c."""
    net = EquiFlexFormer.from_preset("tiny_lifthead", in_channels=1, num_classes=3, group="none", refine=False)
    decoder, p, grid = net.decoder, 4, (2, 3)
    values = torch.arange(6 * 3 * p * p, dtype=torch.float32).reshape(1, 6, 3 * p * p)
    maps = decoder._unpatchify(values, grid)
    assert maps.shape == (1, 3, 8, 12)
    for r, s, c, i, j in [(0, 0, 0, 0, 0), (1, 2, 2, 3, 1), (0, 1, 1, 2, 3), (1, 0, 0, 1, 2)]:
        assert maps[0, c, r * p + i, s * p + j] == values[0, r * 3 + s, c * p * p + i * p + j]


def test_lifted_head_starts_as_the_pooled_upsampled_head_of_its_copies():
    """Zero-initialised pixel head: the output is the mean over the copies of the plain head's upsampled maps."""
    torch.manual_seed(0)
    net = EquiFlexFormer.from_preset("tiny_lifthead", in_channels=1, num_classes=3, refine=False).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        copies, grid = net.encoder.forward_copies(x)
        maps = net.decoder._upsample(net.decoder.head(copies[:, 1:]), grid)
        expected = torch.stack([g.inverse().apply(m) for g, m in zip(net.encoder.elements, maps.chunk(4))]).mean(0)
        assert torch.allclose(net(x), expected, atol=1e-6)


@pytest.mark.parametrize("n_lifted", [0, 1, 3])
def test_lifted_head_needs_every_block_lifted(n_lifted):
    with pytest.raises(ValueError, match="every block must be lifted.*set n_lifted_blocks=4 or lifted_head=false"):
        EquiFlexFormer.from_preset("tiny", 1, 3, n_lifted_blocks=n_lifted, lifted_head=True)
    with pytest.raises(TypeError, match="lifted_head must be true or false"):
        EquiFlexFormer.from_preset("tiny_lift4", 1, 3, lifted_head="yes")
