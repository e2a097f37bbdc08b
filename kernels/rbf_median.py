"""Exact median of the n² squared distances (the RBF bandwidth rule of conventions §2), never formed.

The values are the float32 `D²_ij` of `hsic_gram.sq_distance_tile`, i.e. exactly the distances
the RBF statistics use. Non-negative floats order like their bit patterns, so the median is a
radix selection on 31-bit keys: each pass recomputes the upper-triangular distance tiles and
histograms one digit of the keys that share the prefix found so far (per-program integer
histograms, summed afterwards; no atomics), then the next digit is chosen on the device (no host
sync). The n diagonal zeros are counted analytically and every off-diagonal value twice.
For an even count the two middle values are averaged in float64 (numpy's convention); the
upper one is either a tie, the next key of the last histogram, or the smallest distance above
the final prefix (a per-program minimum from the last pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitsim import torch_path

from . import _launch
from .hsic_gram import gram_config, gram_diagonal, gram_operand, gram_tile, sq_distance_tile, upper_tiles

# (shift, bits) of each radix digit of the 31-bit key, most significant first. Few wide digits
# mean few passes over the (expensive) Gram tiles; narrow digits make each histogram cheaper.
PLANS = {
    "wide": ((20, 11), (9, 11), (0, 9)),
    "narrow": ((23, 8), (15, 8), (7, 8), (0, 7)),
}
# A 2,048-bin histogram of a 128² tile costs about as much as the tile's Gram product at
# d ≈ 20,000 (estimate for H100, to be measured): below that, four cheap passes win.
WIDE_PLAN_MIN_D = 16384


def plan_for(d: int) -> str:
    """The radix plan `median_sq_distance` uses for `d` features."""
    return "wide" if d >= WIDE_PLAN_MIN_D else "narrow"


@triton.jit
def _radix_histogram_kernel(
    x_ptr,  # [n, d]
    mean_ptr,  # [d] float32 column means
    scale_ptr,  # [2] float32 (s, 1/s²), s the operand scale
    norms_ptr,  # [n] float32 diag(s² Xc Xcᵀ)
    tiles_ptr,  # [num_tiles, 2] int32 upper-triangular tile pairs
    prefix_ptr,  # [1] int32: keys counted have key >> PREFIX_SHIFT == prefix
    hist_ptr,  # [num_programs, NUM_BINS] int32 per-program digit histograms
    low_ptr,  # [num_programs] float32: least D² with key >> PREFIX_SHIFT > prefix (MIN_ABOVE)
    n, d,
    stride_n, stride_d,
    num_tiles,
    DIGIT_SHIFT: tl.constexpr, PREFIX_SHIFT: tl.constexpr, NUM_BINS: tl.constexpr,
    MIN_ABOVE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    prefix = tl.load(prefix_ptr)
    hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    low = tl.full([1], float("inf"), dtype=tl.float32)
    for t in range(pid, num_tiles, tl.num_programs(0)):
        tile_i = tl.load(tiles_ptr + t * 2)
        tile_j = tl.load(tiles_ptr + t * 2 + 1)
        g = gram_tile(x_ptr, mean_ptr, scale_ptr, n, d, stride_n, stride_d, tile_i, tile_j,
                      BLOCK, BLOCK_K, DOT_DTYPE, PRECISION, SPLIT)
        d2 = sq_distance_tile(g, norms_ptr, scale_ptr, tile_i, tile_j, n, BLOCK)
        rows_i = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        rows_j = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        # strictly upper entries only: the mirror and the diagonal are counted on the host
        upper = (rows_i[:, None] < rows_j[None, :]) & (rows_j < n)[None, :]
        key = d2.to(tl.int32, bitcast=True)
        high = key >> PREFIX_SHIFT
        digit = (key >> DIGIT_SHIFT) & (NUM_BINS - 1)
        match = upper & (high == prefix)
        hist += tl.histogram(tl.reshape(digit, [BLOCK * BLOCK]), NUM_BINS,
                             mask=tl.reshape(match, [BLOCK * BLOCK]))
        if MIN_ABOVE:
            above = tl.where(upper & (high > prefix), d2, float("inf"))
            low = tl.minimum(low, tl.min(above))
    tl.store(hist_ptr + pid.to(tl.int64) * NUM_BINS + tl.arange(0, NUM_BINS), hist)
    if MIN_ABOVE:
        tl.store(low_ptr + pid + tl.arange(0, 1), low)


@triton.jit
def _sq_distance_tiles_kernel(
    x_ptr,  # [n, d]
    mean_ptr,  # [d] float32
    scale_ptr,  # [2] float32 (s, 1/s²)
    norms_ptr,  # [n] float32
    tiles_ptr,  # [num_tiles, 2] int32
    out_ptr,  # [n, n] float32: upper-triangular tiles of D²
    n, d,
    stride_n, stride_d,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_i = tl.load(tiles_ptr + pid * 2)
    tile_j = tl.load(tiles_ptr + pid * 2 + 1)
    g = gram_tile(x_ptr, mean_ptr, scale_ptr, n, d, stride_n, stride_d, tile_i, tile_j,
                  BLOCK, BLOCK_K, DOT_DTYPE, PRECISION, SPLIT)
    d2 = sq_distance_tile(g, norms_ptr, scale_ptr, tile_i, tile_j, n, BLOCK)
    rows_i = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows_i < n)[:, None] & (rows_j < n)[None, :]
    tl.store(out_ptr + rows_i[:, None] * n + rows_j[None, :], d2, mask=mask)


def _prepare(x: torch.Tensor):
    """`(x, mean, scale, norms, operand)`, as `hsic_gram.gram_stats` prepares an RBF operand."""
    x, mean, scale, operand = gram_operand(x)
    return x, mean, scale, gram_diagonal(x, mean, scale, operand), operand


def _num_programs(device: torch.device, num_tiles: int) -> int:
    cap = 8 if _launch.interpreting() else 4 * _launch.num_sms(device)
    return max(1, min(num_tiles, cap))


def _select(x, mean, scale, norms, operand, rank: int, need_next: bool, plan):
    """The `rank`-th smallest strictly-upper `D²` (0-based), and the next one if `need_next`.

    Returns 1-element float32 device tensors `(value, next_value or None)`.
    """
    n, d = x.shape
    device = x.device
    meta, launch = gram_config(n)
    table = upper_tiles(triton.cdiv(n, meta["BLOCK"]), device)
    programs = _num_programs(device, table.shape[0])
    prefix = torch.zeros(1, dtype=torch.int32, device=device)
    remaining = torch.full((1,), rank, dtype=torch.int64, device=device)
    for step, (shift, bits) in enumerate(plan):
        last = step == len(plan) - 1
        hist = _launch.scratch((programs, 1 << bits), torch.int32, device)
        low = _launch.scratch(programs, torch.float32, device)
        _radix_histogram_kernel[(programs,)](
            x, mean, scale, norms, table, prefix, hist, low, n, d, x.stride(0), x.stride(1),
            table.shape[0], DIGIT_SHIFT=shift, PREFIX_SHIFT=shift + bits, NUM_BINS=1 << bits,
            MIN_ABOVE=last and need_next, **operand, **meta, **launch,
        )
        total = hist.sum(dim=0, dtype=torch.int64)
        cumulative = total.cumsum(dim=0)
        digit = torch.searchsorted(cumulative, remaining, right=True)
        below = torch.where(digit > 0, cumulative.gather(0, (digit - 1).clamp_min(0)), 0)
        remaining = remaining - below
        parent = prefix
        prefix = (prefix << bits) | digit.to(torch.int32)
    value = prefix.view(torch.float32)
    if not need_next:
        return value, None
    bins = 1 << bits
    index = torch.arange(bins, device=device)
    later = torch.where((index > digit) & (total > 0), index, bins).min().reshape(1)
    later_key = (parent << bits) | later.clamp_max(bins - 1).to(torch.int32)
    tie = remaining + 1 < total.gather(0, digit)
    following = torch.where(later < bins, later_key.view(torch.float32), low.min().reshape(1))
    return value, torch.where(tie, value, following)


def _middle_ranks(n: int):
    """0-based ranks of the middle value(s) of the n² distances, as ranks among the strictly
    upper values (None for a diagonal zero): sorted, the n² values are n zeros, then each upper
    value twice."""
    count = n * n
    ranks = ((count - 1) // 2, (count - 1) // 2) if count % 2 else (count // 2 - 1, count // 2)
    return tuple(None if r < n else (r - n) // 2 for r in ranks)


def median_sq_distance(x: torch.Tensor, plan: str | None = None) -> torch.Tensor:
    """Exact median of the n² squared distances `‖x_i − x_j‖²` (diagonal zeros included).

    Args:
        x: `(n, d)` float16, bfloat16 or float32 (float64 runs the torch path), n ≥ 2, CUDA
            tensor (CPU under `TRITON_INTERPRET=1`); any strides.
        plan: radix digits, "wide" (3 passes, for large d) or "narrow" (4 cheaper passes);
            default `plan_for(d)`.
    Returns:
        0-d float64 tensor: the median of the float32 distances `hsic_gram` computes, the mean
        of the two middle values when n² is even (numpy's convention).
    """
    if x.dtype == torch.float64:
        return torch_path.median_sq_distance(x)
    n, d = x.shape
    plan = PLANS[plan or plan_for(d)]
    x, mean, scale, norms, operand = _prepare(x)
    lo, hi = _middle_ranks(n)
    need_next = lo is not None and hi == lo + 1
    rank = hi if lo is None else lo
    value, following = _select(x, mean, scale, norms, operand, rank, need_next, plan)
    value = value.to(torch.float64)
    lower = torch.zeros_like(value) if lo is None else value
    upper = following.to(torch.float64) if need_next else value
    return ((lower + upper) / 2).reshape(())


def sq_distances(x: torch.Tensor) -> torch.Tensor:
    """The `(n, n)` float32 squared distances exactly as the median and the RBF kernel see them.

    For tests and debugging only (it forms the n×n matrix the other kernels avoid): the upper
    tiles are computed and mirrored, so the matrix is symmetric with a zero diagonal.
    """
    n = x.shape[0]
    x, mean, scale, norms, operand = _prepare(x)
    meta, launch = gram_config(n)
    table = upper_tiles(triton.cdiv(n, meta["BLOCK"]), x.device)
    out = torch.zeros((n, n), dtype=torch.float32, device=x.device)
    _sq_distance_tiles_kernel[(table.shape[0],)](
        x, mean, scale, norms, table, out, n, x.shape[1], x.stride(0), x.stride(1),
        **operand, **meta, **launch,
    )
    upper = torch.triu(out, diagonal=1)
    return upper + upper.T
