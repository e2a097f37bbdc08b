"""Attention distance (conventions §5): one read of the attention maps, or an online softmax of q, k.

Both kernels write one value per spatial query, `Σ_{k spatial} A[q, k] · ‖Δ(q, k)‖` with `Δ`
the grid offset in patches (the caller multiplies by the patch size), and the maps kernel also the
query's row sum over all N keys, the free by-product the `check=True` test reads. Key distances
come from the token indices (`t = k − P`, `row = t // gw`, `col = t % gw`) as each tile is
formed; no N×N table is ever stored. A tile of distances depends on the query and key blocks
only, so each program handles HEADS maps of one example and computes that tile (a square root
per entry, the scarce special-function unit) once for all of them.

The per-head mean is a float64 sum of the per-query values in a fixed order (the caller's):
no atomics, and block sizes come from a fixed table of the sizes rather than timing-dependent
autotuning, so results are bit-identical run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import scratch

# log2(e): the q/k kernel runs its softmax in base 2 (exp2 is one special-function instruction).
LOG2E = 1.4426950408889634


@triton.jit
def _maps_kernel(
    attn_ptr,  # [B, H, N, N] probabilities, any float dtype
    dist_ptr,  # [B·H, S] out: Σ_k a·‖Δ‖ over spatial keys, in patches (ACC dtype)
    rowsum_ptr,  # [B·H, S] out: Σ_k a over all N keys (ACC dtype)
    H, N, P, GW,
    stride_ab, stride_ah, stride_aq, stride_ak,
    HEADS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC_F64: tl.constexpr,
):
    # Axis 0: (example, group of HEADS heads), may exceed 65,535; axis 1: block of spatial queries.
    pid_bg = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    S = N - P
    n_groups = tl.cdiv(H, HEADS)
    b = pid_bg // n_groups
    hh = (pid_bg % n_groups) * HEADS + tl.arange(0, HEADS)
    h_mask = hh < H

    # Spatial query indices t_q in [0, S) are tokens P + t_q.
    tq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = tq < S
    row_q = (tq // GW).to(acc_dtype)
    col_q = (tq % GW).to(acc_dtype)
    base = attn_ptr + b * stride_ab + (P + pid_q * BLOCK_Q).to(tl.int64) * stride_aq
    # [HEADS, BLOCK_Q, 1] offsets of the rows this program reads.
    rows = hh[:, None, None] * stride_ah + tl.arange(0, BLOCK_Q)[None, :, None] * stride_aq
    rows_mask = h_mask[:, None, None] & q_mask[None, :, None]

    dist_acc = tl.zeros((HEADS, BLOCK_Q), dtype=acc_dtype)
    sum_acc = tl.zeros((HEADS, BLOCK_Q), dtype=acc_dtype)
    for k0 in range(0, N, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < N
        a = tl.load(
            base + rows + kk[None, None, :] * stride_ak,
            mask=rows_mask & k_mask[None, None, :],
            other=0.0,
        ).to(acc_dtype)
        tk = kk - P
        row_k = (tk // GW).to(acc_dtype)
        col_k = (tk % GW).to(acc_dtype)
        dr = row_q[:, None] - row_k[None, :]
        dc = col_q[:, None] - col_k[None, :]
        d = tl.sqrt(dr * dr + dc * dc)
        # Prefix keys (class token, registers) count in the row sum but not in the distance.
        d = tl.where((tk >= 0)[None, :], d, 0.0)
        dist_acc += tl.sum(a * d[None, :, :], axis=2)
        sum_acc += tl.sum(a, axis=2)

    out = (b * H + hh)[:, None] * S + tq[None, :]
    out_mask = h_mask[:, None] & q_mask[None, :]
    tl.store(dist_ptr + out, dist_acc, mask=out_mask)
    tl.store(rowsum_ptr + out, sum_acc, mask=out_mask)


@triton.jit
def _load_q(ptr, tq, offs_d, S, D, stride_n, stride_d, EVEN_D: tl.constexpr,
            DOT_F32: tl.constexpr):
    """q tile [BLOCK_M, BLOCK_D] from `ptr` (one head's first spatial query); rows past the
    spatial queries and the D padding load as zeros."""
    mask = (tq < S)[:, None]
    if not EVEN_D:
        mask = mask & (offs_d < D)[None, :]
    q = tl.load(ptr + tq[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d,
                mask=mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _load_kt(ptr, kk, offs_d, N, D, stride_n, stride_d, EVEN_D: tl.constexpr,
             DOT_F32: tl.constexpr):
    """kᵀ tile [BLOCK_D, BLOCK_N] from `ptr` (one head's first key)."""
    mask = (kk < N)[None, :]
    if not EVEN_D:
        mask = mask & (offs_d < D)[:, None]
    kt = tl.load(ptr + kk[None, :].to(tl.int64) * stride_n + offs_d[:, None] * stride_d,
                 mask=mask, other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
    return kt


@triton.jit
def _online_update(q, kt, d, k_mask, qk_scale, m_i, l_i, w_i, INPUT_PRECISION: tl.constexpr):
    """One key block of the online softmax: running max m, normaliser l, distance sum w."""
    s = tl.dot(q, kt, input_precision=INPUT_PRECISION, out_dtype=m_i.dtype) * qk_scale
    s = tl.where(k_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    w_i = w_i * alpha + tl.sum(p * d, axis=1)
    return m_new, l_i, w_i


@triton.jit
def _qk_kernel(
    q_ptr,  # [B, H, N, D]
    k_ptr,  # [B, H, N, D], same dtype as q
    dist_ptr,  # [B·H, S] out: Σ_k softmax(q kᵀ·scale)·‖Δ‖, spatial keys, in patches (ACC)
    scale_ptr,  # [1] scale · log2(e), ACC dtype (a float argument would be rounded to float32)
    H, N, P, GW, D,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    ACC_F64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # HEADS is 1 or 2: with 2, heads h and h + 1 share each tile of distances (their scores
    # sit in the same registers, so the square roots are taken once for both).
    pid_bg = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    S = N - P
    n_groups = tl.cdiv(H, HEADS)
    b = pid_bg // n_groups
    h0 = (pid_bg % n_groups) * HEADS
    # An odd head count leaves the last group one head: it reads head h0 twice, stores once.
    h1 = tl.minimum(h0 + 1, H - 1)
    qk_scale = tl.load(scale_ptr)
    # Per-head bases: q at the first spatial query, k at the first key.
    q0_ptr = q_ptr + b * stride_qb + h0 * stride_qh + P * stride_qn
    k0_ptr = k_ptr + b * stride_kb + h0 * stride_kh
    q1_ptr = q0_ptr + (h1 - h0) * stride_qh
    k1_ptr = k0_ptr + (h1 - h0) * stride_kh

    tq = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = tq < S
    row_q = (tq // GW).to(acc_dtype)
    col_q = (tq % GW).to(acc_dtype)
    # D is padded to a power of two >= 16 (tl.dot's minimum); the padding loads as zeros.
    offs_d = tl.arange(0, BLOCK_D)
    q0 = _load_q(q0_ptr, tq, offs_d, S, D, stride_qn, stride_qd, EVEN_D, DOT_F32)
    m0 = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
    l0 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    w0 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    if HEADS == 2:
        q1 = _load_q(q1_ptr, tq, offs_d, S, D, stride_qn, stride_qd, EVEN_D, DOT_F32)
        m1 = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
        l1 = tl.zeros((BLOCK_M,), dtype=acc_dtype)
        w1 = tl.zeros((BLOCK_M,), dtype=acc_dtype)

    for k0 in range(0, N, BLOCK_N):
        kk = k0 + tl.arange(0, BLOCK_N)
        k_mask = kk < N
        tk = kk - P
        row_k = (tk // GW).to(acc_dtype)
        col_k = (tk % GW).to(acc_dtype)
        dr = row_q[:, None] - row_k[None, :]
        dc = col_q[:, None] - col_k[None, :]
        # Prefix keys enter the normaliser only.
        d = tl.where((tk >= 0)[None, :], tl.sqrt(dr * dr + dc * dc), 0.0)
        kt0 = _load_kt(k0_ptr, kk, offs_d, N, D, stride_kn, stride_kd, EVEN_D, DOT_F32)
        m0, l0, w0 = _online_update(q0, kt0, d, k_mask, qk_scale, m0, l0, w0, INPUT_PRECISION)
        if HEADS == 2:
            kt1 = _load_kt(k1_ptr, kk, offs_d, N, D, stride_kn, stride_kd, EVEN_D, DOT_F32)
            m1, l1, w1 = _online_update(q1, kt1, d, k_mask, qk_scale, m1, l1, w1, INPUT_PRECISION)

    out = dist_ptr + (b * H + h0) * S + tq
    tl.store(out, w0 / l0, mask=q_mask)
    if HEADS == 2:
        tl.store(out + S, w1 / l1, mask=q_mask & (h0 + 1 < H))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_per_program(n_heads: int, most: int) -> int:
    """Largest power of two <= `most` and <= the head count: heads per program."""
    return min(most, 1 << (max(n_heads, 1).bit_length() - 1))


def _maps_config(n: int, n_heads: int, interpret: bool) -> tuple[int, int, int, int]:
    """`(HEADS, BLOCK_Q, BLOCK_K, num_warps)`: two heads share each tile of distances, and a
    tile holds 8-16 entries per thread (64-bit addresses make larger tiles cost registers and
    occupancy: 2×4×256 compiles to ~64 registers on sm_90, 2×8×256 to ~145)."""
    heads = _heads_per_program(n_heads, 2)
    if interpret:
        return heads, 16, min(64, triton.next_power_of_2(n)), 4
    block_k = min(256, max(16, triton.next_power_of_2(n)))
    return heads, max(4, 512 // block_k), block_k, 4


def _qk_config(d: int, n_heads: int, dtype: torch.dtype, interpret: bool):
    """`(HEADS, BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)`; D padded to a power of two
    >= 16. Checked to compile for sm_90 without register spills (ptxas -v)."""
    block_d = max(16, triton.next_power_of_2(d))
    pair = _heads_per_program(n_heads, 2)
    if interpret:
        return pair, 16, 16, block_d, 4, 1
    if dtype == torch.float64:
        return 1, 32, 32, block_d, 4, 2
    if dtype == torch.float32:
        if block_d <= 64:
            return 1, 128, 64, block_d, 8, 2
        return 1, 64, 32, block_d, 4, 1
    if block_d <= 128:
        return pair, 128, 64, block_d, 8, 2
    return 1, 64, 64, block_d, 8, 2


def _is_interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def maps_distance(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int):
    """Per-query distances and row sums of attention maps, one read of the spatial query rows.

    Args:
        attn: `(B, H, N, N)` with `N = P + gh·gw`; float16/bfloat16/float32/float64, any strides
            (a non-unit key stride is copied once).
        grid: `(gh, gw)`.
        num_prefix_tokens: P.
    Returns:
        `(dist, row_sums)`, both `(B, H, N − P)`, float64 for float64 input and float32
        otherwise: `Σ_{k spatial} A·‖Δ‖` in patches, and `Σ_k A` over all N keys.
    """
    n_batch, n_heads, n_tokens, _ = attn.shape
    s = n_tokens - num_prefix_tokens
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    acc = _acc_dtype(attn.dtype)
    dist = scratch((n_batch * n_heads, s), acc, attn.device)
    row_sums = scratch((n_batch * n_heads, s), acc, attn.device)
    heads, block_q, block_k, num_warps = _maps_config(n_tokens, n_heads, _is_interpreted(attn))
    launch = (n_batch * triton.cdiv(n_heads, heads), triton.cdiv(s, block_q))
    _maps_kernel[launch](
        attn, dist, row_sums,
        n_heads, n_tokens, num_prefix_tokens, grid[1],
        *attn.stride(),
        HEADS=heads, BLOCK_Q=block_q, BLOCK_K=block_k, ACC_F64=acc == torch.float64,
        num_warps=num_warps,
    )
    shape = (n_batch, n_heads, s)
    return dist.view(shape), row_sums.view(shape)


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for float32 operands, following torch's matmul precision setting."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def qk_distance(q: torch.Tensor, k: torch.Tensor, scale: float, grid: tuple[int, int],
                num_prefix_tokens: int) -> torch.Tensor:
    """Per-query distances of `softmax(q kᵀ · scale)` without forming it (online softmax).

    Args:
        q, k: `(B, H, N, D)`, same shape, dtype and device, any strides (a non-unit feature
            stride is copied once); `N = P + gh·gw`.
        scale: the softmax scale.
        grid: `(gh, gw)`.
        num_prefix_tokens: P (their keys enter the normaliser, not the distance sum).
    Returns:
        `(B, H, N − P)` `Σ_{k spatial} softmax·‖Δ‖` in patches, float64 for float64 input,
        float32 otherwise. Extra memory: this output only.
    """
    n_batch, n_heads, n_tokens, d = q.shape
    s = n_tokens - num_prefix_tokens
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    acc = _acc_dtype(q.dtype)
    dist = scratch((n_batch * n_heads, s), acc, q.device)
    interpret = _is_interpreted(q)
    heads, block_m, block_n, block_d, num_warps, num_stages = _qk_config(
        d, n_heads, q.dtype, interpret
    )
    scale_t = torch.full((1,), float(scale) * LOG2E, dtype=acc, device=q.device)
    launch = (n_batch * triton.cdiv(n_heads, heads), triton.cdiv(s, block_m))
    _qk_kernel[launch](
        q, k, dist, scale_t,
        n_heads, n_tokens, num_prefix_tokens, grid[1], d,
        *q.stride(), *k.stride(),
        HEADS=heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=d == block_d,
        ACC_F64=acc == torch.float64, INPUT_PRECISION=_input_precision(q.dtype),
        # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits; its float32
        # product of the same values is exact, so widen there (compiled kernels use bf16 dots).
        DOT_F32=interpret and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dist.view(n_batch, n_heads, s)
