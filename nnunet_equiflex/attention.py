"""Local-window attention masks and the backends that consume them.

A mask is a pure function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` made by a ``generate_*``
factory that closes over the token geometry. The same window drives every backend:

- ``flex``: PyTorch FlexAttention with a ``BlockMask`` built once per geometry and device and
  cached, called through ``torch.compile`` (uncompiled flex materialises the full score
  matrix). Has no backward on CPU.
- ``sdpa``: ``F.scaled_dot_product_attention`` with a dense boolean mask evaluated from the
  same function (cached likewise). Works everywhere, with gradients; cost quadratic in the tokens.
- ``window``: each grid query attends only to the keys of its own window plus the prefix
  tokens, one shifted copy of the key grid per window offset (``window_attention``), called
  through ``torch.compile`` (which fuses the offsets into one loop). Cost linear in the tokens,
  with gradients everywhere; the same (query, key) pairs as the mask, so the same function.

``auto`` picks flex on CUDA and window on CPU (training and inference; measured fastest there,
``benchmarks/bench_attention.py``).

Grids are 2D or 3D (``(2r+1)^n`` windows); everything above works on both. Token layouts (flex
only): the grid tokens may be stored tile by tile instead of row-major (``tiled_token_order``:
``t x t`` tiles in 2D, ``t x t x t`` in 3D, prefix tokens moved to the end) with the same mask
expressed in that index space (``generate_tiled_local_window_mask``) and blocks of ``t^n``
tokens, so that a block is one tile and its window touches a few neighbouring tiles. The set of
attended (query, key) pairs is unchanged, so the output is the row-major output permuted. The
caller permutes once for all local blocks (see ``EquiFlexEncoder.run_local_blocks``). Measured on
CPU (``benchmarks/bench_attention.py``), 4x4 tiles with blocks of 16 beat every row-major block
size from 28x28 to 96x96 tokens; in 3D 2x2x2 tiles win for 5x5x5 windows and row-major blocks of 16
for 3x3x3 ones (``default_token_layout``). On CUDA the row-major layout with blocks of 128 stays the
default until a GPU measurement says otherwise.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "flex", "sdpa", "window")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def generate_local_window_mask(
    grid_h: int, grid_w: int, window_radius: int, dilation: int = 1, num_prefix_tokens: int = 1
) -> MaskMod:
    """``generate_grid_window_mask`` on a 2D ``grid_h x grid_w`` grid."""
    return generate_grid_window_mask((grid_h, grid_w), window_radius, dilation, num_prefix_tokens)


def row_major_strides(grid: tuple[int, ...]) -> tuple[int, ...]:
    """Index step of each axis of a row-major grid (the last axis moves fastest)."""
    return tuple(math.prod(grid[axis + 1 :]) for axis in range(len(grid)))


def generate_grid_window_mask(
    grid: tuple[int, ...], window_radius: int, dilation: int = 1, num_prefix_tokens: int = 1
) -> MaskMod:
    """Each grid token sees the tokens ``dilation * (-r..r)`` steps away along every axis; prefix
    tokens (CLS) see and are seen by all.

    Tokens ``0..num_prefix_tokens-1`` are prefix tokens; the rest lie row-major on ``grid`` (2D
    or 3D). The window is symmetric in every axis, so attention with this mask commutes with
    flips of the token grid (and transposes, on a square 2D grid). Indices are only used
    arithmetically, so the function is safe on padded index ranges.
    """
    if window_radius < 0 or dilation < 1:
        raise ValueError(f"window_radius must be >= 0 and dilation >= 1, got {window_radius}, {dilation}")
    grid, reach = tuple(grid), window_radius * dilation
    strides = row_major_strides(grid)

    def local_window(b, h, q_idx, kv_idx):
        q_patch = q_idx - num_prefix_tokens
        kv_patch = kv_idx - num_prefix_tokens
        in_window = None
        for axis, (size, stride) in enumerate(zip(grid, strides)):
            q_coord, kv_coord = q_patch // stride, kv_patch // stride
            if axis:  # the first axis needs no modulo (and keeps padded indices off the grid)
                q_coord, kv_coord = q_coord % size, kv_coord % size
            delta = q_coord - kv_coord
            near = delta.abs() <= reach
            if dilation > 1:
                near = near & (delta % dilation == 0)
            in_window = near if in_window is None else in_window & near
        is_prefix = (q_patch < 0) | (kv_patch < 0)
        return in_window | is_prefix

    shape = "x".join(map(str, grid))
    local_window.__name__ = f"local_window_{shape}_r{window_radius}_d{dilation}_p{num_prefix_tokens}"
    return local_window


def generate_window_slot(
    grid: tuple[int, ...], window_radius: int, dilation: int = 1, num_prefix_tokens: int = 1
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``slot(q_idx, kv_idx)``: which offset of the window (row-major over ``window_offsets``) key ``kv_idx`` is
    from grid query ``q_idx``, or ``(2r+1)^n`` (no slot) for a prefix token on either side or a key outside the
    window: the index into a relative position bias padded with one zero entry. Arithmetic on indices only, like
    ``generate_grid_window_mask``, so it runs inside FlexAttention's ``score_mod`` and on index ranges alike."""
    grid, reach, side = tuple(grid), window_radius * dilation, 2 * window_radius + 1
    strides = row_major_strides(grid)
    no_slot = side ** len(grid)

    def window_slot(q_idx, kv_idx):
        q_patch, kv_patch = q_idx - num_prefix_tokens, kv_idx - num_prefix_tokens
        slot, outside = torch.zeros_like(q_idx), (q_patch < 0) | (kv_patch < 0)
        for axis, (size, stride) in enumerate(zip(grid, strides)):
            q_coord, kv_coord = q_patch // stride, kv_patch // stride
            if axis:
                q_coord, kv_coord = q_coord % size, kv_coord % size
            delta = kv_coord - q_coord
            outside = outside | (delta.abs() > reach) | (delta % dilation != 0)
            slot = slot * side + (delta // dilation + window_radius).clamp(0, side - 1)
        return torch.where(outside, no_slot, slot)

    return window_slot


def padded_bias(bias: torch.Tensor) -> torch.Tensor:
    """``(heads, K)`` -> ``(heads, K + 1)``: the last entry (0) is what ``generate_window_slot``'s "no slot" reads."""
    return F.pad(bias, (0, 1))


def dense_mask(mask_mod: MaskMod, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evaluate ``mask_mod`` on all (query, key) pairs: a ``(seq_len, seq_len)`` bool tensor."""
    idx = torch.arange(seq_len, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, idx[:, None], idx[None, :])


def tiled_token_order(grid: tuple[int, ...], tile: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """``order[new] = old`` over the whole sequence: grid tokens tile by tile (``t x t`` tiles in 2D,
    ``t x t x t`` in 3D; tiles row-major, row-major inside a tile; edge tiles of a grid that ``tile``
    does not divide are smaller), then the prefix tokens."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    grid = tuple(grid)
    coords = torch.meshgrid(*(torch.arange(size) for size in grid), indexing="ij")
    tiles_per_axis = tuple(-(-size // tile) for size in grid)
    tile_index = sum((c // tile) * s for c, s in zip(coords, row_major_strides(tiles_per_axis)))
    inside_index = sum((c % tile) * s for c, s in zip(coords, row_major_strides((tile,) * len(grid))))
    key = tile_index * tile ** len(grid) + inside_index
    grid_tokens = torch.argsort(key.flatten()) + num_prefix_tokens
    return torch.cat([grid_tokens, torch.arange(num_prefix_tokens)])


def generate_reordered_local_window_mask(
    grid: tuple[int, ...],
    window_radius: int,
    dilation: int,
    num_prefix_tokens: int,
    order: torch.Tensor,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """``generate_grid_window_mask`` in the index space of a token order (``order[new] = old``).

    Looks up each index's row-major position; the table is padded past the sequence end because
    block masks evaluate the mask on indices rounded up to the block size."""
    base = generate_grid_window_mask(grid, window_radius, dilation, num_prefix_tokens)
    lookup = _order_lookup(order, device)

    def reordered_local_window(b, h, q_idx, kv_idx):
        return base(b, h, lookup[q_idx], lookup[kv_idx])

    reordered_local_window.__name__ = f"{base.__name__}_reordered"
    return reordered_local_window


def _order_lookup(order: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``order`` padded past the sequence end with the identity (block masks evaluate rounded-up indices)."""
    seq_len = order.numel()
    padded_len = -(-seq_len // 1024) * 1024 + 1024
    return torch.cat([order.cpu(), torch.arange(seq_len, padded_len)]).to(device)


def generate_tiled_local_window_mask(
    grid: tuple[int, ...],
    window_radius: int,
    dilation: int = 1,
    num_prefix_tokens: int = 1,
    tile: int = 4,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """``generate_grid_window_mask`` in the index space of ``tiled_token_order`` (2D or 3D)."""
    order = tiled_token_order(grid, tile, num_prefix_tokens)
    return generate_reordered_local_window_mask(grid, window_radius, dilation, num_prefix_tokens, order, device)


def default_block_size(device: torch.device, spatial_dims: int = 2) -> int:
    """Block size of the row-major layout. Measured on 2 CPU cores (benchmarks/bench_attention.py): in 2D 16 and
    32 beat 128; in 3D 16 beats 8, 32, 64 and 128. 128 matches the GPU kernel tiles."""
    if device.type == "cuda":
        return 128
    return 32 if spatial_dims == 2 else 16


def default_token_layout(device: torch.device, spatial_dims: int = 2, window_radius: int = 2) -> str:
    """The flex layout ``auto`` stands for, as measured on 2 CPU cores (``benchmarks/bench_attention.py``): 4x4
    tiles in 2D; in 3D 2x2x2 tiles for windows of radius 2 and more (5x5x5), row-major (blocks of 16) for radius 1
    (3x3x3), where thin row-major blocks skip more key blocks than cubes do. Row-major on CUDA (not measured)."""
    if device.type == "cuda":
        return "row"
    if spatial_dims == 2:
        return "tile4"
    return "tile2" if window_radius >= 2 else "row"


def parse_token_layout(layout: str) -> int | None:
    """``"row"`` -> None, ``"tileN"`` -> N; anything else is an error naming the choices."""
    if layout == "row":
        return None
    if layout.startswith("tile") and layout[4:].isdigit() and int(layout[4:]) >= 1:
        return int(layout[4:])
    raise ValueError(f"unknown token layout {layout!r}; choose 'auto', 'row' or 'tileN' (for example 'tile4')")


def split_geometry(geometry: tuple[int, ...]) -> tuple[tuple[int, ...], int, int, int]:
    """``(*grid, radius, dilation, prefix)`` -> ``(grid, radius, dilation, prefix)``: the flat key of the caches."""
    *grid, radius, dilation, prefix = geometry
    return tuple(grid), radius, dilation, prefix


def _mask_mod(geometry: tuple, tile: int | None, device: torch.device) -> MaskMod:
    grid, radius, dilation, prefix = split_geometry(geometry)
    if tile is None:
        return generate_grid_window_mask(grid, radius, dilation, prefix)
    return generate_tiled_local_window_mask(grid, radius, dilation, prefix, tile=tile, device=device)


def _slot_fn(geometry: tuple, tile: int | None, device: torch.device) -> Callable:
    """``generate_window_slot`` of ``geometry`` in the index space of the layout (row-major or ``tile``)."""
    grid, radius, dilation, prefix = split_geometry(geometry)
    slot = generate_window_slot(grid, radius, dilation, prefix)
    if tile is None:
        return slot
    lookup = _order_lookup(tiled_token_order(grid, tile, prefix), device)
    return lambda q_idx, kv_idx: slot(lookup[q_idx], lookup[kv_idx])


def _sequence_length(geometry: tuple) -> int:
    grid, _, _, prefix = split_geometry(geometry)
    return prefix + math.prod(grid)


@functools.lru_cache(maxsize=64)
def _cached_dense_mask(geometry: tuple, device: torch.device, tile: int | None = None) -> torch.Tensor:
    return dense_mask(_mask_mod(geometry, tile, device), _sequence_length(geometry), device)


@functools.lru_cache(maxsize=64)
def _cached_dense_slots(geometry: tuple, device: torch.device, tile: int | None = None) -> torch.Tensor:
    idx = torch.arange(_sequence_length(geometry), device=device)
    return _slot_fn(geometry, tile, device)(idx[:, None], idx[None, :])


@dataclass(frozen=True, eq=False)
class DenseMask:
    """What the sdpa backend needs of one geometry: the dense boolean mask and, for a relative position bias, each
    (query, key) pair's window slot (``generate_window_slot``)."""

    allowed: torch.Tensor
    geometry: tuple
    tile: int | None = None

    def attn_mask(self, bias: torch.Tensor | None) -> torch.Tensor:
        """The boolean mask, or with ``bias`` ``(heads, K)`` a float mask ``(heads, S, S)``: the bias, -inf outside
        (the slots are built on first use, once per geometry)."""
        if bias is None:
            return self.allowed
        slots = _cached_dense_slots(self.geometry, self.allowed.device, self.tile)
        return padded_bias(bias)[:, slots].masked_fill(~self.allowed, float("-inf"))


@functools.lru_cache(maxsize=64)
def _cached_block_mask(geometry: tuple, device: torch.device, block_size: int, tile: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    seq_len = _sequence_length(geometry)
    block_mask = create_block_mask(
        _mask_mod(geometry, tile, device),
        B=None,
        H=None,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=device,
        BLOCK_SIZE=block_size,
    )
    # The BlockMask keeps only its mask_mod; the relative position bias (and its sdpa fallback) need the geometry.
    block_mask.equiflex_geometry = (geometry, tile)
    return block_mask


_cached_slot_fn = functools.lru_cache(maxsize=64)(_slot_fn)


@torch.compiler.disable
@functools.lru_cache(maxsize=64)
def cached_tiled_token_order(
    grid: tuple[int, ...], tile: int, num_prefix_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)`` of ``tiled_token_order`` on ``device``, built once per geometry."""
    order = tiled_token_order(grid, tile, num_prefix_tokens).to(device)
    return order, torch.argsort(order)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return backend


def resolve_backend(backend: str, device: torch.device, needs_grad: bool) -> str:
    """Turn ``auto`` into a concrete backend; reject flex where it cannot run."""
    check_backend(backend)
    if backend == "auto":
        backend = "flex" if device.type == "cuda" else "window"
    elif backend == "flex" and device.type != "cuda" and needs_grad:
        raise RuntimeError(
            "attention_backend='flex' cannot compute gradients on CPU (FlexAttention has no CPU "
            "backward); use attention_backend='window', 'sdpa' or 'auto' for CPU training, or run on CUDA"
        )
    if backend == "flex" and not _flex_attention.use_primary(device.type):
        return "sdpa"  # flex failed on this device type earlier (logged then; see attend_flex)
    return backend


# ---------------------------------------------------------------------------------------------------------------
# window: linear-cost local attention


def window_offsets(window_radius: int, dilation: int, spatial_dims: int = 2) -> list[tuple[int, ...]]:
    """The window's offsets, one per axis, row-major: ``dilation * (-r..r)`` along every axis."""
    steps = [dilation * i for i in range(-window_radius, window_radius + 1)]
    return list(itertools.product(steps, repeat=spatial_dims))


def window_key_bias(*geometry: int) -> torch.Tensor:
    """``(prod(grid), K)``: 0 where a query's window offset ``k`` lands inside the grid, -inf outside.

    ``geometry`` is the grid sizes (one per axis), then the window radius and dilation."""
    *grid, window_radius, dilation = geometry
    coords = torch.meshgrid(*(torch.arange(size) for size in grid), indexing="ij")
    columns = []
    for offset in window_offsets(window_radius, dilation, len(grid)):
        inside = torch.ones(grid, dtype=torch.bool)
        for coord, step, size in zip(coords, offset, grid):
            inside &= (coord + step >= 0) & (coord + step < size)
        columns.append(torch.where(inside, 0.0, float("-inf")))
    return torch.stack(columns, dim=-1).flatten(0, len(grid) - 1)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    rel_bias: torch.Tensor | None,
    *geometry: int,
) -> torch.Tensor:
    """Local-window attention from the window's keys only (prefix tokens first, grid row-major).

    ``geometry`` is the grid sizes (one per axis, 2D or 3D), then window radius, dilation and the
    number of prefix tokens. Grid query ``y`` scores the keys at ``y + offset`` for the window
    offsets (a shifted view of the zero-padded key grid per offset; ``key_bias`` removes those
    outside the grid; ``rel_bias``, ``(heads, K)`` or None, adds a learned bias per head and window
    offset) and the prefix keys, in one softmax; prefix queries attend to every token.
    Exactly the pairs of ``generate_grid_window_mask``, so the result equals masked SDPA; the work
    is ``(K + prefix)`` keys per query instead of the whole sequence."""
    grid, window_radius, dilation, p = split_geometry(geometry)
    b, heads, seq, dim = q.shape
    n, pad = len(grid), window_radius * dilation
    offsets = window_offsets(window_radius, dilation, n)

    def grid_of(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, p:].reshape(b * heads, *grid, dim)

    query = grid_of(q) * dim**-0.5
    keys = F.pad(grid_of(k), (0, 0) + (pad, pad) * n)
    values = F.pad(grid_of(v), (0, 0) + (pad, pad) * n)

    def shifted(t: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
        return t[(slice(None), *(slice(pad + o, pad + o + size) for o, size in zip(offset, grid)))]

    local_scores = torch.stack([(query * shifted(keys, o)).sum(-1) for o in offsets], dim=-1)
    prefix_k = k[:, :, :p].reshape(b * heads, p, dim)
    prefix_v = v[:, :, :p].reshape(b * heads, p, dim)
    prefix_scores = query.flatten(1, n) @ prefix_k.transpose(1, 2)  # (b*heads, prod(grid), p)
    local_scores = local_scores.flatten(1, n) + key_bias
    if rel_bias is not None:
        local_scores = (local_scores.unflatten(0, (b, heads)) + rel_bias[:, None]).flatten(0, 1)
    weights = torch.cat([local_scores, prefix_scores], dim=-1).softmax(dim=-1)
    local_weights = weights[..., : len(offsets)].reshape(b * heads, *grid, len(offsets))
    out = sum(local_weights[..., i, None] * shifted(values, o) for i, o in enumerate(offsets))
    out = out.flatten(1, n) + weights[..., len(offsets) :] @ prefix_v
    prefix_out = F.scaled_dot_product_attention(q[:, :, :p], k, v)
    return torch.cat([prefix_out, out.reshape(b, heads, math.prod(grid), dim)], dim=2)


@dataclass(frozen=True, eq=False)
class WindowMask:
    """What the window backend needs of one geometry: the grid, the window, the border bias and,
    for a tiled token order, the permutations to row-major (``to_row``) and back (``from_row``)."""

    grid: tuple[int, ...]
    window_radius: int
    dilation: int
    num_prefix_tokens: int
    key_bias: torch.Tensor
    to_row: torch.Tensor | None = None
    from_row: torch.Tensor | None = None


@functools.lru_cache(maxsize=64)
def _cached_window_mask(geometry: tuple, device: torch.device, tile: int | None = None) -> WindowMask:
    grid, radius, dilation, prefix = split_geometry(geometry)
    bias = window_key_bias(*grid, radius, dilation).to(device)
    to_row = from_row = None
    if tile is not None:  # layout index -> row-major index and back
        order = tiled_token_order(grid, tile, prefix)
        to_row, from_row = torch.argsort(order).to(device), order.to(device)
    return WindowMask(grid, radius, dilation, prefix, bias, to_row, from_row)


WINDOW_COMPILE_ENV = "EQUIFLEX_WINDOW_COMPILE"


def _first_line(error: Exception, limit: int = 300) -> str:
    """``Type: message`` on one line (compiler errors run to pages)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _FallbackOnFailure:
    """``primary(*args)``, until it fails on a device type; from then on ``fallback(*args)`` on that device type.

    Both compute the same function, so a failure of the faster way (a compiler or kernel error) costs speed, not
    the run: the call that failed is answered by ``fallback``, one warning names the error, and later calls go
    straight to ``fallback`` without trying ``primary`` again. An error of the inputs themselves raises from
    ``fallback`` as it would on its own. The try costs nothing on the path where ``primary`` works."""

    def __init__(self, primary: Callable, fallback: Callable, what: str, instead: str) -> None:
        self.primary, self.fallback = primary, fallback
        self.what, self.instead = what, instead
        self.failed: dict[str, str] = {}  # device type -> the error of its first failure

    def use_primary(self, device_type: str) -> bool:
        return device_type not in self.failed

    def __call__(self, *args):
        device_type = args[0].device.type
        if not self.use_primary(device_type):
            return self.fallback(*args)
        try:
            return self.primary(*args)
        except Exception as error:
            result = self.fallback(*args)
            self.failed[device_type] = _first_line(error)
            logger.warning(
                "%s failed on %s (%s); using %s from now on", self.what, device_type, self.failed[device_type],
                self.instead,
            )  # fmt: skip
            return result


class _CompiledOrEager(_FallbackOnFailure):
    """``torch.compile(fn)``, falling back to ``fn`` itself (with one warning) if compiling fails,
    for example without a C++ compiler; inside a caller's compiled graph ``fn`` is traced as is.

    ``EQUIFLEX_WINDOW_COMPILE=0`` skips compiling: no compile wait (about 20-40 s per input shape
    on 2 CPU cores), slower calls. The tests use it for their many tiny shapes."""

    def __init__(self, fn: Callable) -> None:
        super().__init__(self._compiled_call, fn, f"torch.compile of {fn.__name__}", "it uncompiled")
        self.fn = fn
        self.compiled: Callable | None = None

    def use_primary(self, device_type: str) -> bool:
        compile_wanted = os.environ.get(WINDOW_COMPILE_ENV, "1") != "0"
        return compile_wanted and not torch.compiler.is_compiling() and super().use_primary(device_type)

    def _compiled_call(self, *args):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False)
        return self.compiled(*args)


_window_attention = _CompiledOrEager(window_attention)


def attend_window(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: WindowMask, bias: torch.Tensor | None = None
) -> torch.Tensor:
    if mask.to_row is not None:
        q, k, v = q[:, :, mask.to_row], k[:, :, mask.to_row], v[:, :, mask.to_row]
    geometry = (*mask.grid, mask.window_radius, mask.dilation, mask.num_prefix_tokens)
    out = _window_attention(q, k, v, mask.key_bias, bias, *geometry)
    return out if mask.from_row is None else out[:, :, mask.from_row]


LocalMask = DenseMask | WindowMask | object  # a DenseMask (sdpa), a WindowMask or a flex BlockMask


@torch.compiler.disable
def local_attention_mask(
    grid: tuple[int, ...],
    window_radius: int,
    dilation: int,
    num_prefix_tokens: int,
    backend: str,
    tile: int | None,
    device: torch.device,
) -> LocalMask:
    """The cached mask of one geometry for a concrete ``backend``: a ``DenseMask`` for sdpa, a
    ``WindowMask`` for window, a ``BlockMask`` for flex (blocks of one tile, ``tile ** len(grid)``
    tokens, on CPU when tiled).

    Kept out of ``torch.compile``: when a caller compiles the whole network (nnU-Net does on
    CUDA), the mask is still built once and looked up, not traced into the graph and rebuilt on
    every call."""
    geometry = (*grid, window_radius, dilation, num_prefix_tokens)
    if backend == "sdpa":
        return DenseMask(_cached_dense_mask(geometry, device, tile), geometry, tile)
    if backend == "window":
        return _cached_window_mask(geometry, device, tile)
    block_size = default_block_size(device, len(grid))
    if tile is not None:  # one tile per block on CPU; on CUDA whole tiles per kernel-sized block
        tile_tokens = tile ** len(grid)
        block_size = tile_tokens if device.type != "cuda" else -(-tile_tokens // block_size) * block_size
    return _cached_block_mask(geometry, device, block_size, tile)


def attend_local(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LocalMask, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention under a mask from ``local_attention_mask`` (its type picks the backend), plus ``bias``
    ``(heads, (2r+1)^n)``, a relative position bias per window offset (``window_offsets``' order), if given."""
    if isinstance(mask, DenseMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.attn_mask(bias))
    if isinstance(mask, WindowMask):
        return attend_window(q, k, v, mask, bias)
    return attend_flex(q, k, v, mask, bias)


def _flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return _compiled_flex_attention()(q, k, v, block_mask=mask)
    slot, table = _cached_slot_fn(*mask.equiflex_geometry, q.device), padded_bias(bias)

    def relative_position(score, b, h, q_idx, kv_idx):
        return score + table[h, slot(q_idx, kv_idx)]

    return _compiled_flex_attention()(q, k, v, score_mod=relative_position, block_mask=mask)


@functools.lru_cache(maxsize=64)
def _dense_mask_of(mask_mod: MaskMod, seq_len: int, device: torch.device) -> torch.Tensor:
    return dense_mask(mask_mod, seq_len, device)


def _sdpa_under_block_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, bias=None) -> torch.Tensor:
    """What flex computes under ``mask`` (and ``bias``), through SDPA with the dense mask of the same geometry."""
    if bias is None:
        dense = _dense_mask_of(mask.mask_mod, mask.seq_lengths[0], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    geometry, tile = mask.equiflex_geometry
    dense = DenseMask(_cached_dense_mask(geometry, q.device, tile), geometry, tile)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense.attn_mask(bias))


# A FlexAttention failure (no working Triton, an old driver, a shape its kernels do not support) falls back to
# the sdpa backend: this call through the dense mask, later forward passes through ``resolve_backend``.
_flex_attention = _FallbackOnFailure(
    _flex_call, _sdpa_under_block_mask, "FlexAttention", "the sdpa backend for the local attention (same outputs)"
)


@torch.compiler.disable
def attend_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Compiled flex under a ``BlockMask``, or SDPA once flex has failed on this device type.

    Kept out of a caller's compiled graph (nnU-Net compiles the whole network on CUDA): inside it, a flex
    compile error would surface from the caller's graph, where nothing can fall back. Flex is compiled on its
    own here, once per shape."""
    return _flex_attention(q, k, v, mask, bias)


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, ...],
    window_radius: int,
    dilation: int = 1,
    num_prefix_tokens: int = 1,
    backend: str = "auto",
    tile: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v`` of shape ``(B, heads, S, head_dim)`` restricted to local windows, plus a relative
    position ``bias`` ``(heads, (2r+1)^n)`` per window offset if given.

    With ``tile``, the sequence is in ``tiled_token_order`` (and so is the output)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = resolve_backend(backend, q.device, needs_grad)
    mask = local_attention_mask(grid, window_radius, dilation, num_prefix_tokens, backend, tile, q.device)
    return attend_local(q, k, v, mask, bias)
