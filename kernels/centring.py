"""Column statistics and operand scaling shared by the HSIC kernels.

Every HSIC kernel subtracts the column means as it loads a tile (conventions §3: a large common offset
must never reach a product) and rounds the centred tile to the `tl.dot` operand dtype. For
float16/bfloat16 inputs that operand is float16 scaled by a power of two (`scale`, chosen so
the largest centred magnitude lies in [2¹³, 2¹⁴)): the products run at the same tensor-core
rate as bfloat16, but a centred bfloat16 value keeps 11 significant bits instead of 8 (rounding
it back to bfloat16 costs ~2e-3 in an unbiased CKA at n = 4). A power of two scales exactly, so
the launchers divide it out of the statistics without rounding.

Below `SPLIT_BELOW` examples the unbiased estimator amplifies even that rounding (CKA errors up
to 3e-2 at n = 4), so there each centred value is split into float16 `hi + lo` and three
products are accumulated (`hi·hi + lo·hi + hi·lo`, float32 accuracy); such problems are tiny.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

# Exponent of the largest centred magnitude of a half-precision operand: far from float16's
# 65504 (no overflow, even after rounding) and far above its subnormals.
HALF_OPERAND_EXPONENT = 14
# Half-precision operands are split into hi + lo below this many examples.
SPLIT_BELOW = 32


@triton.jit
def _column_stats_kernel(
    x_ptr,  # [n, d]
    sum_ptr,  # [num_chunks, d] float64: column sums of each chunk of ROWS rows
    max_ptr, min_ptr,  # [num_chunks, d] float32: column max / min of each chunk
    n, d,
    stride_n, stride_d,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < d
    col_off = cols * stride_d
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    hi = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    lo = tl.full([BLOCK_D], float("inf"), dtype=tl.float32)
    for start in range(0, ROWS, BLOCK_N):
        rows = pid_r * ROWS + start + tl.arange(0, BLOCK_N)
        mask = (rows < n)[:, None] & mask_d[None, :]
        tile = tl.load(x_ptr + rows[:, None] * stride_n + col_off[None, :], mask=mask, other=0.0)
        tile = tile.to(tl.float32)
        # float32 partials of BLOCK_N rows, combined in float64
        acc += tl.sum(tile, axis=0).to(tl.float64)
        hi = tl.maximum(hi, tl.max(tl.where(mask, tile, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(mask, tile, float("inf")), axis=0))
    out = pid_r * d + cols
    tl.store(sum_ptr + out, acc, mask=mask_d)
    tl.store(max_ptr + out, hi, mask=mask_d)
    tl.store(min_ptr + out, lo, mask=mask_d)


@triton.jit
def accumulate_product(acc, a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       SPLIT: tl.constexpr):
    """`acc + a @ b` for centred float32 tiles `a` `[M, K]`, `b` `[K, N]` rounded to `DOT_DTYPE`
    (with `SPLIT`, each as float16 `hi + lo`: three products, float32 accuracy)."""
    a_hi = a.to(DOT_DTYPE)
    b_hi = b.to(DOT_DTYPE)
    if SPLIT:
        acc = tl.dot((a - a_hi.to(tl.float32)).to(DOT_DTYPE), b_hi, acc, input_precision=PRECISION)
        acc = tl.dot(a_hi, (b - b_hi.to(tl.float32)).to(DOT_DTYPE), acc, input_precision=PRECISION)
    return tl.dot(a_hi, b_hi, acc, input_precision=PRECISION)


def _config():
    if _launch.interpreting():
        return dict(ROWS=64, BLOCK_N=32, BLOCK_D=32), {}
    return dict(ROWS=2048, BLOCK_N=32, BLOCK_D=128), dict(num_warps=4)


def column_stats(x: torch.Tensor, scaled: bool):
    """Column means and operand scale of `x` `(n, d)` (float16/bfloat16/float32, any strides).

    Returns:
        `(mean, scale)`: `(d,)` float32 column means (summed in float64 and deterministic: each
        program writes the sums of its chunk of rows, added in a fixed order) and `(2,)` float32
        `(s, 1/s²)`, s the power of two the kernels multiply centred values by (1 unless
        `scaled`, which the launchers pass for float16 operands, `_launch.half_operands`).
        Both stay on the device: no host sync.
    """
    n, d = x.shape
    meta, launch = _config()
    chunks = triton.cdiv(n, meta["ROWS"])
    sums = _launch.scratch((chunks, d), torch.float64, x.device)
    highs = _launch.scratch((chunks, d), torch.float32, x.device)
    lows = _launch.scratch((chunks, d), torch.float32, x.device)
    grid = (triton.cdiv(d, meta["BLOCK_D"]), chunks)
    _column_stats_kernel[grid](x, sums, highs, lows, n, d, x.stride(0), x.stride(1), **meta, **launch)
    mean = sums.sum(dim=0) / n
    scale = torch.ones((), dtype=torch.float64, device=x.device)
    if scaled:
        spread = torch.maximum(highs.amax(dim=0) - mean, mean - lows.amin(dim=0)).amax()
        # spread < 2^exponent, so spread · 2^(14 − exponent) < 2^14
        _, exponent = torch.frexp(spread)
        # clamped so that scale² and its inverse stay normal float32 numbers
        power = torch.exp2((HALF_OPERAND_EXPONENT - exponent).clamp(-60, 60).to(torch.float64))
        scale = torch.where(spread > 0, power, 1.0)
    # (s, 1/s²): the inverse is formed here, exactly, not by an approximate division on the GPU
    return mean.to(torch.float32), torch.stack([scale, scale.square().reciprocal()]).to(torch.float32)
