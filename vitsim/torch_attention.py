"""The torch path for attention distance (conventions §5): CPU, fallback, and the benchmark baseline.

Plain torch ops: the maps path multiplies each block of attention rows by the matching rows of
the distance table and sums; the q/k path materialises `softmax(q kᵀ · scale)` block by block
and does the same. Work is chunked over the B·H maps and over query rows so the temporaries
stay near `CHUNK_BYTES` whatever the input size. Products and sums run in float32 (float64
for float64 input). Distances are in patch units; the caller multiplies by the patch size.
"""

from __future__ import annotations

import torch

# Bytes of one float temporary (a block of attention rows, scores or products).
CHUNK_BYTES = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 otherwise (half inputs are upcast per chunk)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def distance_rows(grid: tuple[int, int], start: int, stop: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """`(stop − start, gh·gw)` distances in patch units from spatial queries `start..stop` to
    every patch, from the row-major grid indices."""
    gw = grid[1]
    s = grid[0] * gw
    tq = torch.arange(start, stop, device=device)
    tk = torch.arange(s, device=device)
    dr = (tq // gw)[:, None] - (tk // gw)[None, :]
    dc = (tq % gw)[:, None] - (tk % gw)[None, :]
    return torch.sqrt((dr * dr + dc * dc).to(dtype))


def _blocks(n_maps: int, s: int, row_len: int, dtype: torch.dtype):
    """`(maps per chunk, query rows per chunk)` keeping one `(maps, rows, row_len)` temporary
    near CHUNK_BYTES."""
    row_bytes = row_len * torch.finfo(dtype).bits // 8
    rows = max(1, min(s, CHUNK_BYTES // row_bytes))
    maps = max(1, min(n_maps, CHUNK_BYTES // (rows * row_bytes)))
    return maps, rows


def maps_distance(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int):
    """Per-query distances and row sums of attention maps.

    Args:
        attn: `(B, H, N, N)` with `N = P + gh·gw`.
        grid: `(gh, gw)`.
        num_prefix_tokens: P.
    Returns:
        `(dist, row_sums)`, both `(B, H, N − P)` in the compute dtype: `Σ_{k spatial} A·‖Δ‖`
        in patch units and `Σ_k A` over all N keys, for the spatial queries.
    """
    n_batch, n_heads, n_tokens, _ = attn.shape
    p = num_prefix_tokens
    s = n_tokens - p
    dtype = compute_dtype(attn.dtype)
    flat = attn.reshape(n_batch * n_heads, n_tokens, n_tokens)
    dist = torch.empty(n_batch * n_heads, s, dtype=dtype, device=attn.device)
    row_sums = torch.empty_like(dist)
    maps, rows = _blocks(flat.shape[0], s, n_tokens, dtype)
    for q0 in range(0, s, rows):
        q1 = min(s, q0 + rows)
        table = distance_rows(grid, q0, q1, dtype, attn.device)
        for m0 in range(0, flat.shape[0], maps):
            m1 = min(flat.shape[0], m0 + maps)
            block = flat[m0:m1, p + q0:p + q1].to(dtype)
            row_sums[m0:m1, q0:q1] = block.sum(dim=-1)
            dist[m0:m1, q0:q1] = (block[..., p:] * table).sum(dim=-1)
    shape = (n_batch, n_heads, s)
    return dist.view(shape), row_sums.view(shape)


def qk_distance(q: torch.Tensor, k: torch.Tensor, scale: float, grid: tuple[int, int],
                num_prefix_tokens: int) -> torch.Tensor:
    """Per-query distances of `softmax(q kᵀ · scale)`, the softmax formed block by block.

    Args:
        q, k: `(B, H, N, D)`, same shape and device; `N = P + gh·gw`.
        scale: the softmax scale.
        grid: `(gh, gw)`.
        num_prefix_tokens: P (their keys enter the normaliser, not the distance sum).
    Returns:
        `(B, H, N − P)` `Σ_{k spatial} softmax·‖Δ‖` in patch units, in the compute dtype.
    """
    n_batch, n_heads, n_tokens, d = q.shape
    p = num_prefix_tokens
    s = n_tokens - p
    dtype = compute_dtype(torch.promote_types(q.dtype, k.dtype))
    qf = q.reshape(n_batch * n_heads, n_tokens, d)
    kf = k.reshape(n_batch * n_heads, n_tokens, d)
    dist = torch.empty(n_batch * n_heads, s, dtype=dtype, device=q.device)
    maps, rows = _blocks(qf.shape[0], s, n_tokens, dtype)
    for q0 in range(0, s, rows):
        q1 = min(s, q0 + rows)
        table = distance_rows(grid, q0, q1, dtype, q.device)
        for m0 in range(0, qf.shape[0], maps):
            m1 = min(qf.shape[0], m0 + maps)
            scores = torch.matmul(qf[m0:m1, p + q0:p + q1].to(dtype), kf[m0:m1].to(dtype).transpose(1, 2))
            attn = torch.softmax(scores * scale, dim=-1)
            dist[m0:m1, q0:q1] = (attn[..., p:] * table).sum(dim=-1)
    return dist.view(n_batch, n_heads, s)
