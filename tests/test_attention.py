"""The local-window mask, its two backends, and their limits."""

import pytest
import torch

from helpers import tiny_network
from nnunet_equiflex.attention import (
    dense_mask,
    generate_local_window_mask,
    local_window_attention,
    resolve_backend,
)
from nnunet_equiflex.encoder import Block


def brute_force_mask(grid_h, grid_w, radius, dilation=1):
    n = 1 + grid_h * grid_w
    mask = torch.ones(n, n, dtype=torch.bool)
    for i in range(1, n):
        for j in range(1, n):
            (yi, xi), (yj, xj) = divmod(i - 1, grid_w), divmod(j - 1, grid_w)
            dy, dx = abs(yi - yj), abs(xi - xj)
            mask[i, j] = (
                dy <= radius * dilation and dx <= radius * dilation and dy % dilation == 0 and dx % dilation == 0
            )
    return mask


@pytest.mark.parametrize("grid,radius,dilation", [((5, 7), 1, 1), ((6, 4), 2, 1), ((9, 8), 1, 2)])
def test_mask_matches_definition(grid, radius, dilation):
    mask_mod = generate_local_window_mask(*grid, radius, dilation)
    assert torch.equal(dense_mask(mask_mod, 1 + grid[0] * grid[1]), brute_force_mask(*grid, radius, dilation))


def test_flex_and_sdpa_agree_on_attention():
    grid = (10, 12)
    q, k, v = (torch.randn(2, 4, 1 + grid[0] * grid[1], 16) for _ in range(3))
    with torch.no_grad():
        flex = local_window_attention(q, k, v, grid, 2, backend="flex")
        sdpa = local_window_attention(q, k, v, grid, 2, backend="sdpa")
    assert (flex - sdpa).abs().max().item() < 1e-4


def test_flex_and_sdpa_agree_on_the_network():
    net = tiny_network(attention_backend="sdpa")
    x = torch.randn(2, 2, 40, 32)
    with torch.no_grad():
        sdpa = net(x)
        net.set_attention_backend("flex")
        flex = net(x)
    assert (flex - sdpa).abs().max().item() < 1e-4


def test_auto_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, needs_grad=True) == "sdpa"
    assert resolve_backend("auto", cpu, needs_grad=False) == "flex"
    assert resolve_backend("auto", cuda, needs_grad=True) == "flex"
    assert resolve_backend("sdpa", cuda, needs_grad=False) == "sdpa"


def test_flex_with_gradients_on_cpu_is_a_clear_error():
    net = tiny_network(attention_backend="flex").train()
    with pytest.raises(RuntimeError, match="use attention_backend='sdpa' or 'auto'"):
        net(torch.randn(1, 2, 16, 16))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("natten", torch.device("cpu"), needs_grad=False)


@pytest.mark.parametrize("radius", [1, 2])
def test_local_block_gradient_is_zero_outside_the_window(radius):
    grid = (7, 9)
    block = Block(32, 4, 2.0, True, 0.0, 1e-6)
    tokens = torch.randn(1, 1 + grid[0] * grid[1], 32, requires_grad=True)
    out = block(tokens, grid=grid, window_radius=radius, backend="sdpa")
    qy, qx = 3, 4
    out[0, 1 + qy * grid[1] + qx].sum().backward()
    grad = tokens.grad[0, 1:].abs().sum(-1).reshape(grid)
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    inside = ((ys - qy).abs() <= radius) & ((xs - qx).abs() <= radius)
    assert torch.all(grad[~inside] == 0)
    assert torch.all(grad[inside] > 0)
    assert tokens.grad[0, 0].abs().sum() > 0  # CLS is visible to every token


def test_local_stage_of_the_encoder_is_local():
    """Through the encoder's local stage (one local block after the lifting)."""
    net = tiny_network(depth=2, n_lifted_blocks=1, window_radius=1)
    grid = (6, 6)
    tokens = torch.randn(1, 37, 64, requires_grad=True)
    net.encoder.forward_local(tokens, grid)[0, 1 + 0].sum().backward()  # top-left corner token
    grad = tokens.grad[0, 1:].abs().sum(-1).reshape(grid)
    assert torch.all(grad[2:, :] == 0) and torch.all(grad[:, 2:] == 0)
    assert torch.all(grad[:2, :2] > 0)
