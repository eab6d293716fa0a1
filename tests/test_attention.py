"""The local-window mask, its two backends, and their limits."""

import pytest
import torch

from helpers import tiny_network
from nnunet_equiflex.attention import (
    dense_mask,
    generate_local_window_mask,
    generate_tiled_local_window_mask,
    local_attention_mask,
    local_window_attention,
    resolve_backend,
    tiled_token_order,
)
from nnunet_equiflex.blocks import Block


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
    assert resolve_backend("auto", cpu, needs_grad=True) == "window"
    assert resolve_backend("auto", cpu, needs_grad=False) == "window"
    assert resolve_backend("auto", cuda, needs_grad=True) == "flex"
    assert resolve_backend("sdpa", cuda, needs_grad=False) == "sdpa"


def test_flex_with_gradients_on_cpu_is_a_clear_error():
    net = tiny_network(attention_backend="flex").train()
    with pytest.raises(RuntimeError, match="use attention_backend='window', 'sdpa' or 'auto'"):
        net(torch.randn(1, 2, 16, 16))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("natten", torch.device("cpu"), needs_grad=False)


@pytest.mark.parametrize("radius", [1, 2])
def test_local_block_gradient_is_zero_outside_the_window(radius):
    grid = (7, 9)
    block = Block(32, 4, 2.0, True, 0.0, 1e-6)
    tokens = torch.randn(1, 1 + grid[0] * grid[1], 32, requires_grad=True)
    out = block(tokens, local_attention_mask(grid, radius, 1, 1, "sdpa", None, tokens.device))
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
    net.encoder.forward_after_pooling(tokens, grid)[0, 1 + 0].sum().backward()  # top-left corner token
    grad = tokens.grad[0, 1:].abs().sum(-1).reshape(grid)
    assert torch.all(grad[2:, :] == 0) and torch.all(grad[:, 2:] == 0)
    assert torch.all(grad[:2, :2] > 0)


@pytest.mark.parametrize("grid,tile,prefix", [((8, 12), 4, 1), ((9, 10), 4, 1), ((7, 7), 3, 2)])
def test_tiled_order_is_a_permutation_with_prefix_last(grid, tile, prefix):
    order = tiled_token_order(grid, tile, prefix)
    n = prefix + grid[0] * grid[1]
    assert torch.equal(order.sort().values, torch.arange(n))
    assert order[-prefix:].tolist() == list(range(prefix))
    if grid[0] % tile == 0 and grid[1] % tile == 0:  # each run of tile*tile tokens is one square tile
        cells = order[: grid[0] * grid[1]] - prefix
        for block in cells.split(tile * tile):
            ys, xs = block // grid[1], block % grid[1]
            assert ys.max() - ys.min() == tile - 1 and xs.max() - xs.min() == tile - 1


@pytest.mark.parametrize("grid,radius,dilation,tile,prefix", [((8, 12), 2, 1, 4, 1), ((9, 10), 1, 2, 4, 3)])
def test_tiled_mask_is_the_row_major_mask_permuted(grid, radius, dilation, tile, prefix):
    n = prefix + grid[0] * grid[1]
    row = dense_mask(generate_local_window_mask(*grid, radius, dilation, prefix), n)
    tiled = dense_mask(generate_tiled_local_window_mask(grid, radius, dilation, prefix, tile=tile), n)
    order = tiled_token_order(grid, tile, prefix)
    assert torch.equal(tiled, row[order][:, order])


def test_tiles_put_a_window_in_fewer_blocks():
    from torch.nn.attention.flex_attention import create_block_mask

    grid, n = (32, 32), 1 + 32 * 32
    row = create_block_mask(generate_local_window_mask(*grid, 2), None, None, n, n, device="cpu", BLOCK_SIZE=16)
    tiled_mod = generate_tiled_local_window_mask(grid, 2, tile=4)
    tiled = create_block_mask(tiled_mod, None, None, n, n, device="cpu", BLOCK_SIZE=16)
    assert tiled.sparsity() > row.sparsity() + 1.0  # percent of blocks skipped


@pytest.mark.parametrize("shape", [(2, 2, 32, 40), (1, 2, 36, 28)])
def test_network_output_is_the_same_in_every_token_layout_and_backend(shape):
    net = tiny_network(num_register_tokens=1, window_dilation=2, alternate_dilation=True)
    x = torch.randn(*shape)
    with torch.no_grad():
        net.set_attention_backend("sdpa")
        reference = net(x)
        net.set_attention_backend("flex")
        for layout in ("row", "tile4", "tile3"):
            net.set_flex_token_layout(layout)
            assert (net(x) - reference).abs().max().item() < 1e-4, layout
        net.set_attention_backend("window")
        assert (net(x) - reference).abs().max().item() < 1e-4, "window"


def test_auto_token_layout_choice():
    net = tiny_network()
    assert net.encoder.local_token_layout(torch.device("cpu"), needs_grad=False) == ("window", None)
    assert net.encoder.local_token_layout(torch.device("cpu"), needs_grad=True) == ("window", None)
    assert net.encoder.local_token_layout(torch.device("cuda"), needs_grad=True) == ("flex", None)
    net.set_attention_backend("flex")
    assert net.encoder.local_token_layout(torch.device("cpu"), needs_grad=False) == ("flex", 4)
    net.set_flex_token_layout("row")
    assert net.encoder.local_token_layout(torch.device("cpu"), needs_grad=False) == ("flex", None)


def test_unknown_token_layout_is_rejected():
    with pytest.raises(ValueError, match="choose 'auto', 'row' or 'tileN'"):
        tiny_network(flex_token_layout="hilbert")
    with pytest.raises(ValueError, match="choose 'auto', 'row' or 'tileN'"):
        tiny_network().set_flex_token_layout("tile0")


WINDOW_CASES = [
    # grid, radius, dilation, prefix tokens, tile layout (None: row-major)
    ((7, 9), 2, 1, 1, None),  # odd grid: every border and corner window is cut
    ((5, 11), 1, 2, 3, None),  # dilation, CLS + 2 registers
    ((9, 10), 2, 1, 2, 4),  # tiled layout with partial edge tiles, a register
    ((6, 6), 3, 1, 1, 3),  # window wider than half the grid
    ((13, 7), 2, 3, 1, 4),  # dilation reaching past the grid, tiled
]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("grid,radius,dilation,prefix,tile", WINDOW_CASES)
def test_window_backend_equals_sdpa_in_outputs_and_gradients(grid, radius, dilation, prefix, tile, compiled, request):
    if compiled:
        request.getfixturevalue("compiled_window")
    seq = prefix + grid[0] * grid[1]
    inputs = [torch.randn(2, 3, seq, 16, dtype=torch.float64).float().requires_grad_() for _ in range(3)]
    upstream = torch.randn(2, 3, seq, 16)
    results = {}
    for backend in ("sdpa", "window"):
        out = local_window_attention(*inputs, grid, radius, dilation, prefix, backend=backend, tile=tile)
        grads = torch.autograd.grad(out, inputs, upstream)
        results[backend] = (out, *grads)
    for name, a, b in zip(("output", "dq", "dk", "dv"), results["sdpa"], results["window"]):
        assert (a - b).abs().max().item() < 1e-5, name
    if compiled:
        from nnunet_equiflex.attention import _window_attention

        assert _window_attention.compiled is not None and not _window_attention.failed


def test_window_backend_computes_only_the_window():
    """The work per query is the window plus the prefix, not the sequence: no (S x S) tensor."""
    from nnunet_equiflex.attention import window_attention, window_key_bias

    grid, seq = (20, 20), 1 + 400
    q, k, v = (torch.randn(1, 2, seq, 8) for _ in range(3))
    shapes = []

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                shapes.append(tuple(out.shape))
            return out

    with Recorder():
        window_attention(q, k, v, window_key_bias(*grid, 2, 1), None, *grid, 2, 1, 1)
    largest = max(torch.Size(s).numel() for s in shapes)
    assert largest < seq * seq  # the biggest tensor is linear in the tokens
    assert (1, 2, seq, seq) not in shapes


def test_window_backend_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    from nnunet_equiflex import attention

    fallback = attention._CompiledOrEager(attention.window_attention)

    def broken_compile(fn, **kwargs):
        def raises(*args):
            raise RuntimeError("no C++ compiler")

        return raises

    monkeypatch.setenv("EQUIFLEX_WINDOW_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(attention, "_window_attention", fallback)
    grid, seq = (6, 5), 31
    q, k, v = (torch.randn(1, 2, seq, 8) for _ in range(3))
    with caplog.at_level("WARNING", logger="nnunet_equiflex.attention"):
        out = local_window_attention(q, k, v, grid, 1, backend="window")
        again = local_window_attention(q, k, v, grid, 1, backend="window")
    reference = local_window_attention(q, k, v, grid, 1, backend="sdpa")
    assert (out - reference).abs().max().item() < 1e-5 and torch.equal(out, again)
    assert fallback.failed
    assert sum("no C++ compiler" in r.getMessage() for r in caplog.records) == 1  # one line, not one per call


@pytest.fixture
def failing_flex(monkeypatch):
    """FlexAttention that raises as a Triton or driver error would; a fresh fallback state, restored afterwards."""
    from nnunet_equiflex import attention

    calls = []

    def broken_flex():
        def raises(*args, **kwargs):
            calls.append(1)
            raise RuntimeError("triton: unsupported shape\nlong compiler traceback ...")

        return raises

    monkeypatch.setattr(attention, "_compiled_flex_attention", broken_flex)
    monkeypatch.setattr(attention._flex_attention, "failed", {})
    return calls


@pytest.mark.parametrize("layout", ["row", "tile4"])
def test_flex_failure_falls_back_to_sdpa_once_with_one_log_line(failing_flex, caplog, layout):
    net = tiny_network(attention_backend="sdpa", flex_token_layout=layout)
    x = torch.randn(2, 2, 32, 24)
    with torch.no_grad():
        reference = net(x)
        net.set_attention_backend("flex")
        with caplog.at_level("WARNING", logger="nnunet_equiflex.attention"):
            first = net(x)
            second = net(torch.randn(1, 2, 16, 16))
            third = net(x)
    assert (first - reference).abs().max().item() < 1e-5 and (third - reference).abs().max().item() < 1e-5
    assert second.shape == (1, 3, 16, 16)
    assert len(failing_flex) == 1  # tried once, not once per block or per call
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "FlexAttention failed on cpu (RuntimeError: triton: unsupported shape)" in warnings[0]
    assert "using the sdpa backend" in warnings[0] and "\n" not in warnings[0]
    assert resolve_backend("flex", torch.device("cpu"), needs_grad=False) == "sdpa"
    assert resolve_backend("flex", torch.device("cuda"), needs_grad=True) == "flex"  # per device type


def test_flex_failure_inside_a_compiled_network_falls_back(failing_flex, caplog):
    """nnU-Net compiles the whole network on CUDA: the flex call stays outside that graph, so its failure is caught."""
    net = tiny_network(attention_backend="sdpa")
    x = torch.randn(1, 2, 32, 24)
    with torch.no_grad():
        reference = net(x)
        net.set_attention_backend("flex")
        compiled = torch.compile(net, backend="eager", dynamic=False)
        with caplog.at_level("WARNING", logger="nnunet_equiflex.attention"):
            first = compiled(x)
            second = compiled(x)
    assert (first - reference).abs().max().item() < 1e-5 and (second - reference).abs().max().item() < 1e-5
    assert len(failing_flex) == 1
    assert sum("FlexAttention failed" in r.getMessage() for r in caplog.records) == 1


def test_working_flex_is_not_replaced(monkeypatch):
    from nnunet_equiflex import attention

    monkeypatch.setattr(attention._flex_attention, "failed", {})
    net = tiny_network(attention_backend="flex")
    with torch.no_grad():
        net(torch.randn(1, 2, 16, 16))
    assert attention._flex_attention.failed == {}
    assert resolve_backend("flex", torch.device("cpu"), needs_grad=False) == "flex"
