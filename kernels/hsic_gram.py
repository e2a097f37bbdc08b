"""HSIC statistics in Gram space, linear and RBF kernels, for n ≪ d (conventions §2-3).

One fused pass over the upper-triangular tiles of the n×n Gram pair: each program computes its
tile of K (a loop over d1) and of L (a loop over d2) from column-centred rows (half-precision
operands scaled by a power of two, see `centring`), turns them into RBF values if asked, and
reduces at once Σ K∘L, Σ K∘K, Σ L∘L, the diagonals and the row sums
(off-diagonal tiles count twice and give their column sums to the mirrored rows). Per-program
partials are summed in float64 afterwards; no n×n matrix is written, no atomics.

RBF distances are `D²_ij = max(a_i + a_j − 2 G_ij, 0)` with `G = Xc Xcᵀ` and `a_i = G_ii` from
the same tile code, exactly 0 on the diagonal; `vitsim.kernels.rbf_median` selects its median
from the very same values (`gram_operand`, `sq_distance_tile`, `gram_config`).
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
def gram_tile(
    x_ptr,  # [n, d]
    mean_ptr,  # [d] float32 column means
    scale_ptr,  # [2] float32 (s, 1/s²), s the operand scale (a power of two)
    n, d,
    stride_n, stride_d,
    tile_i, tile_j,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    """Tile (tile_i, tile_j) of `s² Xc Xcᵀ`, `[BLOCK, BLOCK]` float32 (zero outside n×n)."""
    rows_i = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < n
    mask_j = rows_j < n
    # row tiles [BLOCK, BLOCK_K]
    base_i = x_ptr + (rows_i * stride_n)[:, None]
    base_j = x_ptr + (rows_j * stride_n)[:, None]
    scale = tl.load(scale_ptr)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = cols < d
        col_off = (cols * stride_d)[None, :]
        mean = tl.load(mean_ptr + cols, mask=mask_k, other=0.0)[None, :]
        a = tl.load(base_i + col_off, mask=mask_i[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        a = tl.where(mask_i[:, None], (a - mean) * scale, 0.0)
        b = tl.load(base_j + col_off, mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b = tl.where(mask_j[:, None], (b - mean) * scale, 0.0)
        acc = accumulate_product(acc, a, tl.trans(b), DOT_DTYPE, PRECISION, SPLIT)
    return acc


@triton.jit
def sq_distance_tile(g, norms_ptr, scale_ptr, tile_i, tile_j, n, BLOCK: tl.constexpr):
    """`D²` tile from a Gram tile `g = s² G`: `max(a_i + a_j − 2 g_ij, 0) / s²` with
    `a = s² diag(G)`, exactly +0.0 on the diagonal.

    `2 g` and the division by the power of two `s²` are exact, so contracting into an FMA cannot
    change the result: every kernel that calls this gets the same bits for the same Gram tile.
    """
    rows_i = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    a_i = tl.load(norms_ptr + rows_i, mask=rows_i < n, other=0.0)
    a_j = tl.load(norms_ptr + rows_j, mask=rows_j < n, other=0.0)
    inv_scale2 = tl.load(scale_ptr + 1)
    d2 = (a_i[:, None] + a_j[None, :]) - (g + g)
    # `d2 > 0` also maps -0.0 and NaN to +0.0, so the bits order like the values
    d2 = tl.where(d2 > 0.0, d2, 0.0) * inv_scale2
    return tl.where(rows_i[:, None] == rows_j[None, :], 0.0, d2)


@triton.jit
def _gram_diag_kernel(
    x_ptr,  # [n, d]
    mean_ptr,  # [d] float32
    scale_ptr,  # [2] float32 (s, 1/s²)
    out_ptr,  # [n] float32: diag(s² Xc Xcᵀ)
    n, d,
    stride_n, stride_d,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    g = gram_tile(x_ptr, mean_ptr, scale_ptr, n, d, stride_n, stride_d, tile, tile,
                  BLOCK, BLOCK_K, DOT_DTYPE, PRECISION, SPLIT)
    rows = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    diag = tl.sum(tl.where(rows[:, None] == rows[None, :], g, 0.0), axis=1)
    tl.store(out_ptr + rows, diag, mask=rows < n)


@triton.jit
def _rbf_tile(g, norms_ptr, scale_ptr, sigma2_ptr, tile_i, tile_j, n, BLOCK: tl.constexpr):
    """`exp(−D²/(2σ²))`; σ² = 0 gives the limit `1[D² = 0]`."""
    sigma2 = tl.load(sigma2_ptr)
    positive = sigma2 > 0
    rate = (-0.5 / tl.where(positive, sigma2, 1.0)).to(tl.float32)
    d2 = sq_distance_tile(g, norms_ptr, scale_ptr, tile_i, tile_j, n, BLOCK)
    return tl.where(d2 == 0.0, 1.0, tl.where(positive, tl.exp(d2 * rate), 0.0))


@triton.jit
def _gram_stats_kernel(
    x_ptr, y_ptr,  # [n, d1], [n, d2]
    mean_x_ptr, mean_y_ptr,  # [d1], [d2] float32 column means
    scale_x_ptr, scale_y_ptr,  # [2] float32 (s, 1/s²) of each operand
    norms_x_ptr, norms_y_ptr,  # [n] float32 diag(s_x² Xc Xcᵀ), diag(s_y² Yc Ycᵀ) (RBF only)
    sigma2_ptr,  # [2] float64 bandwidths σ_x², σ_y² (RBF only)
    tiles_ptr,  # [num_programs, 2] int32 upper-triangular tile pairs (i <= j)
    sums_ptr,  # [num_programs, 3] float64: weighted Σ K∘L, Σ K∘K, Σ L∘L of the tile
    rows_k_ptr, rows_l_ptr,  # [tiles, tiles, BLOCK] float64: [i, j] = row sums of block i over block j
    diag_k_ptr, diag_l_ptr,  # [n] float64: diag(K), diag(L)
    n, d1, d2,
    stride_xn, stride_xd, stride_yn, stride_yd,
    num_tiles,
    RBF: tl.constexpr, BLOCK: tl.constexpr,
    # each operand as `gram_operand` prepares it alone, so the RBF distances are the median's
    BLOCK_K_X: tl.constexpr, DOT_DTYPE_X: tl.constexpr, PRECISION_X: tl.constexpr, SPLIT_X: tl.constexpr,
    BLOCK_K_Y: tl.constexpr, DOT_DTYPE_Y: tl.constexpr, PRECISION_Y: tl.constexpr, SPLIT_Y: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tile_i = tl.load(tiles_ptr + pid * 2)
    tile_j = tl.load(tiles_ptr + pid * 2 + 1)
    # linear: K = s_x² Xc Xcᵀ (the launcher divides the scales out of the sums)
    k = gram_tile(x_ptr, mean_x_ptr, scale_x_ptr, n, d1, stride_xn, stride_xd, tile_i, tile_j,
                  BLOCK, BLOCK_K_X, DOT_DTYPE_X, PRECISION_X, SPLIT_X)
    l = gram_tile(y_ptr, mean_y_ptr, scale_y_ptr, n, d2, stride_yn, stride_yd, tile_i, tile_j,
                  BLOCK, BLOCK_K_Y, DOT_DTYPE_Y, PRECISION_Y, SPLIT_Y)
    rows_i = tile_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tile_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = (rows_i < n)[:, None] & (rows_j < n)[None, :]
    if RBF:
        k = _rbf_tile(k, norms_x_ptr, scale_x_ptr, sigma2_ptr, tile_i, tile_j, n, BLOCK)
        l = _rbf_tile(l, norms_y_ptr, scale_y_ptr, sigma2_ptr + 1, tile_i, tile_j, n, BLOCK)
        k = tl.where(valid, k, 0.0)
        l = tl.where(valid, l, 0.0)
    diagonal = tile_i == tile_j
    # an off-diagonal tile stands for itself and its mirror image
    weight = tl.where(diagonal, 1.0, 2.0).to(tl.float64)
    kl = tl.sum(tl.sum(k * l, axis=1).to(tl.float64), axis=0) * weight
    kk = tl.sum(tl.sum(k * k, axis=1).to(tl.float64), axis=0) * weight
    ll = tl.sum(tl.sum(l * l, axis=1).to(tl.float64), axis=0) * weight
    tl.store(sums_ptr + pid * 3, kl)
    tl.store(sums_ptr + pid * 3 + 1, kk)
    tl.store(sums_ptr + pid * 3 + 2, ll)
    # row sums: rows i over columns j, and (mirror) rows j over columns i
    offs = tl.arange(0, BLOCK)
    ij = (tile_i.to(tl.int64) * num_tiles + tile_j) * BLOCK + offs
    ji = (tile_j.to(tl.int64) * num_tiles + tile_i) * BLOCK + offs
    tl.store(rows_k_ptr + ij, tl.sum(k, axis=1).to(tl.float64))
    tl.store(rows_l_ptr + ij, tl.sum(l, axis=1).to(tl.float64))
    mirror = offs < tl.where(diagonal, 0, BLOCK)
    tl.store(rows_k_ptr + ji, tl.sum(k, axis=0).to(tl.float64), mask=mirror)
    tl.store(rows_l_ptr + ji, tl.sum(l, axis=0).to(tl.float64), mask=mirror)
    on_diag = rows_i[:, None] == rows_j[None, :]
    keep = (rows_i < n) & diagonal
    tl.store(diag_k_ptr + rows_i, tl.sum(tl.where(on_diag, k, 0.0), axis=1).to(tl.float64), mask=keep)
    tl.store(diag_l_ptr + rows_i, tl.sum(tl.where(on_diag, l, 0.0), axis=1).to(tl.float64), mask=keep)


def gram_config(n: int):
    """Tile side and launch options of every kernel that calls `gram_tile` for n examples."""
    cap = 32 if _launch.interpreting() else 128
    block = min(cap, max(16, triton.next_power_of_2(n)))
    if _launch.interpreting():
        return dict(BLOCK=block), {}
    return dict(BLOCK=block), dict(num_warps=8 if block >= 128 else 4, num_stages=3)


def gram_operand(x: torch.Tensor):
    """`(x, mean, scale, constexprs)` of one Gram operand `x` `(n, d)`, decided from x alone.

    The RBF statistics and the median prepare each input the same way (strides, centring, scale,
    operand dtype, d step), so both see the same Gram tiles and hence the same distances.
    """
    x = _launch.strided_operand(x)
    half = _launch.half_operands(x)
    mean, scale = column_stats(x, half)
    block_k = 64 if half or _launch.interpreting() else 32
    return x, mean, scale, dict(BLOCK_K=block_k, **_launch.operand_meta(x))


def upper_tiles(num_tiles: int, device) -> torch.Tensor:
    """`[T, 2]` int32 tile pairs `(i, j)`, `i <= j`, row by row."""
    pairs = [(i, j) for i in range(num_tiles) for j in range(i, num_tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device)


def gram_diagonal(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor,
                  operand: dict) -> torch.Tensor:
    """`(n,)` float32 `diag(s² Xc Xcᵀ)` computed by the tile code itself (the `a_i` of `D²`).

    Args:
        x, mean, scale, operand: from `gram_operand`.
    """
    n, d = x.shape
    meta, launch = gram_config(n)
    out = _launch.scratch(n, torch.float32, x.device)
    _gram_diag_kernel[(triton.cdiv(n, meta["BLOCK"]),)](
        x, mean, scale, out, n, d, x.stride(0), x.stride(1), **operand, **meta, **launch,
    )
    return out


def _torch_rbf_stats(x, y, sigma2_x, sigma2_y):
    stats = []
    for z, sigma2 in ((x, sigma2_x), (y, sigma2_y)):
        d2 = torch_path.sq_distances_from_gram(torch_path.centred_gram(z))
        stats.append(torch_path.rbf_from_sq_distances(d2, sigma2))
    k, l = stats
    n = k.shape[0]
    return ((k * l).sum(),
            GramStats(n, k.sum(dim=1), torch.diagonal(k).clone(), k.square().sum()),
            GramStats(n, l.sum(dim=1), torch.diagonal(l).clone(), l.square().sum()))


def gram_stats(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", sigma2_x=None, sigma2_y=None):
    """HSIC statistics of `x` `(n, d1)` and `y` `(n, d2)` from their Gram matrices, fused.

    Args:
        x: `(n, d1)` float16, bfloat16 or float32 (float64 runs the torch path), CUDA tensor
            (CPU under `TRITON_INTERPRET=1`); any strides.
        y: `(n, d2)`, same n and device.
        kernel: "linear" (`K = Xc Xcᵀ`) or "rbf" (`K_ij = exp(−D²_ij/(2σ_x²))`).
        sigma2_x, sigma2_y: RBF bandwidths σ² (0-d float64 tensors on the device, or floats);
            0 means the limit `1[D² = 0]`.
    Returns:
        `(cross, GramStats_K, GramStats_L)`: `cross = Σ K∘L` (0-d float64) and for each matrix
        `GramStats(n, rows, diag, self_sum)` with `(n,)` float64 row sums and diagonal.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"unknown kernel {kernel!r}; valid: 'linear', 'rbf'")
    rbf = kernel == "rbf"
    if rbf and (sigma2_x is None or sigma2_y is None):
        raise ValueError("kernel='rbf' needs sigma2_x and sigma2_y")
    if torch.float64 in (x.dtype, y.dtype):
        if rbf:
            return _torch_rbf_stats(x, y, sigma2_x, sigma2_y)
        return torch_path.linear_gram_stats(x, y)
    x, mean_x, scale_x, op_x = gram_operand(x)
    y, mean_y, scale_y, op_y = gram_operand(y)
    n, d1 = x.shape
    d2 = y.shape[1]
    device = x.device
    meta, launch = gram_config(n)
    num_tiles = triton.cdiv(n, meta["BLOCK"])
    table = upper_tiles(num_tiles, device)
    if rbf:
        norms_x = gram_diagonal(x, mean_x, scale_x, op_x)
        norms_y = gram_diagonal(y, mean_y, scale_y, op_y)
        sigma2 = torch.stack([torch.as_tensor(s, dtype=torch.float64, device=device).reshape(())
                              for s in (sigma2_x, sigma2_y)])
    else:
        norms_x, norms_y, sigma2 = mean_x, mean_y, None
    sums = _launch.scratch((table.shape[0], 3), torch.float64, device)
    rows = _launch.scratch((2, num_tiles, num_tiles, meta["BLOCK"]), torch.float64, device)
    diag = _launch.scratch((2, n), torch.float64, device)
    _gram_stats_kernel[(table.shape[0],)](
        x, y, mean_x, mean_y, scale_x, scale_y, norms_x, norms_y, sigma2 if rbf else sums, table,
        sums, rows[0], rows[1], diag[0], diag[1], n, d1, d2,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), num_tiles, RBF=rbf,
        **{f"{k}_X": v for k, v in op_x.items()}, **{f"{k}_Y": v for k, v in op_y.items()},
        **meta, **launch,
    )
    totals = sums.sum(dim=0)
    row_sums = rows.sum(dim=2).reshape(2, -1)[:, :n]
    if not rbf:
        # linear tiles carry the operand scales s² (powers of two: dividing is exact)
        inv = torch.stack([scale_x[1], scale_y[1]]).to(torch.float64)
        totals = totals * torch.stack([inv[0] * inv[1], inv[0].square(), inv[1].square()])
        row_sums = row_sums * inv[:, None]
        diag = diag * inv[:, None]
    return (totals[0],
            GramStats(n, row_sums[0], diag[0], totals[1]),
            GramStats(n, row_sums[1], diag[1], totals[2]))
