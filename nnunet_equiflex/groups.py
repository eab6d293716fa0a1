"""Discrete symmetry groups of the image grid and how their elements act.

Every element is written as ``g(x) = flip(transpose^t(x))``: an optional transpose of the two
spatial axes followed by optional flips of the (new) height and width axes. The flips alone
give D2 (the four reflections that map a rectangle onto itself); adding the transpose gives
D4 (flips and 90-degree rotations of a square). The same action applies to images
``(..., H, W)`` and to token grids ``(B, h, w, D)``; only the position of the spatial axes
differs, so each function takes the two axes it acts on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_NAMES = ("none", "d2", "d4")


@dataclass(frozen=True)
class GroupElement:
    """One element of a grid symmetry group: optional transpose, then optional flips."""

    transpose: bool = False
    flip_h: bool = False
    flip_w: bool = False

    @property
    def name(self) -> str:
        parts = [p for p, on in (("T", self.transpose), ("flipH", self.flip_h), ("flipW", self.flip_w)) if on]
        return "+".join(parts) or "identity"

    def inverse(self) -> GroupElement:
        # g = F_{h,w} T  =>  g^-1 = T F_{h,w} = F_{w,h} T (a transpose swaps which axis is flipped).
        if self.transpose:
            return GroupElement(True, self.flip_w, self.flip_h)
        return self

    def apply(self, x: torch.Tensor, axes: tuple[int, int] = (-2, -1)) -> torch.Tensor:
        """Act on ``x`` whose spatial axes (height, width) are ``axes``."""
        if self.transpose:
            x = x.transpose(*axes)
        dims = [a for a, on in zip(axes, (self.flip_h, self.flip_w)) if on]
        return x.flip(dims) if dims else x

    def apply_to_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Act on a flat token sequence ``(B, h*w, D)`` laid out row-major on ``grid``.

        Returns the transformed tokens and leaves the grid of the result implied: a transpose
        turns an ``h x w`` grid into ``w x h``.
        """
        b, n, d = tokens.shape
        grid_tokens = tokens.reshape(b, grid[0], grid[1], d)
        return self.apply(grid_tokens, axes=(1, 2)).reshape(b, n, d)

    def maps_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return (grid[1], grid[0]) if self.transpose else grid


def group_elements(group: str) -> tuple[GroupElement, ...]:
    """The elements of ``group`` with the identity first."""
    flips = tuple(GroupElement(False, fh, fw) for fh in (False, True) for fw in (False, True))
    if group == "none":
        return (GroupElement(),)
    if group == "d2":
        return flips
    if group == "d4":
        return flips + tuple(GroupElement(True, e.flip_h, e.flip_w) for e in flips)
    raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUP_NAMES)}")


def check_grid_supported(group: str, height: int, width: int) -> None:
    """D4 maps a square onto itself only; reject rectangles with the fix in the message."""
    if group == "d4" and height != width:
        raise ValueError(
            f"group 'd4' (flips and 90-degree rotations) needs a square input, got {height}x{width}; "
            "use group='d2' for rectangular patches or plan a square patch size"
        )
