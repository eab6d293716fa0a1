"""The relative position bias of the local blocks: every backend against a plain definition, and the network's
equivariance with it (free tables in lifted blocks, symmetrised tables after the pooling)."""

import itertools
import math
import warnings

import pytest
import torch

from helpers import max_equivariance_error
from nnunet_equiflex import attention
from nnunet_equiflex.attention import local_window_attention
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import EquiFlexFormer
from nnunet_equiflex.optim import vit_param_groups

BOUND = 1e-4  # the equivariance bound of the other equivariance tests


def reference_attention(q, k, v, grid, radius, dilation, prefix, bias):
    """Dense attention written from the definition: grid query y sees key y + dilation * s for s in [-r, r]^n (row-major
    slots, bias[h, slot] added) and the prefix tokens; prefix queries see everything, with no bias."""
    coords = list(itertools.product(*(range(size) for size in grid)))
    slots = {s: i for i, s in enumerate(itertools.product(range(-radius, radius + 1), repeat=len(grid)))}
    seq = prefix + len(coords)
    scores_bias = torch.zeros(q.shape[1], seq, seq)
    for qi, yq in enumerate(coords):
        for ki, yk in enumerate(coords):
            delta = tuple(b - a for a, b in zip(yq, yk))
            step = tuple(d // dilation for d in delta)
            if all(d % dilation == 0 for d in delta) and step in slots:
                scores_bias[:, prefix + qi, prefix + ki] = bias[:, slots[step]]
            else:
                scores_bias[:, prefix + qi, prefix + ki] = float("-inf")
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + scores_bias
    return scores.softmax(dim=-1) @ v


def in_layout(t, grid, tile, prefix):
    """A row-major sequence in the tiled layout's order (dimension 2), or unchanged without a tile."""
    return t if tile is None else t[:, :, attention.tiled_token_order(grid, tile, prefix)]


CASES = [
    # grid, radius, dilation, prefix tokens, tile layout (None: row-major)
    ((7, 9), 2, 1, 1, None),  # odd grid: every border and corner window is cut
    ((5, 11), 1, 2, 3, None),  # dilation, CLS + 2 registers
    ((9, 10), 2, 1, 2, 4),  # tiled layout with partial edge tiles, a register
    ((3, 5, 4), 1, 1, 1, None),  # 3D
    ((4, 5, 6), 1, 1, 1, 2),  # 3D, tiled
]


@pytest.mark.parametrize("grid,radius,dilation,prefix,tile", CASES)
def test_window_and_sdpa_equal_the_definition_in_outputs_and_gradients(grid, radius, dilation, prefix, tile):
    seq, slots = prefix + math.prod(grid), (2 * radius + 1) ** len(grid)
    inputs = [torch.randn(2, 3, seq, 8).requires_grad_() for _ in range(3)]
    bias = torch.randn(3, slots).requires_grad_()
    upstream = torch.randn(2, 3, seq, 8)
    leaves = [*inputs, bias]
    expected_out = reference_attention(*inputs, grid, radius, dilation, prefix, bias)
    expected = (expected_out, *torch.autograd.grad(expected_out, leaves, upstream))
    for backend in ("sdpa", "window"):
        laid_out = [in_layout(t, grid, tile, prefix) for t in inputs]
        out = local_window_attention(*laid_out, grid, radius, dilation, prefix, backend=backend, tile=tile, bias=bias)
        got = (out, *torch.autograd.grad(out, leaves, in_layout(upstream, grid, tile, prefix)))
        for name, a, b in zip(("output", "dq", "dk", "dv", "dbias"), expected, got):
            a = in_layout(a, grid, tile, prefix) if name == "output" else a  # gradients: of the row-major leaves
            assert (a - b).abs().max().item() < 1e-5, (backend, name)


@pytest.mark.parametrize("grid,radius,dilation,prefix,tile", [CASES[0], CASES[2], CASES[4]])
def test_flex_score_mod_equals_the_definition(grid, radius, dilation, prefix, tile, monkeypatch):
    """Flex with the bias as a score_mod (uncompiled here: compiling takes about 30 s per shape on 2 CPU cores, and
    the compiled kernel evaluates the same score_mod), and its sdpa fallback."""
    from torch.nn.attention.flex_attention import flex_attention

    def uncompiled(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "_compiled_flex_attention", lambda: uncompiled)
    seq, slots = prefix + math.prod(grid), (2 * radius + 1) ** len(grid)
    q, k, v = (torch.randn(1, 2, seq, 8) for _ in range(3))
    bias = torch.randn(2, slots)
    expected = in_layout(reference_attention(q, k, v, grid, radius, dilation, prefix, bias), grid, tile, prefix)
    laid_out = [in_layout(t, grid, tile, prefix) for t in (q, k, v)]
    mask = attention.local_attention_mask(grid, radius, dilation, prefix, "flex", tile, torch.device("cpu"))
    with torch.no_grad():
        flex = attention._flex_call(*laid_out, mask, bias)
        fallback = attention._sdpa_under_block_mask(*laid_out, mask, bias)
    assert (flex - expected).abs().max().item() < 1e-5
    assert (fallback - expected).abs().max().item() < 1e-5


def network(preset="tiny_lift4_rpb", random_bias=True, **overrides):
    net = EquiFlexFormer.from_preset(preset, 1, 3, relative_position_bias=True, **overrides)
    with torch.no_grad():
        torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)  # the zero init would hide it
        for name, param in net.named_parameters():
            if random_bias and name.endswith("rel_pos_bias"):
                param.normal_(0.0, 1.0)
    return net.eval()


@pytest.mark.parametrize(
    "preset,overrides,shape",
    [
        ("tiny_lift4_rpb", {}, (2, 1, 40, 48)),  # every local block lifted: free tables
        ("tiny", {}, (2, 1, 40, 48)),  # local blocks after the pooling: symmetrised tables
        ("tiny", {"group": "d4"}, (1, 1, 48, 48)),  # symmetrised over flips and transposes
        ("tiny", {"window_dilation": 2, "alternate_dilation": True}, (1, 1, 48, 40)),
        ("tiny3d", {}, (1, 1, 16, 24, 20)),  # 8 flips of a volume
    ],
)
@pytest.mark.parametrize("backend", ["window", "sdpa"])
def test_network_with_the_bias_is_equivariant_for_every_element(preset, overrides, shape, backend):
    net = network(preset, attention_backend=backend, **overrides)
    assert any(name.endswith("rel_pos_bias") for name, _ in net.named_parameters())
    elements = group_elements(net.encoder.group, net.spatial_dims)
    errors = max_equivariance_error(net, torch.randn(*shape), elements)
    assert max(errors.values()) < BOUND, errors


def test_an_unsymmetrised_table_after_the_pooling_breaks_equivariance():
    """The check above can fail: the same network with its post-pooling tables left free is not equivariant."""
    net = network("tiny")
    for block in net.encoder.blocks:
        block.attn.rel_pos_symmetric_over = None
    errors = max_equivariance_error(net, torch.randn(1, 1, 40, 48), group_elements("d2", 2))
    assert max(errors.values()) > 100 * BOUND, errors


def test_the_bias_starts_at_zero_and_changes_nothing_until_trained():
    with_bias = EquiFlexFormer.from_preset("tiny_lift4_rpb", 1, 3).eval()
    without = EquiFlexFormer.from_preset("tiny_lift4", 1, 3).eval()
    missing, unexpected = without.load_state_dict(with_bias.state_dict(), strict=False)
    assert not missing and unexpected == [f"encoder.blocks.{i}.attn.rel_pos_bias" for i in (1, 2, 3)]  # block 0 global
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(with_bias(x), without(x))


def test_the_bias_has_no_weight_decay():
    net = EquiFlexFormer.from_preset("tiny_lift4_rpb", 1, 3)
    tables = {id(p) for name, p in net.named_parameters() if name.endswith("rel_pos_bias")}
    groups = vit_param_groups(net, weight_decay=0.05)
    decayed = {id(p) for group in groups if group["weight_decay"] > 0 for p in group["params"]}
    assert tables and not tables & decayed
