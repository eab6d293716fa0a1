"""EquiFlexFormer on volumes (B, C, D, H, W): the 2D code path with three axes.

Exact equivariance to the 8 flips of a volume for every 3D configuration, the window backend
against dense-masked SDPA, folded against explicit lifting, analytic FLOPs against
FlopCounterMode, and the settings that only exist in 2D failing at construction."""

import json
import math
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import max_equivariance_error
from nnunet_equiflex.attention import (
    dense_mask,
    generate_grid_window_mask,
    generate_tiled_local_window_mask,
    local_attention_mask,
    local_window_attention,
    parse_token_layout,
    tiled_token_order,
)
from nnunet_equiflex.flops import network_forward_flops, window_pairs
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import PRESETS, PRESETS_3D, EquiFlexFormer

BOUND = 1e-4
FLIPS_3D = group_elements("flips", 3)


def tiny3d(in_channels: int = 2, num_classes: int = 3, **overrides) -> EquiFlexFormer:
    """The tiny3d preset with every parameter random (the refinement's zero init would hide it)."""
    net = EquiFlexFormer.from_preset("tiny3d", in_channels, num_classes, **overrides)
    with torch.no_grad():
        if net.decoder.refinement is not None:
            torch.nn.init.normal_(net.decoder.refinement.conv2.weight, std=0.2)
    return net.eval()


CONFIGS = {
    "lifted-max": dict(),
    "lifted-mean": dict(group_pooling="mean"),
    "folded": dict(n_lifted_blocks=0, group_pooling="mean", n_global_blocks=1),
    "unfolded-max-no-lift": dict(n_lifted_blocks=0, group_pooling="max"),
    "global-and-local": dict(n_lifted_blocks=1, n_global_blocks=2, window_radius=2),
    "dilated-registers": dict(window_dilation=2, num_register_tokens=2, n_global_blocks=0),
    "anisotropic-tokens": dict(patch_size=[2, 4, 4], pos_embed_grid=[4, 4, 4]),
    "no-refinement": dict(refine=False, depth=2),
    "lifted-refinement": dict(refine_mode="lifted", depth=2),
}
SHAPES = {"even": (16, 32, 32), "odd": (12, 20, 28)}  # token grids 4x8x8 and 3x5x7 at token size 4


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_exactly_equivariant_to_the_8_flips(overrides, shape):
    net = tiny3d(attention_backend="sdpa", **overrides)
    errors = max_equivariance_error(net, torch.randn(2, 2, *shape), FLIPS_3D)
    assert len(errors) == 8
    assert max(errors.values()) < BOUND, errors


def test_window_backend_network_is_equivariant():
    """The CPU default backend (window), on an odd grid with the dilated, registered configuration."""
    net = tiny3d(attention_backend="window", **CONFIGS["dilated-registers"])
    errors = max_equivariance_error(net, torch.randn(1, 2, *SHAPES["odd"]), FLIPS_3D)
    assert max(errors.values()) < BOUND, errors


@pytest.mark.parametrize("n_lifted", [0, 1])
def test_without_the_group_the_same_test_fails(n_lifted):
    net = tiny3d(group="none", n_lifted_blocks=n_lifted, attention_backend="sdpa")
    errors = max_equivariance_error(net, torch.randn(2, 2, *SHAPES["odd"]), FLIPS_3D)
    assert errors["identity"] < BOUND
    assert min(v for k, v in errors.items() if k != "identity") > 100 * BOUND, errors


def test_flips_of_a_volume_form_the_group_and_act_on_tokens_like_on_images():
    names = {g.name for g in FLIPS_3D}
    assert len(names) == 8 and "flipD+flipH+flipW" in names
    x = torch.randn(1, 3, 3, 4, 5)
    tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)  # (B, d*h*w, C) row-major
    for g in FLIPS_3D:
        assert torch.equal(g.inverse().apply(g.apply(x)), x)
        moved = g.apply_to_tokens(tokens, (3, 4, 5)).reshape(1, 3, 4, 5, 3).permute(0, 4, 1, 2, 3)
        assert torch.equal(moved, g.apply(x))
    assert group_elements("flips") == group_elements("d2")  # in 2D the flips are D2


def brute_force_mask_3d(grid, radius, dilation, prefix):
    coords = torch.cartesian_prod(*(torch.arange(s) for s in grid))  # row-major
    delta = (coords[:, None] - coords[None]).abs()
    near = ((delta <= radius * dilation) & (delta % dilation == 0)).all(-1)
    mask = torch.ones(prefix + len(coords), prefix + len(coords), dtype=torch.bool)
    mask[prefix:, prefix:] = near
    return mask


@pytest.mark.parametrize("grid,radius,dilation,prefix", [((3, 5, 4), 1, 1, 1), ((4, 3, 6), 1, 2, 3)])
def test_mask_matches_definition_and_the_flop_count(grid, radius, dilation, prefix):
    mask = dense_mask(generate_grid_window_mask(grid, radius, dilation, prefix), prefix + math.prod(grid))
    assert torch.equal(mask, brute_force_mask_3d(grid, radius, dilation, prefix))
    assert window_pairs(grid, radius, dilation, prefix) == int(mask.sum())


WINDOW_CASES = [
    # grid, radius, dilation, prefix tokens, tile layout (None: row-major)
    ((3, 5, 4), 1, 1, 1, None),  # odd sizes: every face, edge and corner window is cut
    ((4, 3, 5), 1, 2, 3, None),  # dilation, CLS + 2 registers
    ((3, 3, 3), 2, 1, 1, None),  # window wider than the grid
    ((2, 6, 5), 2, 3, 2, None),  # dilation reaching past the grid
    ((3, 5, 4), 1, 1, 2, 2),  # 2x2x2 tiles, partial edge tiles on every axis, a register
    ((4, 4, 6), 2, 2, 1, 4),  # a tile as deep as the grid, dilation
]


@pytest.mark.parametrize("grid,radius,dilation,prefix,tile", WINDOW_CASES)
def test_window_backend_equals_sdpa_in_outputs_and_gradients(grid, radius, dilation, prefix, tile):
    seq = prefix + grid[0] * grid[1] * grid[2]
    inputs = [torch.randn(2, 3, seq, 8).requires_grad_() for _ in range(3)]
    upstream = torch.randn(2, 3, seq, 8)
    results = {}
    for backend in ("sdpa", "window"):
        out = local_window_attention(*inputs, grid, radius, dilation, prefix, backend=backend, tile=tile)
        results[backend] = (out, *torch.autograd.grad(out, inputs, upstream))
    for name, a, b in zip(("output", "dq", "dk", "dv"), results["sdpa"], results["window"]):
        assert (a - b).abs().max().item() < 1e-5, name


def test_window_backend_equals_sdpa_through_the_network_with_gradients():
    net = tiny3d(**CONFIGS["dilated-registers"]).train()
    x = torch.randn(1, 2, *SHAPES["odd"])
    results = {}
    for backend in ("sdpa", "window"):
        net.set_attention_backend(backend)
        net.zero_grad()
        out = net(x)
        out.square().mean().backward()
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()})
    assert (results["sdpa"][0] - results["window"][0]).abs().max().item() < 1e-5
    for name, grad in results["sdpa"][1].items():
        assert (grad - results["window"][1][name]).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("overrides", [dict(), dict(num_register_tokens=1), dict(patch_size=[2, 4, 4])])
def test_folded_lifting_equals_the_explicit_copies(overrides):
    net = tiny3d(n_lifted_blocks=0, group_pooling="mean", attention_backend="sdpa", **overrides)
    assert net.encoder.lifting_is_linear
    x = torch.randn(2, 2, *SHAPES["odd"])
    with torch.no_grad():
        folded = net(x)
        net.encoder.fold_linear_lifting = False
        explicit = net(x)
    assert (folded - explicit).abs().max().item() < 1e-5


FLEX_CASES = [  # grid, radius, dilation, prefix, tile (None: row-major)
    ((3, 5, 7), 1, 1, 2, None),
    ((6, 8, 8), 1, 1, 1, None),
    ((4, 3, 5), 1, 2, 1, None),
    ((6, 8, 8), 1, 1, 1, 2),  # 2x2x2 tiles, one per block of 8
    ((3, 5, 7), 2, 1, 2, 2),  # partial edge tiles, a register
    ((4, 8, 8), 1, 2, 1, 4),
]


def uncompiled_flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


@pytest.mark.parametrize("grid,radius,dilation,prefix,tile", FLEX_CASES)
def test_flex_block_mask_gives_the_sdpa_result(grid, radius, dilation, prefix, tile):
    """The 3D mask through flex's block-sparse machinery (uncompiled here: compiling takes about 30 s per shape on
    2 CPU cores, and the compiled kernel consumes the same BlockMask); tiled layouts in their own token order."""
    seq = prefix + math.prod(grid)
    q, k, v = (torch.randn(1, 2, seq, 16) for _ in range(3))
    mask = local_attention_mask(grid, radius, dilation, prefix, "flex", tile, torch.device("cpu"))
    if tile is not None:
        assert mask.BLOCK_SIZE == (tile**3, tile**3)  # one tile per block on CPU
    if seq > 300:
        assert mask.sparsity() > 0  # some blocks are skipped: the block structure of the 3D window is used
    with torch.no_grad():
        flex = uncompiled_flex(q, k, v, mask)
    sdpa = local_window_attention(q, k, v, grid, radius, dilation, prefix, backend="sdpa", tile=tile)
    assert (flex - sdpa).abs().max().item() < 1e-5


@pytest.mark.parametrize("grid,tile,prefix", [((4, 8, 8), 2, 1), ((4, 4, 8), 4, 2), ((3, 5, 7), 2, 1)])
def test_tiled_order_in_3d_is_a_permutation_of_cubes_with_prefix_last(grid, tile, prefix):
    order = tiled_token_order(grid, tile, prefix)
    assert torch.equal(order.sort().values, torch.arange(prefix + math.prod(grid)))
    assert order[-prefix:].tolist() == list(range(prefix))
    if all(size % tile == 0 for size in grid):  # each run of tile^3 tokens is one cube
        cells = order[: math.prod(grid)] - prefix
        for block in cells.split(tile**3):
            coords = torch.stack(torch.unravel_index(block, grid))
            assert (coords.amax(1) - coords.amin(1)).tolist() == [tile - 1] * 3


def test_tiled_mask_in_3d_is_the_row_major_mask_permuted():
    grid, prefix = (3, 5, 6), 2
    n = prefix + math.prod(grid)
    row = dense_mask(generate_grid_window_mask(grid, 1, 2, prefix), n)
    tiled = dense_mask(generate_tiled_local_window_mask(grid, 1, 2, prefix, tile=2), n)
    order = tiled_token_order(grid, 2, prefix)
    assert torch.equal(tiled, row[order][:, order])


def test_tiles_put_a_5x5x5_window_in_fewer_blocks_and_a_3x3x3_one_in_more():
    """Why ``auto`` tiles 3D grids for radius 2 but keeps radius 1 row-major (blocks of 8 both ways)."""
    from torch.nn.attention.flex_attention import create_block_mask

    grid, n = (8, 16, 16), 1 + 8 * 16 * 16
    skipped = {}
    for radius in (1, 2):
        for tile in (None, 2):
            mod = (
                generate_grid_window_mask(grid, radius)
                if tile is None
                else generate_tiled_local_window_mask(grid, radius, tile=tile)
            )
            block_mask = create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=8)
            skipped[radius, tile] = block_mask.sparsity()  # percent of blocks skipped
    assert skipped[2, 2] > skipped[2, None] + 1.0
    assert skipped[1, None] > skipped[1, 2]


def test_flex_token_layouts_in_3d():
    net = tiny3d(attention_backend="flex", flex_token_layout="tile4")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert net.encoder.local_token_layout(cpu, needs_grad=False) == ("flex", 4)
    net.set_flex_token_layout("auto")
    assert net.encoder.local_token_layout(cpu, needs_grad=False) == ("flex", None)  # r=1: row-major measured faster
    assert net.encoder.local_token_layout(cuda, needs_grad=True) == ("flex", None)  # row-major on CUDA
    wide = tiny3d(attention_backend="flex", window_radius=2)
    assert wide.encoder.local_token_layout(cpu, needs_grad=False) == ("flex", 2)  # r=2: 2x2x2 tiles
    assert local_attention_mask((4, 8, 8), 1, 1, 1, "flex", None, cpu).BLOCK_SIZE == (16, 16)


@pytest.mark.parametrize("layout", ["row", "tile2", "tile3"])
def test_network_output_in_3d_is_the_same_in_every_flex_token_layout(layout, monkeypatch):
    """The encoder permutes the tokens into tile order for its local blocks and back (flex uncompiled)."""
    from nnunet_equiflex import attention

    monkeypatch.setattr(attention, "_compiled_flex_attention", lambda: uncompiled_flex)
    net = tiny3d(window_dilation=2, num_register_tokens=1, n_global_blocks=0, attention_backend="sdpa")
    x = torch.randn(1, 2, *SHAPES["odd"])
    with torch.no_grad():
        reference = net(x)
        net.set_attention_backend("flex")
        net.set_flex_token_layout(layout)
        assert net.encoder.local_token_layout(x.device, needs_grad=False) == ("flex", parse_token_layout(layout))
        assert (net(x) - reference).abs().max().item() < 1e-4


def test_kwargs_survive_json_and_rebuild_the_same_network():
    net = tiny3d(patch_size=(2, 4, 4), pos_embed_grid=(4, 4, 4), attention_backend="sdpa")
    kwargs = json.loads(json.dumps(net.arch_kwargs))
    assert kwargs["patch_size"] == [2, 4, 4] and kwargs["spatial_dims"] == 3
    rebuilt = EquiFlexFormer(**kwargs).eval()
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 2, 8, 16, 12)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))
    assert net.encoder.patch_embed.proj.weight.shape == (32, 2, 2, 4, 4)
    assert net.encoder.pos_embed.shape == (1, 1 + 64, 32)


def test_the_3d_presets_are_apart_from_the_2d_presets():
    """The 2D planner and trainers offer PRESETS; the 3D presets are built by name all the same."""
    assert not set(PRESETS_3D) & set(PRESETS)
    assert tiny3d().spatial_dims == 3


@pytest.mark.parametrize("name", ["vit_s8_3d", "vit_ti8_3d"])
def test_the_vit_3d_presets_are_one_folded_pass_and_exact_for_the_8_flips(name):
    net = EquiFlexFormer.from_preset(name, 1, 2, attention_backend="sdpa").eval()
    encoder = net.encoder
    assert encoder.token_size == (8, 8, 8) and len(encoder.elements) == 8 and encoder.lifting_is_linear
    assert encoder.n_global_blocks == 2 and encoder.n_lifted_blocks == 0
    x = torch.randn(1, 1, 16, 24, 24)  # 2x3x3 tokens: the local blocks' 5x5x5 windows cut at every border
    errors = max_equivariance_error(net, x, FLIPS_3D)
    assert max(errors.values()) < BOUND, errors
    ablation = EquiFlexFormer.from_preset(name, 1, 2, attention_backend="sdpa", group="none").eval()
    assert max(max_equivariance_error(ablation, x, FLIPS_3D).values()) > 100 * BOUND


def counted_flops(net, x) -> int:
    net.set_attention_backend("sdpa")  # dense-masked SDPA: the math path computes every (q, k) pair as matmuls
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "overrides", [dict(), dict(n_lifted_blocks=0, group_pooling="mean"), dict(patch_size=[2, 4, 4])]
)
@pytest.mark.parametrize("folded", [True, False])
def test_analytic_flops_equal_the_counted_ones(overrides, folded):
    net = tiny3d(**overrides)
    net.encoder.fold_linear_lifting = folded
    patch = (8, 16, 24)
    analytic = network_forward_flops(net, patch, local_attention="dense")
    assert analytic["total"] == counted_flops(net, torch.zeros(1, 2, *patch))
    windowed = network_forward_flops(net, patch)
    assert windowed["attention"] < analytic["attention"] and windowed["linear layers"] == analytic["linear layers"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(group="d4"), r"group 'd4' \(flips and 90-degree rotations of a square\) is 2D-only.*use group='flips'"),
        (dict(group="d2"), r"group 'd2' names the 4 flips of a 2D image; for spatial_dims=3 use group='flips'"),
        (dict(patch_embed="gmr"), r"patch_embed='gmr' .* is 2D-only, got spatial_dims=3; use patch_embed='linear'"),
        (dict(spatial_dims=4), r"spatial_dims must be 2 \(images \(B, C, H, W\)\) or 3 \(volumes"),
        (dict(patch_size=[4, 4]), r"patch_size must be three integers >= 1 \(the token size per axis.*got \[4, 4\]"),
        (dict(pos_embed_grid=[8, 8]), r"pos_embed_grid must be three integers >= 1 \(depth, rows, columns.*\[8, 8\]"),
    ],
    ids=["d4", "d2", "gmr", "4d", "patch-size-rank", "pos-grid-rank"],
)
def test_2d_only_and_mismatched_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        EquiFlexFormer.from_preset("tiny3d", 1, 2, **overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(group="d4", patch_size=[4, 8]), r"group 'd4' .* needs the same token size on both axes.*group='d2'"),
        (dict(patch_embed="gmr", patch_size=[4, 8]), r"patch_embed='gmr' needs the same token size on both axes"),
    ],
)
def test_transposes_and_gmr_need_square_tokens_in_2d(overrides, message):
    with pytest.raises(ValueError, match=message):
        EquiFlexFormer.from_preset("tiny", 1, 2, pos_embed_grid=[8, 8], **overrides)


def test_wrong_rank_names_the_fix_both_ways():
    with pytest.raises(
        ValueError, match=r"expected a 3D batch \(B, C, D, H, W\).*build the network with spatial_dims=2"
    ):
        tiny3d()(torch.randn(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"expected a 2D batch \(B, C, H, W\).*build the network with spatial_dims=3"):
        EquiFlexFormer.from_preset("tiny", 2, 3)(torch.randn(1, 2, 8, 32, 32))


@pytest.mark.parametrize(
    "overrides,shape,message",
    [
        (dict(), (16, 30, 32), r"input size \(16, 30, 32\) is not divisible by the token size 4; pad or crop"),
        (dict(patch_size=[2, 4, 4]), (6, 16, 18), r"token size 2x4x4; pad or crop to a multiple of 2x4x4 on each axis"),
        (dict(), (0, 16, 16), r"is empty; pass at least one volume of at least 4x4x4 voxels \(D, H and W multiples"),
    ],
)
def test_bad_volume_sizes_name_the_fix(overrides, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny3d(**overrides)(torch.randn(1, 2, *shape))
