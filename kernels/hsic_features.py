"""Linear HSIC statistics in feature space: ‖XcᵀYc‖², ‖XcᵀXc‖², ‖YcᵀYc‖² (conventions §3).

Cost `n·(d1·d2 + (d1² + d2²)/2)` multiply-adds, and no d×d matrix is ever written: each program
owns one tile of one of the three covariance products, accumulates it over all n rows in
registers, squares and sums it, and writes one float64 partial. The self products use their
symmetry (upper tiles only, off-diagonal tiles counted twice). Columns are centred (and
half-precision operands scaled, see `centring`) as the tiles load, with means from one prior
column pass; the diagonal tiles of the self products also write the centred row norms² `a_i`,
`b_i` (per column block, summed in float64 afterwards).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitsim import torch_path
from vitsim._stats import GramStats

from . import _launch
from .centring import accumulate_product, column_stats


@triton.jit
def _covariance_tile_sq_sum(
    a_ptr, b_ptr,  # [n, da], [n, db]
    mean_a_ptr, mean_b_ptr,  # [da], [db] float32
    scale_a_ptr, scale_b_ptr,  # [2] float32 (s, 1/s²), s the operand scale (a power of two)
    norms_ptr,  # [tiles_a, n] float32 row-norm² partials, scaled (diagonal tiles only)
    n, da, db,
    stride_an, stride_ad, stride_bn, stride_bd,
    tile_i, tile_j, write_norms,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    """Σ of the squares of tile (tile_i, tile_j) of `(s_a Ac)ᵀ(s_b Bc)`, a float64 scalar."""
    cols_a = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols_b = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask_a = cols_a < da
    mask_b = cols_b < db
    mean_a = tl.load(mean_a_ptr + cols_a, mask=mask_a, other=0.0)
    mean_b = tl.load(mean_b_ptr + cols_b, mask=mask_b, other=0.0)
    scale_a = tl.load(scale_a_ptr)
    scale_b = tl.load(scale_b_ptr)
    # Acᵀ tile [BLOCK, BLOCK_K] and Bc tile [BLOCK_K, BLOCK]
    a_base = a_ptr + (cols_a * stride_ad)[:, None]
    b_base = b_ptr + (cols_b * stride_bd)[None, :]
    norms_base = norms_ptr + tile_i.to(tl.int64) * n
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = rows < n
        a = tl.load(a_base + (rows * stride_an)[None, :], mask=mask_a[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        a = tl.where(mask_k[None, :], (a - mean_a[:, None]) * scale_a, 0.0)
        b = tl.load(b_base + (rows * stride_bn)[:, None], mask=mask_k[:, None] & mask_b[None, :],
                    other=0.0).to(tl.float32)
        b = tl.where(mask_k[:, None], (b - mean_b[None, :]) * scale_b, 0.0)
        acc = accumulate_product(acc, a, b, DOT_DTYPE, PRECISION, SPLIT)
        # row norms² of the operand as multiplied, so the diagonal Σ a_i b_i of the unbiased
        # estimator cancels consistently against the one inside ‖XcᵀYc‖²
        if not SPLIT:
            a = a.to(DOT_DTYPE).to(tl.float32)
        tl.store(norms_base + rows, tl.sum(a * a, axis=0), mask=mask_k & write_norms)
    return tl.sum(tl.sum(acc * acc, axis=1).to(tl.float64), axis=0)


@triton.jit
def _feature_stats_kernel(
    x_ptr, y_ptr,  # [n, d1], [n, d2]
    mean_x_ptr, mean_y_ptr,  # [d1], [d2] float32 column means
    scale_x_ptr, scale_y_ptr,  # [2] float32 (s, 1/s²) of each operand
    tiles_ptr,  # [num_programs, 3] int32: (product, tile_i, tile_j); product 0 XᵀY, 1 XᵀX, 2 YᵀY
    part_ptr,  # [num_programs] float64: weighted ‖tile‖² of each program
    norms_x_ptr, norms_y_ptr,  # [tiles_x, n], [tiles_y, n] float32 scaled centred row-norm² partials
    n, d1, d2,
    stride_xn, stride_xd, stride_yn, stride_yd,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    product = tl.load(tiles_ptr + pid * 3)
    tile_i = tl.load(tiles_ptr + pid * 3 + 1)
    tile_j = tl.load(tiles_ptr + pid * 3 + 2)
    diagonal = tile_i == tile_j
    if product == 0:
        total = _covariance_tile_sq_sum(
            x_ptr, y_ptr, mean_x_ptr, mean_y_ptr, scale_x_ptr, scale_y_ptr, norms_x_ptr, n, d1, d2,
            stride_xn, stride_xd, stride_yn, stride_yd, tile_i, tile_j, False,
            BLOCK, BLOCK_K, DOT_DTYPE, PRECISION, SPLIT)
    elif product == 1:
        total = _covariance_tile_sq_sum(
            x_ptr, x_ptr, mean_x_ptr, mean_x_ptr, scale_x_ptr, scale_x_ptr, norms_x_ptr, n, d1, d1,
            stride_xn, stride_xd, stride_xn, stride_xd, tile_i, tile_j, diagonal,
            BLOCK, BLOCK_K, DOT_DTYPE, PRECISION, SPLIT)
    else:
        total = _covariance_tile_sq_sum(
            y_ptr, y_ptr, mean_y_ptr, mean_y_ptr, scale_y_ptr, scale_y_ptr, norms_y_ptr, n, d2, d2,
            stride_yn, stride_yd, stride_yn, stride_yd, tile_i, tile_j, diagonal,
            BLOCK, BLOCK_K, DOT_DTYPE, PRECISION, SPLIT)
    # an off-diagonal tile of a symmetric self product stands for itself and its transpose
    weight = tl.where((product != 0) & (tile_i != tile_j), 2.0, 1.0).to(tl.float64)
    tl.store(part_ptr + pid, total * weight)


def _programs(d1: int, d2: int, block: int) -> int:
    t1, t2 = triton.cdiv(d1, block), triton.cdiv(d2, block)
    return t1 * t2 + t1 * (t1 + 1) // 2 + t2 * (t2 + 1) // 2


def _feature_config(half: bool, d1: int, d2: int, device: torch.device):
    """Square tile side, n step and launch options (small blocks under the interpreter).

    Every program runs over all n rows, so the time is about (waves of programs) × (tile
    area): 128-wide tiles unless 64-wide ones need fewer of those units (e.g. d = 1,024 gives
    136 programs of 128², two waves on 132 SMs, but 528 of 64², four waves of a quarter the
    work). 64-wide tiles are charged 1/0.8 per unit for their lower arithmetic intensity. A model
    for H100, to be checked against measurements.
    """
    fit = max(16, triton.next_power_of_2(max(d1, d2)))
    if _launch.interpreting():
        return dict(BLOCK=min(32, fit), BLOCK_K=64), {}
    sms = _launch.num_sms(device)
    block = min(128, fit)
    if block == 128:
        cost = {b: triton.cdiv(_programs(d1, d2, b), sms) * b * b / efficiency
                for b, efficiency in ((128, 1.0), (64, 0.8))}
        block = 64 if cost[64] < cost[128] else 128
    block_k = 64 if half else 32
    return dict(BLOCK=block, BLOCK_K=block_k), dict(num_warps=8 if block >= 128 else 4, num_stages=3)


def _tile_table(tiles_x: int, tiles_y: int, device) -> torch.Tensor:
    """`[P, 3]` int32 rows `(product, i, j)`: all XᵀY tiles, then the upper tiles of XᵀX, YᵀY."""
    rows = [(0, i, j) for i in range(tiles_x) for j in range(tiles_y)]
    rows += [(1, i, j) for i in range(tiles_x) for j in range(i, tiles_x)]
    rows += [(2, i, j) for i in range(tiles_y) for j in range(i, tiles_y)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def feature_stats(x: torch.Tensor, y: torch.Tensor):
    """Linear-kernel HSIC statistics of `x` `(n, d1)` and `y` `(n, d2)` in feature space.

    Args:
        x: `(n, d1)` float16, bfloat16 or float32 (float64 runs the torch path), CUDA tensor
            (CPU under `TRITON_INTERPRET=1`); any strides.
        y: `(n, d2)`, same n and device.
    Returns:
        `(cross, GramStats_x, GramStats_y)` like `vitsim.torch_path.linear_feature_stats`:
        `cross = ‖XcᵀYc‖_F²` (0-d float64),
        `GramStats(n, rows=None, diag=a, self_sum=‖XcᵀXc‖_F²)`
        with `a` the `(n,)` float64 centred row norms² (and likewise for y).
    """
    if torch.float64 in (x.dtype, y.dtype):
        return torch_path.linear_feature_stats(x, y)
    x, y = _launch.strided_operand(x), _launch.strided_operand(y)
    n, d1 = x.shape
    d2 = y.shape[1]
    device = x.device
    meta, launch = _feature_config(_launch.half_operands(x, y), d1, d2, device)
    block = meta["BLOCK"]
    tiles_x, tiles_y = triton.cdiv(d1, block), triton.cdiv(d2, block)
    table = _tile_table(tiles_x, tiles_y, device)
    mean_x, scale_x = column_stats(x, _launch.half_operands(x, y))
    mean_y, scale_y = column_stats(y, _launch.half_operands(x, y))
    part = _launch.scratch(table.shape[0], torch.float64, device)
    norms_x = _launch.scratch((tiles_x, n), torch.float32, device)
    norms_y = _launch.scratch((tiles_y, n), torch.float32, device)
    _feature_stats_kernel[(table.shape[0],)](
        x, y, mean_x, mean_y, scale_x, scale_y, table, part, norms_x, norms_y, n, d1, d2,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        **_launch.operand_meta(x, y), **meta, **launch,
    )
    # the scales are powers of two: dividing them out is exact
    inv_x, inv_y = scale_x[1].to(torch.float64), scale_y[1].to(torch.float64)
    n_xy, n_xx = tiles_x * tiles_y, tiles_x * (tiles_x + 1) // 2
    cross = part[:n_xy].sum() * (inv_x * inv_y)
    self_x = part[n_xy:n_xy + n_xx].sum() * inv_x.square()
    self_y = part[n_xy + n_xx:].sum() * inv_y.square()
    a = norms_x.sum(dim=0, dtype=torch.float64) * inv_x
    b = norms_y.sum(dim=0, dtype=torch.float64) * inv_y
    return cross, GramStats(n, None, a, self_x), GramStats(n, None, b, self_y)
