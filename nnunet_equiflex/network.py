"""EquiFlexFormer: the equivariant encoder plus the light decoder, built from plain kwargs.

Every constructor argument is JSON-serialisable, so an nnU-Net plans file can rebuild the
network from ``network_class_name = "nnunet_equiflex.network.EquiFlexFormer"`` and its
``arch_kwargs``. The result satisfies ``f(g x) = g f(x)`` for every ``g`` of ``group`` (to
float rounding), in eval mode; see ``encoder.py`` for the argument.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn as nn

from nnunet_equiflex.attention import check_backend
from nnunet_equiflex.decoder import LightDecoder, check_refine_mode
from nnunet_equiflex.encoder import (
    EquiFlexEncoder,
    check_positive_int,
    check_spatial_dims,
    default_pos_embed_grid,
    token_size_per_axis,
)

# DINO ViT-S/8 shape (the reference method's backbone); native position grid 28x28 (224 px).
_VIT_S8 = dict(
    patch_size=8,
    embed_dim=384,
    depth=12,
    num_heads=6,
    mlp_ratio=4.0,
    qkv_bias=True,
    norm_eps=1e-6,
    window_radius=2,
    group="d2",
    pos_embed_grid=(28, 28),
)
# The reference's variants (FlipModelK of "Look, No Convs!"): K lifted blocks, blocks 0-1 global, the rest local.
_FLIP_MODEL_0 = dict(n_lifted_blocks=0, group_pooling="mean", n_global_blocks=2)  # its own training run

# What EquiFlexTrainer and `nnunet-equiflex plan` use unless told otherwise: the highest mean Dice of the 2D
# frontier (benchmarks/frontier.py; no preset came within 1 point of the CNN with TTA, the rule's fallback):
# small_lift4 with the convolutional stem, at 28% (112x112 tile) to 45% (256x224) of vit_s8's FLOPs per tile.
DEFAULT_PRESET = "small_lift4_conv"
# What `nnunet-equiflex plan -c 3d_fullres` writes unless told otherwise: the ViT-S/8 shape (so DINO ViT-S/8
# weights inflate into it), with the folded lifting: 33x-40x fewer FLOPs per tile than nnU-Net's 3D CNN
# with its 8-pass TTA at 32^3 to 128^3 patches (benchmarks/bench_network.py --patch D H W).
DEFAULT_PRESET_3D = "vit_s8_3d"

PRESETS: dict[str, dict[str, Any]] = {
    # 4 lifted blocks, all global, max pooling (the first release's default).
    "vit_s8": dict(_VIT_S8, n_lifted_blocks=4, group_pooling="max"),
    # FlipModel0: lifting of the embedding only (mean, folded into one pass at no cost), 2 global blocks.
    "vit_s8_flip0": dict(_VIT_S8, **_FLIP_MODEL_0),
    # FlipModel2: 2 lifted (global) blocks, max pooling, the rest local.
    "vit_s8_flip2": dict(_VIT_S8, n_lifted_blocks=2, group_pooling="max", n_global_blocks=2),
    # FlipModel4 as its paper means it: 4 lifted blocks (0-1 global, 2-3 local), max pooling.
    "vit_s8_flip4": dict(_VIT_S8, n_lifted_blocks=4, group_pooling="max", n_global_blocks=2),
    # ViT-Ti/8 shape (192 wide, 3 heads) with FlipModel0's lifting: a quarter of ViT-S's linear-layer cost.
    "vit_ti8": dict(_VIT_S8, embed_dim=192, num_heads=3, **_FLIP_MODEL_0),
    # Trains in seconds on a CPU; for tests, demos and CPU smoke runs.
    "tiny": dict(
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        norm_eps=1e-6,
        n_lifted_blocks=1,
        window_radius=2,
        group="d2",
        group_pooling="max",
        pos_embed_grid=(8, 8),
        refine=True,
        refine_dim=16,
    ),
}
# Token size 4 (the tiny preset's resolution, 28x28 tokens at 112 px) with the folded lifting of FlipModel0 (one
# pass) and 2 global blocks, at two widths between tiny and ViT-Ti/8: the frontier's candidates for a cheap default.
_TOKEN4_FLIP0 = dict(PRESETS["tiny"], depth=6, **_FLIP_MODEL_0)
PRESETS["mini4"] = dict(_TOKEN4_FLIP0, embed_dim=192, num_heads=6)  # 192 wide, 6 blocks
PRESETS["micro4"] = dict(_TOKEN4_FLIP0, embed_dim=128, num_heads=4)  # 128 wide, 6 blocks
# tiny with the lifted refinement (|G| passes of a small full-resolution CNN with oriented kernels) instead of the
# symmetrised one (even kernels only): does the head's resolution of boundaries limit the Dice? (the frontier says)
PRESETS["tiny_liftref"] = dict(PRESETS["tiny"], refine_mode="lifted")
# tiny with every block lifted (block 0 global, 1-3 local) and max-pooled only before the head: the tokens keep
# oriented features through all blocks (after the pooling they are invariant, and the local windows, which carry
# no position, see their keys as a set). Does losing orientation after the pooling limit the Dice? (the frontier)
PRESETS["tiny_lift4"] = dict(PRESETS["tiny"], n_lifted_blocks=4, n_global_blocks=1)
# tiny_lift4 at twice the width (128, 4 heads of 32): does the all-lifted design gain from capacity? (the frontier)
PRESETS["small_lift4"] = dict(PRESETS["tiny_lift4"], embed_dim=128)
# tiny_lift4 with the lifted head: the head runs on the 4 unpooled copies and predicts each token's 4x4 pixels, the
# copies' maps averaged back. Is sub-token detail (oriented, at 1 px) what the thin structures miss? (the frontier)
PRESETS["tiny_lifthead"] = dict(PRESETS["tiny_lift4"], lifted_head=True)
# tiny_lift4 with a relative position bias in its local blocks: the window's keys carry no position (the position
# embedding is smooth over neighbouring tokens), so attention sees them as a set. Does telling them apart help? (the
# frontier)
PRESETS["tiny_lift4_rpb"] = dict(PRESETS["tiny_lift4"], relative_position_bias=True)
# tiny_lift4 with the convolutional stem (stride-2 3x3 convolutions with instance norm, then a 1x1 projection) for
# the 4x4 patch projection: tokens see past their own pixels, so thin walls that straddle token boundaries reach them
# whole. Is the patch projection what the thin structures miss? (the frontier)
PRESETS["tiny_lift4_conv"] = dict(PRESETS["tiny_lift4"], patch_embed="conv")
# The convolutional stem at twice tiny_lift4's width (the default) and at the cheap end (tiny, 1 of 4 blocks lifted).
PRESETS["small_lift4_conv"] = dict(PRESETS["small_lift4"], patch_embed="conv")
PRESETS["tiny_conv"] = dict(PRESETS["tiny"], patch_embed="conv")
PRESETS["tiny_conv_cn"] = dict(PRESETS["tiny_conv"], stem_norm="channel")

# 3D presets, apart from the 2D ones above (which the 2D planner and trainers offer): volumes (B, C, D, H, W).
PRESETS_3D: dict[str, dict[str, Any]] = {
    # The 3D counterpart of "tiny", for tests and CPU demos: 8 flips lifted through one global block.
    "tiny3d": dict(
        spatial_dims=3,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        qkv_bias=True,
        norm_eps=1e-6,
        n_lifted_blocks=1,
        window_radius=1,
        group="flips",
        group_pooling="max",
        pos_embed_grid=(4, 8, 8),
        refine=True,
        refine_dim=8,
    ),
    # ViT-S/8 in 3D (8x8x8 tokens, the planner halves them along coarse axes) with FlipModel0's lifting over the
    # 8 flips: the embedding lifted (mean, folded into one pass), blocks 0-1 global, the rest in 5x5x5 windows.
    # A 2D DINO ViT-S/8 checkpoint loads by inflation (EquiFlexTrainerPretrained3D).
    "vit_s8_3d": dict(_VIT_S8, spatial_dims=3, group="flips", pos_embed_grid=(8, 16, 16), **_FLIP_MODEL_0),
    # The ViT-Ti/8 shape (192 wide, 3 heads) of vit_s8_3d: a quarter of its linear-layer cost.
    "vit_ti8_3d": dict(
        _VIT_S8, embed_dim=192, num_heads=3, spatial_dims=3, group="flips", pos_embed_grid=(8, 16, 16), **_FLIP_MODEL_0
    ),
}
_ALL_PRESETS = {**PRESETS, **PRESETS_3D}
_BATCH_SHAPES = {2: "(B, C, H, W)", 3: "(B, C, D, H, W)"}
_AXIS_NAMES = {2: "H and W", 3: "D, H and W"}


class EquiFlexFormer(nn.Module):
    """Reflection-equivariant ViT with local attention for 2D or 3D segmentation (one code path).

    Args:
        in_channels: image channels.
        num_classes: output channels (logits, background included).
        patch_size: token size p, one integer or one per spatial axis (e.g. [4, 8, 8] for anisotropic
            spacing); every spatial size of the input must be a multiple of it.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_eps: ViT shape.
        n_lifted_blocks: blocks run on all |G| transformed copies before the pooling (0..depth).
        n_global_blocks: the first this many blocks attend globally, the rest locally, lifted or not
            (0..depth); None: the lifted blocks are the global ones.
        window_radius: r of the (2r+1)^n local window of the remaining blocks (n spatial axes).
        window_dilation: spacing of the window's tokens (1 = dense).
        group: "none" (plain ViT), "flips" (the flips of every spatial axis: 4 in 2D, 8 in 3D), "d2" (the
            same in 2D; rejected in 3D, naming "flips") or "d4" (flips and 90-degree rotations, square 2D inputs).
        group_pooling: "max" or "mean" over the group after the lifting.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        attention_backend: "auto", "flex", "sdpa" or "window" for the local blocks.
        pos_embed_grid: native token grid of the learned position embedding, one size per axis (resampled
            bicubically in 2D, trilinearly in 3D); None: [28, 28] in 2D, [8, 8, 8] in 3D.
        refine: add the equivariant full-resolution refinement after upsampling.
        refine_dim: channels of that refinement.
        refine_mode: how the refinement stays equivariant: "symmetric" (kernels symmetrised over the group, one
            pass) or "lifted" (plain kernels on every transformed copy, mapped back and averaged: |G| passes of
            a small full-resolution CNN, which may use oriented kernels).
        num_register_tokens: extra prefix tokens after CLS without position embedding (DINOv2 with registers).
        layer_scale_init: initial LayerScale value per residual branch (DINOv2); None disables LayerScale.
        patch_embed: "linear" (p x p projection, timm's) or "gmr" (Gaussian-Mixture-Ring convolutions,
            Equi-ViT: radially symmetric kernels, so the embedding commutes with flips and 90-degree
            rotations on its own; the lifting still provides the exact equivariance for ``group``).
        gmr_kernel_sizes: kernel size of each GMR layer (Equi-ViT's best: [6, 11]).
        gmr_rings: Gaussian rings per GMR kernel; None = kernel_size // 2 + 1 per layer.
        gmr_hidden_dim: channels between the GMR layers.
        gmr_strides: stride of each GMR layer, multiplying to patch_size; None = 1, ..., 1, patch_size.
        alternate_dilation: local blocks alternate dense (even) and ``window_dilation``-dilated (odd) windows.
        flex_token_layout: storage order of the tokens in the flex local blocks: "auto" (on CPU 4x4 tiles in
            2D, in 3D 2x2x2 tiles for window_radius >= 2 and row-major for 1; row-major on CUDA), "row" or
            "tileN" (N x N, or N x N x N, tiles). The same function in every layout, only its speed differs.
        spatial_dims: 2 for images (B, C, H, W), 3 for volumes (B, C, D, H, W). "d4" and GMR are 2D-only.
        lifted_head: run the head on every lifted copy (needs n_lifted_blocks == depth; group_pooling is then
            unused) and let it predict each token's pixels too, then average the copies' maps mapped back by
            ``g^-1`` (``decoder.LightDecoder``): sub-token detail that may be oriented, still exactly equivariant.
        relative_position_bias: every local block learns a bias per head and window offset (Swin's relative
            position bias), so attention can tell a window's keys apart by where they lie; symmetrised over the
            group in the blocks after the pooling, free in the lifted ones.
        stem_norm: the normalisation after each convolution of the ``patch_embed="conv"`` stem: "instance" (per
            image and channel, as in nnU-Net's CNN) or "channel" (per pixel, over the channels: local, so a bright
            region elsewhere in the image does not change a structure's features).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
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
        refine: bool = False,
        refine_dim: int = 32,
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
        refine_mode: str = "symmetric",
        lifted_head: bool = False,
        relative_position_bias: bool = False,
        stem_norm: str = "instance",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        pos_embed_grid = default_pos_embed_grid(spatial_dims) if pos_embed_grid is None else pos_embed_grid
        arch_kwargs = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        self.arch_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in arch_kwargs.items()}
        _check_network_settings(num_classes, refine_dim, refine_mode, lifted_head, n_lifted_blocks, depth)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.patch_size = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else patch_size
        self.encoder = EquiFlexEncoder(
            in_channels=in_channels,
            patch_size=self.patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_eps=norm_eps,
            n_lifted_blocks=n_lifted_blocks,
            window_radius=window_radius,
            window_dilation=window_dilation,
            group=group,
            group_pooling=group_pooling,
            drop_path_rate=drop_path_rate,
            attention_backend=attention_backend,
            pos_embed_grid=tuple(pos_embed_grid),
            num_register_tokens=num_register_tokens,
            layer_scale_init=layer_scale_init,
            patch_embed=patch_embed,
            gmr_kernel_sizes=tuple(gmr_kernel_sizes),
            gmr_rings=gmr_rings,
            gmr_hidden_dim=gmr_hidden_dim,
            gmr_strides=None if gmr_strides is None else tuple(gmr_strides),
            alternate_dilation=alternate_dilation,
            flex_token_layout=flex_token_layout,
            n_global_blocks=n_global_blocks,
            spatial_dims=spatial_dims,
            relative_position_bias=relative_position_bias,
            stem_norm=stem_norm,
        )
        self.lifted_head = lifted_head
        self.decoder = LightDecoder(
            embed_dim, num_classes, self.patch_size, in_channels, refine, refine_dim, group, spatial_dims, refine_mode,
            lifted_head,
        )  # fmt: skip

    @classmethod
    def from_preset(cls, name: str, in_channels: int, num_classes: int, **overrides: Any) -> EquiFlexFormer:
        return cls(in_channels=in_channels, num_classes=num_classes, **preset_kwargs(name, **overrides))

    def check_input(self, x: torch.Tensor) -> None:
        """Reject inputs the network cannot segment, naming the fix. Shapes and dtypes only: no host-device sync."""
        self._check_rank(x)
        if not x.is_floating_point():
            raise TypeError(
                f"input dtype {x.dtype} is not floating point; convert the images first (x.float(), after the "
                "intensity normalisation: nnU-Net's preprocessing gives float32)"
            )
        batch, channels = x.shape[:2]
        if channels != self.in_channels:
            raise ValueError(
                f"input has {channels} channel(s) (shape {tuple(x.shape)}), the network was built for "
                f"in_channels={self.in_channels}; pass images with {self.in_channels} channel(s) or build the network "
                f"with in_channels={channels}"
            )
        if batch == 0 or 0 in x.shape[2:]:
            n, token = self.spatial_dims, token_size_per_axis(self.patch_size, self.spatial_dims)
            what, unit = ("image", "pixels") if n == 2 else ("volume", "voxels")
            label = self.patch_size if isinstance(self.patch_size, int) else "x".join(map(str, token))
            raise ValueError(
                f"input of shape {tuple(x.shape)} is empty; pass at least one {what} of at least "
                f"{'x'.join(map(str, token))} {unit} ({_AXIS_NAMES[n]} multiples of the token size {label})"
            )

    def _check_rank(self, x: torch.Tensor) -> None:
        n = self.spatial_dims
        if x.ndim == n + 2:
            return
        other = x.ndim - 2
        hint = f"; for {other}D inputs build the network with spatial_dims={other}" if other in _BATCH_SHAPES else ""
        raise ValueError(
            f"expected a {n}D batch {_BATCH_SHAPES[n]}, got shape {tuple(x.shape)}; the network was built with "
            f"spatial_dims={n}{hint}"
        )

    def set_attention_backend(self, backend: str) -> None:
        self.encoder.attention_backend = check_backend(backend)

    def set_flex_token_layout(self, layout: str) -> None:
        self.encoder.set_flex_token_layout(layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.lifted_head:
            copies, grid = self.encoder.forward_copies(x)
            return self.decoder(copies, grid, x, self.encoder.elements)
        tokens, grid = self.encoder(x)
        return self.decoder(tokens, grid, x)


def preset_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor kwargs of preset ``name`` (2D or 3D, without channels/classes), with overrides."""
    if name not in _ALL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_ALL_PRESETS)}")
    kwargs = copy.deepcopy(_ALL_PRESETS[name])
    kwargs.update(overrides)
    return kwargs


# Constructor arguments that are not part of a network's shape: the data's, and the trainer's or runtime choices.
_NOT_SHAPE = ("self", "in_channels", "num_classes", "drop_path_rate", "attention_backend", "flex_token_layout")


def preset_shape_kwargs(name: str) -> dict[str, Any]:
    """Every shape setting of preset ``name``: the preset's values over the constructor's defaults. A trainer
    that pins a preset overrides the plans with these, so plans of another preset leak no setting the preset
    leaves at its default (a refinement, registers, a global-block count)."""
    defaults = {
        k: p.default for k, p in inspect.signature(EquiFlexFormer.__init__).parameters.items() if k not in _NOT_SHAPE
    }
    return {**defaults, **preset_kwargs(name)}


def _check_network_settings(
    num_classes: int, refine_dim: int, refine_mode: str, lifted_head: object, n_lifted_blocks: int, depth: int
) -> None:
    """The decoder's settings (the encoder checks its own in ``_check_encoder_settings``)."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("refine_dim", refine_dim)
    check_refine_mode(refine_mode)
    if not isinstance(lifted_head, bool):
        raise TypeError(f"lifted_head must be true or false, got {lifted_head!r}")
    if lifted_head and n_lifted_blocks != depth:
        raise ValueError(
            f"lifted_head runs the head on the lifted copies, so every block must be lifted: n_lifted_blocks="
            f"{n_lifted_blocks}, depth={depth}; set n_lifted_blocks={depth} or lifted_head=false"
        )


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside DDP and torch.compile wrappers, in any nesting."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(network, DistributedDataParallel):
            network = network.module
        elif isinstance(network, OptimizedModule):
            network = network._orig_mod
        else:
            return network
