"""Gaussian-Mixture-Ring (GMR) convolutions and the GMR patch embedding (Equi-ViT).

A GMR kernel is radially symmetric: for every (output, input) channel pair it is a weighted
sum of concentric Gaussian rings, ``k(y, x) = sum_r w_r exp(-(d(y, x) - r)^2 / (2 sigma^2))``,
with ``d`` the distance to the kernel centre. For an even kernel size the centre lies between
pixels, so in both cases the sampled kernel is exactly invariant to flips and transposes of
its two axes (D4), and a convolution with it commutes with D4 wherever it samples the input
at positions symmetric about the image centre.

Where the centres land. A layer with kernel ``k``, stride ``s`` and symmetric zero padding
``pad`` reads its input (``m`` positions) around ``i * s + (k - 1) / 2 - pad`` for output
``i = 0..n-1``. These centres are symmetric about the input's centre ``(m - 1) / 2`` iff
``2 pad = k - m + (n - 1) s``, and then the right padding needed for ``n`` outputs equals
``pad``: zero padding is symmetric as well, so the layer commutes with flips (and transposes
on squares). ``GMRPatchEmbed`` picks ``n`` per layer so that this holds for every input that
is a multiple of the token size ``p``, with the last layer giving exactly ``H/p x W/p``
outputs; symmetric centres at spacing ``p`` with ``H/p`` of them are exactly the token
centres ``p t + (p - 1) / 2`` of the linear patch embedding. Example, ``[6, 11]`` at strides
``(1, 8)``: the 6x6 layer (pad 3) samples the ``H + 1`` pixel corners, the 11x11 layer (pad 1)
then lands on the token centres. An even stride needs ``k - m`` even (a parity check; the
constructor names the fix when a combination cannot be centred).

Pointwise nonlinearities commute with the group, so the whole embedding satisfies
``P(g x) = g P(x)`` for every ``g`` of D4 (to float rounding), also without any lifting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def ring_basis(kernel_size: int, num_rings: int) -> torch.Tensor:
    """``(num_rings, k, k)`` Gaussian rings with radii evenly spaced from 0 to ``(k - 1) / 2``."""
    if kernel_size < 1 or num_rings < 1:
        raise ValueError(f"kernel_size and num_rings must be >= 1, got {kernel_size}, {num_rings}")
    centre = (kernel_size - 1) / 2
    coords = torch.arange(kernel_size, dtype=torch.float64) - centre
    dist = torch.sqrt(coords[:, None] ** 2 + coords[None, :] ** 2)
    radii = torch.linspace(0.0, centre, num_rings, dtype=torch.float64)
    # Neighbouring rings overlap by about one standard deviation: a smooth radial profile.
    sigma = max(centre / max(num_rings - 1, 1), 0.5)
    basis = torch.exp(-((dist[None] - radii[:, None, None]) ** 2) / (2 * sigma**2))
    return basis.float()


def symmetric_padding(kernel_size: int, stride: int, size_offset: int, out_offset: int) -> int:
    """The padding that centres a layer's samples, for inputs of ``m = M + size_offset`` positions
    and ``n = M / stride + out_offset`` outputs (``M`` any multiple of ``stride``); ``-1`` if none."""
    twice = kernel_size - size_offset + (out_offset - 1) * stride
    return twice // 2 if twice >= 0 and twice % 2 == 0 else -1


class GMRConv2d(nn.Module):
    """Convolution with radially symmetric Gaussian-Mixture-Ring kernels.

    Learned parameters: ``ring_weight`` ``(out, in, rings)`` and ``bias`` ``(out,)``; the kernel
    ``(out, in, k, k)`` is ``ring_weight @ basis`` with a fixed ring basis.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_rings: int | None = None,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        num_rings = num_rings or kernel_size // 2 + 1
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.register_buffer("basis", ring_basis(kernel_size, num_rings), persistent=False)
        self.ring_weight = nn.Parameter(torch.empty(out_channels, in_channels, num_rings))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        # Variance-preserving start: E[sum of squared kernel entries] = 1 / fan_in channels.
        energy = self.basis.pow(2).sum().item()
        nn.init.normal_(self.ring_weight, std=1.0 / math.sqrt(in_channels * energy))

    def weight(self) -> torch.Tensor:
        return torch.einsum("oir,ryx->oiyx", self.ring_weight, self.basis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        out_channels, in_channels, rings = self.ring_weight.shape
        return (
            f"{in_channels}, {out_channels}, kernel_size={self.kernel_size}, rings={rings}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class GMRPatchEmbed(nn.Module):
    """Tokens at stride ``patch_size`` from a stack of GMR convolutions with GELU in between.

    ``kernel_sizes`` lists the layers (Equi-ViT's best: ``[6, 11]``); ``strides`` defaults to 1
    for every layer but the last, which takes the rest of ``patch_size``. The output is the
    token grid ``H/p x W/p`` of the linear embedding, flattened to ``(B, h*w, embed_dim)``.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        patch_size: int,
        kernel_sizes: Sequence[int] = (6, 11),
        num_rings: int | None = None,
        hidden_dim: int = 32,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        kernel_sizes = [int(k) for k in kernel_sizes]
        if not kernel_sizes:
            raise ValueError("gmr_kernel_sizes must name at least one layer, e.g. [6, 11]")
        if strides is None:
            strides = [1] * (len(kernel_sizes) - 1) + [patch_size]
        strides = [int(s) for s in strides]
        if len(strides) != len(kernel_sizes) or math.prod(strides) != patch_size:
            raise ValueError(
                f"gmr strides {strides} must have one entry per kernel size {kernel_sizes} and multiply to the "
                f"token size {patch_size}"
            )
        self.patch_size = patch_size
        layers: list[nn.Module] = []
        channels, size_offset = in_channels, 0  # the layer input has M + size_offset positions per axis
        for index, (kernel, stride) in enumerate(zip(kernel_sizes, strides)):
            last = index == len(kernel_sizes) - 1
            # The last layer must give exactly M / stride tokens; earlier ones may keep one extra position.
            candidates = [0] if last else [size_offset // stride, size_offset // stride + 1]
            offsets = [o for o in candidates if symmetric_padding(kernel, stride, size_offset, o) >= 0]
            if not offsets:
                raise ValueError(
                    f"GMR layer {index} (kernel {kernel}, stride {stride}) cannot be centred on the token grid: "
                    f"with an even stride the kernel size must have the parity of its input size; use kernel size "
                    f"{kernel + 1} or {kernel - 1}, or strides with stride 1 before the last layer"
                )
            padding = symmetric_padding(kernel, stride, size_offset, offsets[0])
            out_channels = embed_dim if last else hidden_dim
            layers.append(GMRConv2d(channels, out_channels, kernel, num_rings, stride, padding))
            if not last:
                layers.append(nn.GELU())
            channels, size_offset = out_channels, offsets[0]
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
