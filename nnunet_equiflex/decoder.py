"""The light upsampling head: 1x1 projection of the tokens, upsampling by the token size, optional refinement.

Linear interpolation (bilinear in 2D, trilinear in 3D) by an integer factor per axis with
``align_corners=False`` samples output pixel ``i`` at ``(i + 0.5) / p - 0.5``, which is
symmetric about the centre of the grid, so it commutes with flips of every axis and (for equal
factors) transposes. The optional refinement is equivariant in one of two ways:

- ``"symmetric"``: ``3^n`` kernels averaged over their own images under the group, so a convolution
  with them commutes with every group element (zero padding is symmetric too). One pass, but every
  kernel is then an even function: it sees no signed gradient, only blur and curvature.
- ``"lifted"``: plain kernels, run on every transformed copy of its input and mapped back,
  ``R(z) = mean_g g^-1 C(g z)``. Its input ``z`` (the image and the upsampled token features) moves
  with the image, ``z(h x) = h z(x)``, so ``R(z(h x)) = mean_g g^-1 C(g h z) = h mean_g' g'^-1 C(g' z)
  = h R(z(x))`` (``g' = g h`` runs over the group). |G| passes of a small full-resolution CNN whose
  kernels may be oriented (edges, signed gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_equiflex.encoder import token_size_per_axis
from nnunet_equiflex.groups import group_average, group_elements


class _SymmetricConv:
    """A ``k^n`` convolution whose kernel is symmetrised over a group's action on the kernel (mixed into ConvNd)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, group: str = "d2") -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.elements = group_elements(group, self.weight.ndim - 2)

    def symmetric_weight(self) -> torch.Tensor:
        return group_average(self.weight, self.elements)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.symmetric_weight(), self.bias)


class SymmetricConv2d(_SymmetricConv, nn.Conv2d):
    pass


class SymmetricConv3d(_SymmetricConv, nn.Conv3d):
    pass


SYMMETRIC_CONVS = {2: SymmetricConv2d, 3: SymmetricConv3d}
PLAIN_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
UPSAMPLING_MODES = {2: "bilinear", 3: "trilinear"}
REFINE_MODES = ("symmetric", "lifted")


def _refinement_conv(mode: str, spatial_dims: int, in_channels: int, out_channels: int, group: str) -> nn.Module:
    if mode == "symmetric":
        return SYMMETRIC_CONVS[spatial_dims](in_channels, out_channels, 3, group)
    return PLAIN_CONVS[spatial_dims](in_channels, out_channels, 3, padding=1)


class Refinement(nn.Module):
    """Full-resolution residual correction from the upsampled features and the input image (see the module
    docstring for the two ways it stays equivariant)."""

    def __init__(
        self,
        in_channels: int,
        feature_dim: int,
        num_classes: int,
        hidden: int,
        group: str,
        spatial_dims: int = 2,
        mode: str = "symmetric",
    ) -> None:
        super().__init__()
        check_refine_mode(mode)
        self.conv1 = _refinement_conv(mode, spatial_dims, in_channels + feature_dim, hidden, group)
        self.act = nn.GELU()
        self.conv2 = _refinement_conv(mode, spatial_dims, hidden, num_classes, group)
        nn.init.zeros_(self.conv2.weight)  # start as the plain upsampled head
        nn.init.zeros_(self.conv2.bias)
        self.lifted_over = group_elements(group, spatial_dims) if mode == "lifted" else None

    def correction(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(z)))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        z = torch.cat([image, features], dim=1)
        if self.lifted_over is None or len(self.lifted_over) == 1:
            return self.correction(z)
        elements = self.lifted_over
        copies = self.correction(torch.cat([g.apply(z) for g in elements]))  # one batch of |G| * B
        back = [g.inverse().apply(c) for g, c in zip(elements, copies.chunk(len(elements)))]
        return torch.stack(back).mean(dim=0)


def check_refine_mode(mode: object) -> None:
    if mode not in REFINE_MODES:
        raise ValueError(f"unknown refine_mode {mode!r}; choose one of {', '.join(REFINE_MODES)}")


class LightDecoder(nn.Module):
    """Tokens ``(B, 1 + prod(grid), D)`` -> logits ``(B, num_classes, *spatial)``, 2D or 3D.

    The final LayerNorm lives in the encoder (``encoder.norm``, as in timm's layout).

    ``lifted_head``: the tokens are the ``|G|`` unpooled copies of an encoder whose blocks are all lifted
    (``EquiFlexEncoder.forward_copies``), and the head also predicts each token's ``p^n`` pixels
    (``pixel_head``, unpatchified, on top of the upsampled maps). Each copy's maps go back with ``g^-1`` and
    are averaged over ``G`` before the refinement: ``mean_g g^-1 H(g x)`` is equivariant whatever ``H``
    computes (the lifting identity of ``encoder.py``), so the sub-token detail may be oriented. Pooled tokens
    could not carry it: they no longer say which way the image was flipped.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        patch_size: int | tuple[int, ...],
        in_channels: int,
        refine: bool = False,
        refine_dim: int = 32,
        group: str = "d2",
        spatial_dims: int = 2,
        refine_mode: str = "symmetric",
        lifted_head: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.token_size = token_size_per_axis(patch_size, spatial_dims)
        self.num_classes = num_classes
        self.mode = UPSAMPLING_MODES[spatial_dims]
        self.head = nn.Linear(embed_dim, num_classes)
        self.refine_proj = nn.Linear(embed_dim, refine_dim) if refine else None
        self.refinement = (
            Refinement(in_channels, refine_dim, num_classes, refine_dim, group, spatial_dims, refine_mode)
            if refine
            else None
        )
        self.pixel_head = None
        if lifted_head:
            channels = num_classes + (refine_dim if refine else 0)
            self.pixel_head = nn.Linear(embed_dim, channels * math.prod(self.token_size))
            nn.init.zeros_(self.pixel_head.weight)  # start as the upsampled head
            nn.init.zeros_(self.pixel_head.bias)

    def _upsample(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return F.interpolate(maps, scale_factor=self.patch_size, mode=self.mode, align_corners=False)

    def _unpatchify(self, values: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """``(N, prod(grid), C * prod(token))`` -> ``(N, C, *(grid * token))``: each token's pixels in place."""
        n, token = len(grid), self.token_size
        x = values.reshape(values.shape[0], *grid, -1, *token)  # (N, g1..gn, C, t1..tn)
        order = [n + 1] + [a for axis in range(n) for a in (1 + axis, n + 2 + axis)]  # C, g1, t1, g2, t2, ...
        return x.permute(0, *order).reshape(values.shape[0], -1, *(g * t for g, t in zip(grid, token)))

    def token_maps(self, patches: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Class logits, then the refinement's features, at full resolution: ``(N, classes [+ refine_dim], ...)``."""
        values = (
            self.head(patches)
            if self.refine_proj is None
            else torch.cat([self.head(patches), self.refine_proj(patches)], dim=-1)
        )
        maps = self._upsample(values, grid)
        return maps if self.pixel_head is None else maps + self._unpatchify(self.pixel_head(patches), grid)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, ...], image: torch.Tensor, elements: list | None = None
    ) -> torch.Tensor:
        """``elements``: the group elements of the copies stacked in ``tokens`` (``lifted_head``), else None."""
        maps = self.token_maps(tokens[:, 1:], grid)
        if elements is not None:
            back = [g.inverse().apply(m) for g, m in zip(elements, maps.chunk(len(elements)))]
            maps = torch.stack(back).mean(dim=0)
        logits = maps[:, : self.num_classes]
        if self.refinement is not None:
            logits = logits + self.refinement(image, maps[:, self.num_classes :])
        return logits
