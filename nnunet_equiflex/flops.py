"""Forward FLOPs of an EquiFlexFormer, counted analytically from its kwargs.

Why analytic: torch's ``FlopCounterMode`` does not see FlexAttention, the window backend's
elementwise products, or (torch 2.14 on CPU) ``scaled_dot_product_attention`` at all, so it
undercounts a ViT by its whole attention. Here every matrix product is counted as
2 FLOPs per multiply-add, the way ``FlopCounterMode`` counts the products it sees; the tests
check the count against ``FlopCounterMode`` with SDPA forced to its math path (where attention
is made of visible matmuls). Elementwise work (norms, softmax, GELU, upsampling) is not counted,
as there.

``local_attention="window"`` counts a local block's attention over its window's (query, key)
pairs (what the window and flex backends compute, up to block granularity);
``"dense"`` over all ``S x S`` pairs (what dense-masked SDPA computes).
"""

from __future__ import annotations

import math
from typing import Any

from nnunet_equiflex.blocks import ConvStem
from nnunet_equiflex.encoder import token_size_per_axis
from nnunet_equiflex.groups import group_elements
from nnunet_equiflex.network import preset_kwargs

_DEFAULTS = dict(
    n_lifted_blocks=4,
    window_radius=2,
    window_dilation=1,
    group="d2",
    group_pooling="max",
    mlp_ratio=4.0,
    num_register_tokens=0,
    refine=False,
    refine_dim=32,
    refine_mode="symmetric",
    lifted_head=False,
    alternate_dilation=False,
    patch_embed="linear",
    spatial_dims=2,
)


def window_pairs(grid: tuple[int, ...], radius: int, dilation: int, prefix: int) -> int:
    """The (query, key) pairs of ``generate_grid_window_mask``, counted without building the mask.

    Every pair with a prefix token, plus the grid pairs: the window is a product of one window per
    axis, so those are the product over the axes of the pairs of positions ``dilation * (-r..r)``
    apart (``size - |offset|`` pairs for each offset)."""
    tokens = math.prod(grid)
    seq = prefix + tokens
    per_axis = [sum(max(size - abs(dilation * i), 0) for i in range(-radius, radius + 1)) for size in grid]
    return seq * seq - tokens * tokens + math.prod(per_axis)


def equiflex_forward_flops(
    kwargs: dict[str, Any],
    in_channels: int,
    num_classes: int,
    patch_size: tuple[int, int] | list[int],
    local_attention: str = "window",
    folded_lifting: bool = True,
) -> dict[str, int]:
    """FLOPs of one forward pass on one ``patch_size`` image, by part, and their ``total``.

    ``kwargs`` are EquiFlexFormer kwargs (a preset's, or a plans file's ``arch_kwargs``);
    ``folded_lifting`` says whether a linear lifting runs folded (the encoder's default)."""
    if local_attention not in ("window", "dense"):
        raise ValueError(f"local_attention must be 'window' or 'dense', got {local_attention!r}")
    k = {**_DEFAULTS, **kwargs}
    if k["patch_embed"] == "gmr":
        raise ValueError(
            "analytic FLOPs cover the linear and conv patch embeddings only; count GMR with FlopCounterMode"
        )
    n, dim, depth = k["spatial_dims"], k["embed_dim"], k["depth"]
    token = token_size_per_axis(k["patch_size"], n)
    n_lifted = k["n_lifted_blocks"]
    n_global = n_lifted if k.get("n_global_blocks") is None else k["n_global_blocks"]
    copies = len(group_elements(k["group"], n))
    conv_stem = k["patch_embed"] == "conv"
    linear_lifting = not conv_stem and k["group_pooling"] == "mean" and n_lifted == 0 and copies > 1
    grid = tuple(size // t for size, t in zip(patch_size, token))
    patches = math.prod(grid)
    prefix = 1 + k["num_register_tokens"]
    seq = prefix + patches
    hidden = int(dim * k["mlp_ratio"])

    embed_copies = 1 if (linear_lifting and folded_lifting) else copies
    if conv_stem:
        per_copy = _conv_stem_flops(patch_size, token, patches, in_channels, dim)
    else:
        per_copy = 2 * patches * in_channels * math.prod(token) * dim
    flops = {"embedding": embed_copies * per_copy}
    linear = attention = 0
    n_local = depth - n_global
    dilations = [k["window_dilation"]] * n_local
    if k["alternate_dilation"]:
        dilations = [k["window_dilation"] if i % 2 else 1 for i in range(n_local)]
    for index in range(depth):
        block_copies = copies if index < n_lifted else 1
        linear += block_copies * 2 * seq * (4 * dim * dim + 2 * hidden * dim)
        if index < n_global or local_attention == "dense":
            pairs = seq * seq
        else:
            pairs = window_pairs(grid, k["window_radius"], dilations[index - n_global], prefix)
        attention += block_copies * 4 * pairs * dim  # q k^T and weights @ v
    flops["linear layers"] = linear
    flops["attention"] = attention
    rd = k["refine_dim"] if k["refine"] else 0
    head_copies, pixel_outputs = (copies, math.prod(token)) if k["lifted_head"] else (1, 0)  # per copy, per pixel
    decoder = head_copies * 2 * patches * dim * (num_classes + rd) * (1 + pixel_outputs)
    if k["refine"]:
        pixels, taps = math.prod(patch_size), 3**n  # 3x3 (3x3x3) kernels
        refine_copies = copies if k["refine_mode"] == "lifted" else 1  # the lifted refinement runs per group element
        decoder += refine_copies * 2 * pixels * taps * ((in_channels + rd) * rd + rd * num_classes)
    flops["decoder"] = decoder
    flops["total"] = sum(flops.values())
    return flops


def _conv_stem_flops(patch_size, token: tuple[int, ...], patches: int, in_channels: int, dim: int) -> int:
    """``blocks.ConvStem`` on one image: its stride-2 3^n convolutions, then the 1x1 one on the ``patches`` tokens."""
    hidden, channels, total = ConvStem.hidden_channels(dim), in_channels, 0
    for size in ConvStem.stage_sizes(tuple(patch_size), token):
        total += 2 * math.prod(size) * 3 ** len(token) * channels * hidden
        channels = hidden
    return total + 2 * patches * channels * dim


def preset_forward_flops(name: str, in_channels: int, num_classes: int, patch_size, **overrides) -> dict[str, int]:
    return equiflex_forward_flops(preset_kwargs(name, **overrides), in_channels, num_classes, patch_size)


def network_forward_flops(network, patch_size, local_attention: str = "window") -> dict[str, int]:
    """``equiflex_forward_flops`` of a built EquiFlexFormer (its recorded constructor kwargs)."""
    kwargs = dict(network.arch_kwargs)
    in_channels, num_classes = kwargs.pop("in_channels"), kwargs.pop("num_classes")
    folded = network.encoder.fold_linear_lifting
    return equiflex_forward_flops(kwargs, in_channels, num_classes, patch_size, local_attention, folded)
