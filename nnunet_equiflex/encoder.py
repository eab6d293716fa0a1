"""The EquiFlexFormer encoder: patch embedding, lifting over a symmetry group, global and local blocks.

Forward pass for ``x`` of shape ``(B, C, H, W)`` or, with ``spatial_dims=3``, ``(B, C, D, H, W)``
(one code path; the axis count is a parameter, the token size may differ per axis):

1. Lifting: the ``|G|`` transformed copies ``g(x)`` are batched into one pass of batch
   ``|G| * B``; each gets patch embedding, position embedding, a CLS token and the first
   ``n_lifted_blocks`` blocks.
2. Each copy's token grid is mapped back with ``g^-1`` and the copies are pooled over ``G``
   (max or mean; CLS tokens too). Writing ``L`` for step 1 on one copy,
   ``E(x) = pool_g g^-1 L(g x)`` and for any ``h`` in ``G``
   ``E(h x) = pool_g g^-1 L(g h x) = h pool_g' g'^-1 L(g' x) = h E(x)`` (substituting
   ``g' = g h``), whatever ``L`` computes, position embeddings included.
3. The remaining blocks add no position information, so the pooled tokens move with the image:
   ``T(h x) = h . T(x)``. Global attention commutes with any permutation of its tokens, and local
   attention over a symmetric ``(2r+1)^n`` window (plus CLS) with the flips and
   transposes of the grid, so every block there commutes with every element of ``G``.

Global or local is a choice per block index, independent of the lifting: the first
``n_global_blocks`` blocks attend globally, the rest locally (default: the lifted blocks are
the global ones). The reference method's own run (FlipModel0) lifts no block, pools by the mean
and makes blocks 0-1 global; FlipModel1/2/4 lift that many blocks and pool by the max.

With mean pooling and no lifted block the lifting is linear: ``mean_g g^-1 (embed(g x) + pos)``
is one embedding with the filter averaged over ``G`` plus the position embedding averaged over
``G``. The encoder then computes it that way (``fold_linear_lifting``, on by default): one
embedding instead of ``|G|``, the same function.

Options from the neighbouring equivariant ViTs (none changes the argument above):
``patch_embed="gmr"`` replaces the linear ``p x p`` projection by Gaussian-Mixture-Ring
convolutions (Equi-ViT; radially symmetric kernels, see ``gmr.py``), which commute with D4 on
their own; ``alternate_dilation`` makes every second local block dense and the others dilated
by ``window_dilation`` (all windows symmetric); ``group="d4"`` adds the 90-degree rotations
(square inputs only). ``group="flips"`` is the flips of every spatial axis: D2 in 2D (the same
as ``"d2"``), the 8 flips of a volume in 3D; ``"d4"`` and GMR are 2D-only.

Optional register tokens (DINOv2 with registers) are extra prefix tokens after CLS, without a
position embedding entry: like CLS they are pooled over ``G`` after the lifting and see and are
seen by every token in the local blocks, so the argument above is unchanged. They are dropped
from the output. Optional LayerScale (``ls1``/``ls2``, DINOv2) scales each residual branch.

Parameter names follow timm's VisionTransformer (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.attn.qkv`` ...), so foreign checkpoints map by renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_equiflex.attention import (
    cached_tiled_token_order,
    check_backend,
    default_token_layout,
    local_attention_mask,
    parse_token_layout,
    resolve_backend,
)
from nnunet_equiflex.blocks import Block, ConvStem, PatchEmbed, check_stem_norm, init_weights
from nnunet_equiflex.gmr import GMRPatchEmbed
from nnunet_equiflex.groups import SPATIAL_DIMS, check_grid_supported, check_group, group_elements

POOLINGS = ("max", "mean")
PATCH_EMBEDS = ("linear", "gmr", "conv")
POS_EMBED_MODES = {2: "bicubic", 3: "trilinear"}  # resampling of the position embedding
_COUNT_WORDS = {2: "two", 3: "three"}
_AXES_WORDS = {2: "rows, columns", 3: "depth, rows, columns"}


class _TokenEmbedding:
    """Part of ``EquiFlexEncoder``: the token grid, the position embedding and the prefix tokens."""

    def token_grid(self, *sizes: int) -> tuple[int, ...]:
        """The token grid of an input with spatial ``sizes`` (one per axis), or an error naming the fix."""
        token = self.token_size
        if any(size % t for size, t in zip(sizes, token)):
            label = self.patch_size if _is_int(self.patch_size) else "x".join(map(str, token))
            each = "" if _is_int(self.patch_size) else " on each axis"
            raise ValueError(
                f"input size {tuple(sizes)} is not divisible by the token size {label}; pad or crop "
                f"to a multiple of {label}{each} (in nnU-Net: re-plan with the EquiFlex planner or pick a patch "
                f"size that is a multiple of {label})"
            )
        check_grid_supported(self.group, *sizes)
        return tuple(size // t for size, t in zip(sizes, token))

    def interpolated_pos_embed(self, grid: tuple[int, ...]) -> torch.Tensor:
        """Position embedding resampled to ``grid`` (bicubic in 2D, trilinear in 3D; identity on the native grid)."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if tuple(grid) != self.pos_embed_grid:
            mode = POS_EMBED_MODES[self.spatial_dims]
            patch_pos = patch_pos.reshape(1, *self.pos_embed_grid, -1).movedim(-1, 1)
            patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode=mode, align_corners=False)
            patch_pos = patch_pos.movedim(1, -1).flatten(1, self.spatial_dims)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        grid = tuple(size // t for size, t in zip(x.shape[2:], self.token_size))
        return self.add_prefix_and_position(self.patch_embed(x), self.interpolated_pos_embed(grid))

    def add_prefix_and_position(self, tokens: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, h*w, D)`` -> CLS, registers and patches, plus ``pos_embed`` (CLS first)."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + pos_embed
        if self.reg_token is None:
            return tokens
        registers = self.reg_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)


class _Lifting:
    """Part of ``EquiFlexEncoder``: steps 1 and 2 of the module docstring (lifting, pooling, folding)."""

    @property
    def lifting_is_linear(self) -> bool:
        """Mean pooling with no lifted block: the lifting is one linear map (see the module docstring)."""
        linear_embedding = not isinstance(self.patch_embed, ConvStem)
        return (
            linear_embedding and self.group_pooling == "mean" and self.n_lifted_blocks == 0 and len(self.elements) > 1
        )

    def lift_and_pool(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Steps 1 and 2: the lifted blocks on all ``g(x)`` in one batch, then ``pool_g g^-1``."""
        if self.fold_linear_lifting and self.lifting_is_linear:
            return self.folded_lifting(x, grid)
        tokens = self.embed_copies(x, grid)
        tokens = self.run_blocks(tokens, grid, 0, self.n_lifted_blocks)
        return self.pool(tokens, x.shape[0], grid)

    def embed_copies(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Embedded tokens of every ``g(x)``, stacked along the batch in the order of ``elements``."""
        # All copies have x's shape (D4 is only allowed on squares), so they share one pass.
        if isinstance(self.patch_embed, GMRPatchEmbed):
            # GMR commutes with D4: P(g x) = g P(x), so embed once and move the tokens (|G| times cheaper).
            patches = self.patch_embed(x)
            moved = torch.cat([g.apply_to_tokens(patches, grid) for g in self.elements], dim=0)
            return self.add_prefix_and_position(moved, self.interpolated_pos_embed(grid))
        return self.embed(torch.cat([g.apply(x) for g in self.elements], dim=0))

    def pool(self, tokens: torch.Tensor, batch: int, grid: tuple[int, ...]) -> torch.Tensor:
        """``pool_g g^-1`` over the copies stacked along the batch."""
        prefix = self.num_prefix_tokens
        aligned = []
        for g, t in zip(self.elements, tokens.split(batch, dim=0)):
            patches = g.inverse().apply_to_tokens(t[:, prefix:], g.maps_grid(grid))
            aligned.append(torch.cat([t[:, :prefix], patches], dim=1))
        stacked = torch.stack(aligned, dim=0)
        return stacked.amax(dim=0) if self.group_pooling == "max" else stacked.mean(dim=0)

    def folded_lifting(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """The linear lifting in one pass: group-averaged filter and position embedding.

        ``mean_g g^-1 embed(g x)`` is the embedding with the filter averaged over ``G`` (GMR
        already commutes with ``G``), and ``mean_g g^-1 pos`` is the position embedding averaged
        over the grid's images under ``G`` (the group is closed under inverses, so averaging
        ``g`` or ``g^-1`` is the same); CLS and registers are the same in every copy."""
        if isinstance(self.patch_embed, GMRPatchEmbed):
            patches = self.patch_embed(x)
        else:
            patches = self.patch_embed.forward_symmetrised(x, self.elements)
        pos = self.interpolated_pos_embed(grid)
        patch_pos = torch.stack([g.apply_to_tokens(pos[:, 1:], grid) for g in self.elements]).mean(dim=0)
        return self.add_prefix_and_position(patches, torch.cat([pos[:, :1], patch_pos], dim=1))


class _Blocks:
    """Part of ``EquiFlexEncoder``: the blocks after the embedding, global then local (step 3)."""

    def local_dilations(self) -> list[int]:
        """Window dilation of each local block: all ``window_dilation``, or dense/dilated alternating."""
        n_local = len(self.blocks) - self.n_global_blocks
        if not self.alternate_dilation:
            return [self.window_dilation] * n_local
        return [self.window_dilation if i % 2 else 1 for i in range(n_local)]

    def set_flex_token_layout(self, layout: str) -> None:
        if layout != "auto":
            parse_token_layout(layout)  # raises, naming the choices
        self.flex_token_layout = layout

    def local_token_layout(self, device: torch.device, needs_grad: bool) -> tuple[str, int | None]:
        """The local blocks' attention backend and, for flex, its tile size (None: row-major)."""
        backend = resolve_backend(self.attention_backend, device, needs_grad)
        if backend != "flex":
            return backend, None
        layout = self.flex_token_layout
        return backend, parse_token_layout(
            default_token_layout(device, self.spatial_dims, self.window_radius) if layout == "auto" else layout
        )

    def run_blocks(self, tokens: torch.Tensor, grid: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Blocks ``start..stop-1`` on tokens ``(N, prefix + h*w, D)``: global ones, then local ones."""
        split = min(max(self.n_global_blocks, start), stop)
        for block in self.blocks[start:split]:
            tokens = block(tokens)
        return self.run_local_blocks(tokens, grid, split, stop) if split < stop else tokens

    def run_local_blocks(self, tokens: torch.Tensor, grid: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        """Local blocks ``start..stop-1``, with one mask per dilation looked up once.

        With a tiled flex layout the tokens are permuted once into tile order, go through every
        block of the run in that order (the blocks act per token except for attention, whose mask
        is expressed in the same order) and are permuted back: the same function, cheaper blocks."""
        needs_grad = torch.is_grad_enabled() and tokens.requires_grad
        backend, tile = self.local_token_layout(tokens.device, needs_grad)
        dilations = self.local_dilations()[start - self.n_global_blocks : stop - self.n_global_blocks]
        masks = {
            d: local_attention_mask(grid, self.window_radius, d, self.num_prefix_tokens, backend, tile, tokens.device)
            for d in sorted(set(dilations))
        }  # built once per geometry, looked up once per forward
        if tile is not None:
            order, inverse = cached_tiled_token_order(tuple(grid), tile, self.num_prefix_tokens, tokens.device)
            tokens = tokens[:, order]
        for block, dilation in zip(self.blocks[start:stop], dilations):
            tokens = block(tokens, masks[dilation])
        return tokens if tile is None else tokens[:, inverse]

    def forward_after_pooling(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Step 3: the blocks after the lifting, on pooled tokens ``(B, prefix + h*w, D)``."""
        return self.run_blocks(tokens, grid, self.n_lifted_blocks, len(self.blocks))


class EquiFlexEncoder(_TokenEmbedding, _Lifting, _Blocks, nn.Module):
    """ViT encoder, equivariant to ``group`` (see the module docstring for the argument)."""

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 8,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        n_lifted_blocks: int = 4,
        window_radius: int = 2,
        window_dilation: int = 1,
        group: str = "d2",
        group_pooling: str = "max",
        drop_path_rate: float = 0.0,
        attention_backend: str = "auto",
        pos_embed_grid: tuple[int, ...] | list[int] | None = None,
        num_register_tokens: int = 0,
        layer_scale_init: float | None = None,
        patch_embed: str = "linear",
        gmr_kernel_sizes: tuple[int, ...] | list[int] = (6, 11),
        gmr_rings: int | None = None,
        gmr_hidden_dim: int = 32,
        gmr_strides: tuple[int, ...] | list[int] | None = None,
        alternate_dilation: bool = False,
        flex_token_layout: str = "auto",
        n_global_blocks: int | None = None,
        spatial_dims: int = 2,
        relative_position_bias: bool = False,
        stem_norm: str = "instance",
    ) -> None:
        super().__init__()
        n_global_blocks = n_lifted_blocks if n_global_blocks is None else n_global_blocks
        check_spatial_dims(spatial_dims)
        pos_embed_grid = default_pos_embed_grid(spatial_dims) if pos_embed_grid is None else pos_embed_grid
        _check_dimension_settings(spatial_dims, patch_size, tuple(pos_embed_grid), group, patch_embed)
        check_stem_norm(stem_norm)
        _check_encoder_settings(
            in_channels=in_channels, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, n_lifted_blocks=n_lifted_blocks, n_global_blocks=n_global_blocks,
            window_radius=window_radius, window_dilation=window_dilation, group_pooling=group_pooling,
            drop_path_rate=drop_path_rate, patch_embed=patch_embed,
            gmr_rings=gmr_rings, alternate_dilation=alternate_dilation, num_register_tokens=num_register_tokens,
        )  # fmt: skip
        self.spatial_dims = spatial_dims
        self.patch_size = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else patch_size
        self.token_size = token_size_per_axis(patch_size, spatial_dims)
        self.embed_dim = embed_dim
        self.n_lifted_blocks = n_lifted_blocks
        self.n_global_blocks = n_global_blocks
        self.window_radius = window_radius
        self.window_dilation = window_dilation
        self.alternate_dilation = alternate_dilation
        self.group = group
        self.group_pooling = group_pooling
        self.attention_backend = check_backend(attention_backend)
        self.set_flex_token_layout(flex_token_layout)
        self.elements = group_elements(group, spatial_dims)
        self.pos_embed_grid = tuple(pos_embed_grid)
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens  # CLS, then the registers
        self.fold_linear_lifting = True  # the same function either way; False runs the |G| copies explicitly

        self._build_layers(
            in_channels, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_eps, drop_path_rate,
            layer_scale_init, patch_embed, (gmr_kernel_sizes, gmr_rings, gmr_hidden_dim, gmr_strides), stem_norm,
        )  # fmt: skip
        if relative_position_bias:
            self._add_relative_position_bias()

    def _add_relative_position_bias(self) -> None:
        """A learned bias per head and window offset in every local block (step 4). A lifted block may learn any
        table (the lifting makes any block equivariant); after the pooling the table is averaged over the group's
        action on the offsets, so the block commutes with every element on its own (section 3 of DESIGN.md)."""
        window = (2 * self.window_radius + 1,) * self.spatial_dims
        symmetric_over = self.elements if len(self.elements) > 1 else None
        for index in range(self.n_global_blocks, len(self.blocks)):
            lifted = index < self.n_lifted_blocks
            self.blocks[index].attn.add_relative_position(window, None if lifted else symmetric_over)

    def _build_layers(
        self, in_channels, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_eps, drop_path_rate,
        layer_scale_init, patch_embed, gmr_options, stem_norm,
    ) -> None:  # fmt: skip
        """Patch embedding, CLS/register tokens, position embedding, blocks and norm, initialised."""
        if patch_embed == "gmr":
            self.patch_embed = GMRPatchEmbed(in_channels, embed_dim, self.token_size[0], *gmr_options)
        elif patch_embed == "conv":
            self.patch_embed = ConvStem(in_channels, embed_dim, self.token_size, stem_norm)
        else:
            self.patch_embed = PatchEmbed(in_channels, embed_dim, self.patch_size, self.spatial_dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Registers have no position embedding entry (as in DINOv2); None keeps the state dict unchanged.
        n_registers = self.num_register_tokens
        self.reg_token = nn.Parameter(torch.zeros(1, n_registers, embed_dim)) if n_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_embed_grid), embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, norm_eps, layer_scale_init) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Return normalised tokens ``(B, 1 + prod(grid), D)`` (CLS first) and the token grid (one size per axis)."""
        grid = self.token_grid(*x.shape[2:])
        tokens = self.norm(self.forward_after_pooling(self.lift_and_pool(x, grid), grid))
        return self._without_registers(tokens), grid

    def forward_copies(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Every block on every ``g(x)``, unpooled: normalised tokens ``(|G| * B, 1 + prod(grid), D)`` stacked in
        the order of ``elements``, each copy on its own token grid (``g`` moved it), and the grid of ``x``. Needs
        every block lifted; the caller maps each copy's output back with ``g^-1`` and pools (step 2, later)."""
        if self.n_lifted_blocks != len(self.blocks):
            raise ValueError(
                f"unpooled copies need every block lifted (n_lifted_blocks={self.n_lifted_blocks}, "
                f"depth={len(self.blocks)}); set n_lifted_blocks={len(self.blocks)}"
            )
        grid = self.token_grid(*x.shape[2:])
        tokens = self.run_blocks(self.embed_copies(x, grid), grid, 0, len(self.blocks))
        return self._without_registers(self.norm(tokens)), grid

    def _without_registers(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.num_register_tokens:
            return torch.cat([tokens[:, :1], tokens[:, self.num_prefix_tokens :]], dim=1)
        return tokens


def _check_encoder_settings(
    *,
    in_channels: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    n_lifted_blocks: int,
    n_global_blocks: int,
    window_radius: int,
    window_dilation: int,
    group_pooling: str,
    drop_path_rate: float,
    patch_embed: str,
    gmr_rings: int | None,
    alternate_dilation: bool,
    num_register_tokens: int,
) -> None:
    """Every setting that cannot work, rejected at construction with the fix (not at the first forward)."""
    for name, value in (
        ("in_channels", in_channels), ("embed_dim", embed_dim), ("num_heads", num_heads),
        ("window_dilation", window_dilation),
    ):  # fmt: skip
        check_positive_int(name, value)
    if embed_dim % num_heads:
        divisors = [h for h in range(1, min(embed_dim, 16) + 1) if embed_dim % h == 0]
        raise ValueError(
            f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pick num_heads that divides "
            f"embed_dim (for {embed_dim}: {', '.join(map(str, divisors))}, ...) or change embed_dim"
        )
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0 (the MLP width is mlp_ratio * embed_dim), got {mlp_ratio}")
    if not _is_int(window_radius) or window_radius < 0:
        raise ValueError(
            f"window_radius must be an integer >= 0 (the local window is (2r+1)x(2r+1) tokens), got {window_radius!r}"
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(
            f"drop_path_rate must lie in [0, 1) (1 drops every residual branch and training gives NaN), "
            f"got {drop_path_rate}; ViT recipes use 0.1 to 0.2"
        )
    if patch_embed not in PATCH_EMBEDS:
        raise ValueError(f"unknown patch_embed {patch_embed!r}; choose one of {', '.join(PATCH_EMBEDS)}")
    if gmr_rings is not None and (not _is_int(gmr_rings) or gmr_rings < 1):
        raise ValueError(f"gmr_rings must be an integer >= 1 or None (kernel_size // 2 + 1 rings), got {gmr_rings!r}")
    if alternate_dilation and window_dilation < 2:
        raise ValueError(
            "alternate_dilation=True alternates dense and dilated local blocks, so it needs window_dilation >= 2 "
            f"(got {window_dilation})"
        )
    if num_register_tokens < 0:
        raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
    if not 0 <= n_lifted_blocks <= depth:
        raise ValueError(f"n_lifted_blocks must lie in 0..depth ({depth}), got {n_lifted_blocks}")
    if not 0 <= n_global_blocks <= depth:
        raise ValueError(f"n_global_blocks must lie in 0..depth ({depth}), got {n_global_blocks}")
    if group_pooling not in POOLINGS:
        raise ValueError(f"unknown group_pooling {group_pooling!r}; choose one of {', '.join(POOLINGS)}")


def check_spatial_dims(spatial_dims: object) -> None:
    if not _is_int(spatial_dims) or spatial_dims not in SPATIAL_DIMS:
        raise ValueError(
            f"spatial_dims must be 2 (images (B, C, H, W)) or 3 (volumes (B, C, D, H, W)), got {spatial_dims!r}"
        )


def default_pos_embed_grid(spatial_dims: int) -> tuple[int, ...]:
    """DINO's 28x28 (224 px at token size 8) in 2D; 8x8x8 in 3D."""
    return (28, 28) if spatial_dims == 2 else (8,) * spatial_dims


def token_size_per_axis(patch_size: int | tuple[int, ...] | list[int], spatial_dims: int) -> tuple[int, ...]:
    """One integer (the same on every axis) or one per axis -> one per axis."""
    return (patch_size,) * spatial_dims if _is_int(patch_size) else tuple(patch_size)


def _check_per_axis(name: str, value: object, spatial_dims: int, meaning: str, example: list[int]) -> None:
    sequence = isinstance(value, (list, tuple))
    if not sequence or len(value) != spatial_dims or not all(_is_int(v) and v >= 1 for v in value):
        raise ValueError(
            f"{name} must be {_COUNT_WORDS[spatial_dims]} integers >= 1 ({meaning}, e.g. {example}), "
            f"got {list(value) if sequence else value!r}"
        )


def _check_dimension_settings(
    spatial_dims: int, patch_size: object, pos_embed_grid: tuple[int, ...], group: str, patch_embed: str
) -> None:
    """The settings whose meaning depends on the number of spatial axes, checked at construction."""
    if isinstance(patch_size, (list, tuple)):
        example = [4] + [8] * (spatial_dims - 1)
        _check_per_axis("patch_size", patch_size, spatial_dims, "the token size per axis, or one integer", example)
    else:
        check_positive_int("patch_size", patch_size)
    meaning = f"{_AXES_WORDS[spatial_dims]} of the native token grid"
    _check_per_axis("pos_embed_grid", pos_embed_grid, spatial_dims, meaning, list(default_pos_embed_grid(spatial_dims)))
    check_group(group, spatial_dims)
    if patch_embed == "gmr" and spatial_dims != 2:
        raise ValueError(
            f"patch_embed='gmr' (Gaussian-Mixture-Ring convolutions) is 2D-only, got spatial_dims={spatial_dims}; "
            "use patch_embed='linear'"
        )
    tokens = token_size_per_axis(patch_size, spatial_dims)
    if patch_embed == "conv" and any(t & (t - 1) for t in tokens):
        raise ValueError(
            f"patch_embed='conv' (stride-2 convolutions) needs token sizes that are powers of 2, got patch_size="
            f"{patch_size}; use a token size of 2, 4, 8 or 16, or patch_embed='linear'"
        )
    if len(set(tokens)) > 1 and (patch_embed == "gmr" or group == "d4"):
        name = "patch_embed='gmr'" if patch_embed == "gmr" else "group 'd4' (it transposes the axes)"
        raise ValueError(
            f"{name} needs the same token size on both axes, got patch_size={list(patch_size)}; pass one integer "
            "patch_size" + ("" if patch_embed == "gmr" else " or use group='d2'")
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> None:
    """A size or count setting: an integer >= 1 (JSON plans store them as integers)."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
