"""Local-window attention masks and the two backends that consume them.

A mask is a pure function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` made by a ``generate_*``
factory that closes over the token geometry. The same function drives both backends:

- ``flex``: PyTorch FlexAttention with a ``BlockMask`` built once per geometry and device and
  cached, called through ``torch.compile`` (uncompiled flex materialises the full score
  matrix). Has no backward on CPU.
- ``sdpa``: ``F.scaled_dot_product_attention`` with a dense boolean mask evaluated from the
  same function (cached likewise). Works everywhere, with gradients.

``auto`` picks flex on CUDA and for CPU inference, sdpa where CPU needs gradients.
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


def default_block_size(device: torch.device) -> int:
    # Measured on 2 CPU cores (DESIGN.md section 3): 32 beats 128 there; 128 matches GPU tiles.
    return 128 if device.type == "cuda" else 32


@functools.lru_cache(maxsize=64)
def _cached_dense_mask(geometry: tuple, device: torch.device) -> torch.Tensor:
    grid_h, grid_w, radius, dilation, prefix = geometry
    mask_mod = generate_local_window_mask(grid_h, grid_w, radius, dilation, prefix)
    return dense_mask(mask_mod, prefix + grid_h * grid_w, device)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(geometry: tuple, device: torch.device, block_size: int):
    from torch.nn.attention.flex_attention import create_block_mask

    grid_h, grid_w, radius, dilation, prefix = geometry
    mask_mod = generate_local_window_mask(grid_h, grid_w, radius, dilation, prefix)
    seq_len = prefix + grid_h * grid_w
    return create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device, BLOCK_SIZE=block_size
    )


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


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window_radius: int,
    dilation: int = 1,
    num_prefix_tokens: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q, k, v`` of shape ``(B, heads, S, head_dim)`` restricted to local windows."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = resolve_backend(backend, q.device, needs_grad)
    geometry = (grid[0], grid[1], window_radius, dilation, num_prefix_tokens)
    if backend == "sdpa":
        mask = _cached_dense_mask(geometry, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    block_mask = _cached_block_mask(geometry, q.device, default_block_size(q.device))
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
