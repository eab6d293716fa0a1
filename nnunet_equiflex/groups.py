"""Discrete symmetry groups of the image grid and how their elements act, in 2D and 3D.

Every element is written as ``g(x) = flip(transpose^t(x))``: an optional transpose of the last
two spatial axes followed by an optional flip of each (new) spatial axis. The flips alone give
``"flips"``: the ``2^n`` reflections that map an n-D box onto itself (in 2D the group D2 of
four elements, also called ``"d2"``; in 3D eight elements). Adding the transpose gives D4 (flips
and 90-degree rotations of a square, 2D only). The same action applies to images
``(..., *spatial)`` and to token grids ``(B, *grid, D)``; only the position of the spatial axes
differs, so each function takes the axes it acts on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

GROUP_NAMES = ("none", "d2", "d4", "flips")
SPATIAL_DIMS = (2, 3)
_AXIS_LETTERS = "DHW"  # the last n letters name the spatial axes of an n-D input


@dataclass(frozen=True)
class GroupElement:
    """One element of a grid symmetry group: optional transpose of the last two axes, then a flip flag per axis."""

    transpose: bool = False
    flips: tuple[bool, ...] = (False, False)

    @property
    def spatial_dims(self) -> int:
        return len(self.flips)

    @property
    def name(self) -> str:
        letters = _AXIS_LETTERS[-self.spatial_dims :]
        parts = ["T"] * self.transpose + [f"flip{a}" for a, on in zip(letters, self.flips) if on]
        return "+".join(parts) or "identity"

    def inverse(self) -> GroupElement:
        # g = F T  =>  g^-1 = T F = F' T, where F' flips the last two axes swapped (a transpose swaps them).
        if self.transpose:
            return GroupElement(True, self.flips[:-2] + (self.flips[-1], self.flips[-2]))
        return self

    def apply(self, x: torch.Tensor, axes: tuple[int, ...] | None = None) -> torch.Tensor:
        """Act on ``x`` whose spatial axes are ``axes`` (default: the last ``spatial_dims`` axes)."""
        axes = tuple(range(-self.spatial_dims, 0)) if axes is None else tuple(axes)
        if self.transpose:
            x = x.transpose(axes[-2], axes[-1])
        dims = [a for a, on in zip(axes, self.flips) if on]
        return x.flip(dims) if dims else x

    def apply_to_tokens(self, tokens: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Act on a flat token sequence ``(B, prod(grid), D)`` laid out row-major on ``grid``.

        Returns the transformed tokens and leaves the grid of the result implied: a transpose
        turns an ``h x w`` grid into ``w x h``.
        """
        b, n, d = tokens.shape
        grid_tokens = tokens.reshape(b, *grid, d)
        return self.apply(grid_tokens, axes=tuple(range(1, 1 + len(grid)))).reshape(b, n, d)

    def maps_grid(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        grid = tuple(grid)
        return grid[:-2] + (grid[-1], grid[-2]) if self.transpose else grid


def group_average(x: torch.Tensor, elements) -> torch.Tensor:
    """``mean_g g(x)`` over ``elements``, each acting on the last axes of ``x`` (a kernel or a table of window
    offsets): the result is invariant under every element of a group."""
    return torch.stack([g.apply(x) for g in elements]).mean(dim=0)


def check_group(group: str, spatial_dims: int = 2) -> None:
    """Reject a group name that is unknown or does not exist for ``spatial_dims``, naming the right value."""
    if group not in GROUP_NAMES:
        raise ValueError(f"unknown group {group!r}; choose one of {', '.join(GROUP_NAMES)}")
    if spatial_dims == 2:
        return
    if group == "d4":
        raise ValueError(
            f"group 'd4' (flips and 90-degree rotations of a square) is 2D-only, got spatial_dims={spatial_dims}; "
            "use group='flips' (the flips of every axis) or 'none'"
        )
    if group == "d2":
        raise ValueError(
            f"group 'd2' names the 4 flips of a 2D image; for spatial_dims={spatial_dims} use group='flips' "
            f"(the {2**spatial_dims} flips of all {spatial_dims} axes) or 'none'"
        )


def group_elements(group: str, spatial_dims: int = 2) -> tuple[GroupElement, ...]:
    """The elements of ``group`` acting on ``spatial_dims`` axes, with the identity first."""
    check_group(group, spatial_dims)
    flips = tuple(GroupElement(False, f) for f in itertools.product((False, True), repeat=spatial_dims))
    if group == "none":
        return flips[:1]
    if group == "d4":
        return flips + tuple(GroupElement(True, e.flips) for e in flips)
    return flips


def check_grid_supported(group: str, *sizes: int) -> None:
    """D4 maps a square onto itself only; reject rectangles with the fix in the message."""
    if group == "d4" and len(set(sizes)) > 1:
        raise ValueError(
            f"group 'd4' (flips and 90-degree rotations) needs a square input, got {'x'.join(map(str, sizes))}; "
            "use group='d2' for rectangular patches or plan a square patch size"
        )
