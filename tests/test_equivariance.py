"""f(g x) = g f(x) for every group element, to float rounding; and the plain ViT is not."""

import pytest
import torch

from helpers import max_equivariance_error, tiny_network
from nnunet_equiflex.groups import group_elements

BOUND = 1e-4
SHAPES = [(32, 32), (32, 24), (16, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("refine", [False, "symmetric", "lifted"])
@pytest.mark.parametrize("n_lifted", [0, 2])
def test_d2_equivariant(shape, pooling, refine, n_lifted):
    mode = {"refine": bool(refine), "refine_mode": refine or "symmetric"}
    net = tiny_network(group="d2", group_pooling=pooling, n_lifted_blocks=n_lifted, attention_backend="sdpa", **mode)
    x = torch.randn(2, 2, *shape)
    errors = max_equivariance_error(net, x, group_elements("d2"))
    assert len(errors) == 4
    assert max(errors.values()) < BOUND, errors


@pytest.mark.parametrize("n_lifted", [0, 2])
def test_plain_vit_is_not_equivariant(n_lifted):
    """The same architecture without the lifting breaks the property: the bound can fail."""
    net = tiny_network(group="none", refine=True, n_lifted_blocks=n_lifted, attention_backend="sdpa")
    x = torch.randn(2, 2, 32, 24)
    errors = max_equivariance_error(net, x, group_elements("d2"))
    assert errors["identity"] < BOUND
    assert min(v for k, v in errors.items() if k != "identity") > 100 * BOUND, errors


@pytest.mark.parametrize("pooling", ["max", "mean"])
@pytest.mark.parametrize("refine_mode", ["symmetric", "lifted"])
def test_d4_equivariant_on_squares(pooling, refine_mode):
    net = tiny_network(
        group="d4", group_pooling=pooling, refine=True, refine_mode=refine_mode, n_lifted_blocks=2,
        attention_backend="sdpa",
    )  # fmt: skip
    x = torch.randn(2, 2, 32, 32)
    errors = max_equivariance_error(net, x, group_elements("d4"))
    assert len(errors) == 8
    assert max(errors.values()) < BOUND, errors


def test_lifted_refinement_is_equivariant_only_through_its_lifting():
    """Its plain kernels are oriented: run once instead of once per group element, the bound fails, and the
    difference is the refinement's alone (the encoder and the head stay exact)."""
    net = tiny_network(group="d2", refine=True, refine_mode="lifted", attention_backend="sdpa")
    x = torch.randn(2, 2, 32, 24)
    net.decoder.refinement.lifted_over = group_elements("none")
    errors = max_equivariance_error(net, x, group_elements("d2"))
    assert min(v for k, v in errors.items() if k != "identity") > 100 * BOUND, errors
    net.decoder.refinement = None
    assert max(max_equivariance_error(net, x, group_elements("d2")).values()) < BOUND


def test_d2_network_is_not_rotation_equivariant():
    """D2 does not contain the 90-degree rotations; the d4 test above is not vacuous."""
    net = tiny_network(group="d2", refine=True, n_lifted_blocks=2, attention_backend="sdpa")
    x = torch.randn(2, 2, 32, 32)
    errors = max_equivariance_error(net, x, group_elements("d4"))
    assert max(errors.values()) > 100 * BOUND


@pytest.mark.parametrize("dilation", [2, 3])
def test_dilated_windows_stay_equivariant(dilation):
    net = tiny_network(group="d2", window_dilation=dilation, refine=True, attention_backend="sdpa")
    x = torch.randn(1, 2, 48, 40)
    errors = max_equivariance_error(net, x, group_elements("d2"))
    assert max(errors.values()) < BOUND, errors


def test_group_inverse_and_token_action_match_image_action():
    x = torch.randn(1, 3, 5, 5)
    for g in group_elements("d4"):
        assert torch.equal(g.inverse().apply(g.apply(x)), x)
        tokens = x.permute(0, 2, 3, 1).flatten(1, 2)  # (B, h*w, C) row-major
        moved = g.apply_to_tokens(tokens, (5, 5)).reshape(1, 5, 5, 3).permute(0, 3, 1, 2)
        assert torch.equal(moved, g.apply(x))
