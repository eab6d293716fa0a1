"""Transformer building blocks in timm's layout: patch embedding, attention, MLP, LayerScale,
stochastic depth and the pre-norm block.

Names follow timm's VisionTransformer (``patch_embed.proj``, ``attn.qkv``, ``mlp.fc1`` ...), so
foreign checkpoints map by renaming. ``Attention`` is global, or local under a mask from
``attention.local_attention_mask``; nothing here knows about groups or token grids.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_equiflex.attention import LocalMask, attend_local
from nnunet_equiflex.groups import group_average

CONVS = {2: nn.Conv2d, 3: nn.Conv3d}  # spatial dims -> convolution


class PatchEmbed(nn.Module):
    """Non-overlapping patches (token size per axis, 2D or 3D) projected to ``embed_dim`` (a strided convolution)."""

    def __init__(
        self, in_channels: int, embed_dim: int, patch_size: int | tuple[int, ...], spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = CONVS[spatial_dims](in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, prod(grid), D)

    def forward_symmetrised(self, x: torch.Tensor, elements) -> torch.Tensor:
        """The embedding with its filter averaged over ``elements`` (objects with ``apply``, acting
        on the filter's spatial axes as on an image): one pass that equals the mean over ``g`` of
        ``g^-1 embed(g x)`` on the token grid."""
        weight = group_average(self.proj.weight, elements)
        return self.proj._conv_forward(x, weight, self.proj.bias).flatten(2).transpose(1, 2)


INSTANCE_NORMS = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
STEM_NORMS = ("instance", "channel")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel (voxel) on its own, affine: no statistic spans space, so what a
    stem computes at one place does not depend on the rest of the image (instance norm's statistics do)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


def check_stem_norm(kind: object) -> None:
    if kind not in STEM_NORMS:
        raise ValueError(f"unknown stem_norm {kind!r}; choose one of {', '.join(STEM_NORMS)}")


def _stem_norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    check_stem_norm(kind)
    if kind == "instance":
        return INSTANCE_NORMS[spatial_dims](channels, affine=True)
    return ChannelNorm(channels)


class ConvStem(nn.Module):
    """Overlapping convolutions instead of the non-overlapping patch projection ("early convolutions", Xiao et al.
    2021): 3x3 (3D 3x3x3) convolutions of stride 2 on every axis whose token size is not reached yet, each followed
    by instance normalisation (affine, per image and channel, as in nnU-Net's CNN) and GELU, then a 1x1 projection
    to ``embed_dim``. Token sizes must be powers of 2. Each token then sees a window wider than its own pixels, and
    edges that straddle token boundaries reach it whole. Not linear, so a lifting through it runs every copy."""

    def __init__(self, in_channels: int, embed_dim: int, token_size: tuple[int, ...], norm: str = "instance") -> None:
        super().__init__()
        n, channels, layers, hidden = len(token_size), in_channels, [], self.hidden_channels(embed_dim)
        for stride in self.strides(token_size):
            layers += [
                CONVS[n](channels, hidden, kernel_size=3, stride=stride, padding=1),
                _stem_norm(norm, n, hidden),
                nn.GELU(),
            ]
            channels = hidden
        self.stages = nn.Sequential(*layers)
        self.proj = CONVS[n](channels, embed_dim, kernel_size=1)

    @staticmethod
    def hidden_channels(embed_dim: int) -> int:
        return max(embed_dim // 2, 1)

    @staticmethod
    def strides(token_size: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The stride of each stage: 2 on every axis whose token size is not reached yet, else 1."""
        remaining, strides = list(token_size), []
        while any(r > 1 for r in remaining):
            strides.append(tuple(2 if r > 1 else 1 for r in remaining))
            remaining = [r // s for r, s in zip(remaining, strides[-1])]
        return strides

    @classmethod
    def stage_sizes(cls, size: tuple[int, ...], token_size: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The spatial size after each stage, for an input of ``size`` (a multiple of the token size)."""
        sizes = []
        for stride in cls.strides(token_size):
            size = tuple(s // t for s, t in zip(size, stride))
            sizes.append(size)
        return sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stages(x)).flatten(2).transpose(1, 2)  # (B, prod(grid), D)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT/DINOv2); ``gamma`` as in timm."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; global, or local on a token grid when ``grid`` is given."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias: nn.Parameter | None = None  # (heads, (2r+1)^n) of a local block, see add_relative_position
        self.rel_pos_symmetric_over: list | None = None

    def add_relative_position(self, window: tuple[int, ...], symmetric_over: list | None = None) -> None:
        """Learn a bias per head and offset of a local ``window`` (``(2r+1,) * n``), added to the attention scores
        (zero at initialisation). ``symmetric_over``: group elements to average the bias table over (its image
        under each flip or transpose of the offsets), for blocks that must commute with them on their own."""
        self.rel_pos_bias = nn.Parameter(torch.zeros(self.num_heads, math.prod(window)))
        self.rel_pos_window = tuple(window)
        self.rel_pos_symmetric_over = symmetric_over

    def relative_position_bias(self) -> torch.Tensor | None:
        """``(heads, (2r+1)^n)`` (symmetrised where asked), or None without a relative position bias."""
        if self.rel_pos_bias is None or not self.rel_pos_symmetric_over:
            return self.rel_pos_bias
        table = self.rel_pos_bias.reshape(self.num_heads, *self.rel_pos_window)
        return group_average(table, self.rel_pos_symmetric_over).flatten(1)

    def forward(self, x: torch.Tensor, mask: LocalMask | None = None) -> torch.Tensor:
        """Global attention, or local attention under ``mask`` (from ``local_attention_mask``)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = attend_local(q, k, v, mask, self.relative_position_bias())
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block (timm layout), with optional LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        norm_eps: float,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: LocalMask | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def init_weights(module: nn.Module) -> None:
    """timm's initialisation of linear layers and LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
