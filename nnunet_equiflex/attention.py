"""Local-window attention masks and the two backends that consume them.

A mask is a pure function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` made by a ``generate_*``
factory that closes over the token geometry. The same function drives both backends:

- ``flex``: PyTorch FlexAttention with a ``BlockMask`` built once per geometry and device and
  cached, called through ``torch.compile`` (uncompiled flex materialises the full score
  matrix). Has no backward on CPU.
- ``sdpa``: ``F.scaled_dot_product_attention`` with a dense boolean mask evaluated from the
  same function (cached likewise). Works everywhere, with gradients.

``auto`` picks flex on CUDA and for CPU inference, sdpa where CPU needs gradients.

Token layouts (flex only): the grid tokens may be stored tile by tile instead of row-major
(``tiled_token_order``: ``t x t`` tiles, prefix tokens moved to the end) with the same mask
expressed in that index space (``generate_tiled_local_window_mask``) and blocks of ``t * t``
tokens, so that a block is one tile and its window touches a few neighbouring tiles. The set of
attended (query, key) pairs is unchanged, so the output is the row-major output permuted. The
caller permutes once for all local blocks (see ``EquiFlexEncoder.forward_local``). Measured on
CPU (``benchmarks/bench_attention.py``), 4x4 tiles with blocks of 16 beat every row-major block
size from 28x28 to 96x96 tokens; on CUDA the row-major layout with blocks of 128 stays the default
until a GPU measurement says otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "flex", "sdpa")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def generate_local_window_mask(
    grid_h: int, grid_w: int, window_radius: int, dilation: int = 1, num_prefix_tokens: int = 1
) -> MaskMod:
    """Each grid token sees the tokens ``dilation * (-r..r)`` rows and columns away; prefix
    tokens (CLS) see and are seen by all.

    Tokens ``0..num_prefix_tokens-1`` are prefix tokens; the rest lie row-major on a
    ``grid_h x grid_w`` grid. The window is symmetric in both axes, so attention with this
    mask commutes with flips (and transposes, on a square grid) of the token grid.
    Indices are only used arithmetically, so the function is safe on padded index ranges.
    """
    if window_radius < 0 or dilation < 1:
        raise ValueError(f"window_radius must be >= 0 and dilation >= 1, got {window_radius}, {dilation}")

    def local_window(b, h, q_idx, kv_idx):
        q_patch = q_idx - num_prefix_tokens
        kv_patch = kv_idx - num_prefix_tokens
        dy = q_patch // grid_w - kv_patch // grid_w
        dx = q_patch % grid_w - kv_patch % grid_w
        in_window = (dy.abs() <= window_radius * dilation) & (dx.abs() <= window_radius * dilation)
        if dilation > 1:
            in_window = in_window & (dy % dilation == 0) & (dx % dilation == 0)
        is_prefix = (q_patch < 0) | (kv_patch < 0)
        return in_window | is_prefix

    local_window.__name__ = f"local_window_{grid_h}x{grid_w}_r{window_radius}_d{dilation}_p{num_prefix_tokens}"
    return local_window


def dense_mask(mask_mod: MaskMod, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Evaluate ``mask_mod`` on all (query, key) pairs: a ``(seq_len, seq_len)`` bool tensor."""
    idx = torch.arange(seq_len, device=device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, idx[:, None], idx[None, :])


def tiled_token_order(grid_h: int, grid_w: int, tile: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """``order[new] = old`` over the whole sequence: grid tokens tile by tile (tiles row-major,
    row-major inside a tile; edge tiles of a grid that ``tile`` does not divide are smaller),
    then the prefix tokens."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    tiles_w = -(-grid_w // tile)
    key = ((ys // tile) * tiles_w + xs // tile) * tile * tile + (ys % tile) * tile + xs % tile
    grid_tokens = torch.argsort(key.flatten()) + num_prefix_tokens
    return torch.cat([grid_tokens, torch.arange(num_prefix_tokens)])


def generate_reordered_local_window_mask(
    grid_h: int,
    grid_w: int,
    window_radius: int,
    dilation: int,
    num_prefix_tokens: int,
    order: torch.Tensor,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """``generate_local_window_mask`` in the index space of a token order (``order[new] = old``).

    Looks up each index's row-major position; the table is padded past the sequence end because
    block masks evaluate the mask on indices rounded up to the block size."""
    base = generate_local_window_mask(grid_h, grid_w, window_radius, dilation, num_prefix_tokens)
    seq_len = order.numel()
    padded_len = -(-seq_len // 1024) * 1024 + 1024
    lookup = torch.cat([order.cpu(), torch.arange(seq_len, padded_len)]).to(device)

    def reordered_local_window(b, h, q_idx, kv_idx):
        return base(b, h, lookup[q_idx], lookup[kv_idx])

    reordered_local_window.__name__ = f"{base.__name__}_reordered"
    return reordered_local_window


def generate_tiled_local_window_mask(
    grid_h: int,
    grid_w: int,
    window_radius: int,
    dilation: int = 1,
    num_prefix_tokens: int = 1,
    tile: int = 4,
    device: torch.device | str = "cpu",
) -> MaskMod:
    """``generate_local_window_mask`` in the index space of ``tiled_token_order``."""
    order = tiled_token_order(grid_h, grid_w, tile, num_prefix_tokens)
    return generate_reordered_local_window_mask(
        grid_h, grid_w, window_radius, dilation, num_prefix_tokens, order, device
    )


def default_block_size(device: torch.device) -> int:
    # Row-major layout. Measured on 2 CPU cores (benchmarks/bench_attention.py): 16 and 32 beat 128
    # there; 128 matches the GPU kernel tiles.
    return 128 if device.type == "cuda" else 32


def default_token_layout(device: torch.device) -> str:
    """The flex layout ``auto`` stands for: 4x4 tiles on CPU (measured fastest), row-major on CUDA."""
    return "row" if device.type == "cuda" else "tile4"


def parse_token_layout(layout: str) -> int | None:
    """``"row"`` -> None, ``"tileN"`` -> N; anything else is an error naming the choices."""
    if layout == "row":
        return None
    if layout.startswith("tile") and layout[4:].isdigit() and int(layout[4:]) >= 1:
        return int(layout[4:])
    raise ValueError(f"unknown token layout {layout!r}; choose 'auto', 'row' or 'tileN' (for example 'tile4')")


def _mask_mod(geometry: tuple, tile: int | None, device: torch.device) -> MaskMod:
    if tile is None:
        return generate_local_window_mask(*geometry)
    return generate_tiled_local_window_mask(*geometry, tile=tile, device=device)


@functools.lru_cache(maxsize=64)
def _cached_dense_mask(geometry: tuple, device: torch.device, tile: int | None = None) -> torch.Tensor:
    grid_h, grid_w, _, _, prefix = geometry
    return dense_mask(_mask_mod(geometry, tile, device), prefix + grid_h * grid_w, device)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(geometry: tuple, device: torch.device, block_size: int, tile: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    grid_h, grid_w, _, _, prefix = geometry
    seq_len = prefix + grid_h * grid_w
    return create_block_mask(
        _mask_mod(geometry, tile, device),
        B=None,
        H=None,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=device,
        BLOCK_SIZE=block_size,
    )


@torch.compiler.disable
@functools.lru_cache(maxsize=64)
def cached_tiled_token_order(
    grid_h: int, grid_w: int, tile: int, num_prefix_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, inverse)`` of ``tiled_token_order`` on ``device``, built once per geometry."""
    order = tiled_token_order(grid_h, grid_w, tile, num_prefix_tokens).to(device)
    return order, torch.argsort(order)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def resolve_backend(backend: str, device: torch.device, needs_grad: bool) -> str:
    """Turn ``auto`` into a concrete backend; reject flex where it cannot run."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    cpu_training = device.type != "cuda" and needs_grad
    if backend == "auto":
        return "sdpa" if cpu_training else "flex"
    if backend == "flex" and cpu_training:
        raise RuntimeError(
            "attention_backend='flex' cannot compute gradients on CPU (FlexAttention has no CPU "
            "backward); use attention_backend='sdpa' or 'auto' for CPU training, or run on CUDA"
        )
    return backend


LocalMask = torch.Tensor | object  # a dense bool mask (sdpa) or a flex BlockMask


@torch.compiler.disable
def local_attention_mask(
    grid: tuple[int, int],
    window_radius: int,
    dilation: int,
    num_prefix_tokens: int,
    backend: str,
    tile: int | None,
    device: torch.device,
) -> LocalMask:
    """The cached mask of one geometry for a concrete ``backend``: a dense bool mask for sdpa, a
    ``BlockMask`` for flex (blocks of ``tile * tile`` tokens on CPU when tiled).

    Kept out of ``torch.compile``: when a caller compiles the whole network (nnU-Net does on
    CUDA), the mask is still built once and looked up, not traced into the graph and rebuilt on
    every call."""
    geometry = (grid[0], grid[1], window_radius, dilation, num_prefix_tokens)
    if backend == "sdpa":
        return _cached_dense_mask(geometry, device, tile)
    block_size = default_block_size(device)
    if tile is not None:  # one tile per block on CPU; on CUDA whole tiles per kernel-sized block
        block_size = tile * tile if device.type != "cuda" else -(-tile * tile // block_size) * block_size
    return _cached_block_mask(geometry, device, block_size, tile)


def attend_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LocalMask) -> torch.Tensor:
    """Attention under a mask from ``local_attention_mask`` (its type picks the backend)."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if torch.compiler.is_compiling():  # inside a caller's compiled graph: dynamo handles flex itself
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask)
    return _compiled_flex_attention()(q, k, v, block_mask=mask)


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window_radius: int,
    dilation: int = 1,
    num_prefix_tokens: int = 1,
    backend: str = "auto",
    tile: int | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v`` of shape ``(B, heads, S, head_dim)`` restricted to local windows.

    With ``tile``, the sequence is in ``tiled_token_order`` (and so is the output)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = resolve_backend(backend, q.device, needs_grad)
    mask = local_attention_mask(grid, window_radius, dilation, num_prefix_tokens, backend, tile, q.device)
    return attend_local(q, k, v, mask)
