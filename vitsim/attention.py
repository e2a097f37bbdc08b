"""`vitsim.attention_distance` and `vitsim.attention_distance_qk`: validate, dispatch, return
(conventions §5, §7)."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _dispatch
from ._validate import (
    as_tensor,
    check_choice,
    check_finite_result,
    check_positive,
    raise_if_not_finite,
)

REDUCTIONS = ("mean", "none")

# Largest |row sum − 1| accepted by check=True, per input dtype: a softmax rounded to the dtype
# is off by far less; logits, unnormalised scores or a softmax over the wrong axis are far off.
ROW_SUM_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3, torch.float64: 1e-6}


def resolve_grid(n_tokens: int, num_prefix_tokens, grid) -> tuple[tuple[int, int], int]:
    """`((gh, gw), P)` for N tokens, or `ValueError` naming N, P and the grid.

    With `grid=None` the grid is the square one `N − P` tokens make; a non-square count cannot
    be inferred and must be passed as `grid=(gh, gw)`.
    """
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, (int, np.integer)):
        raise TypeError(
            f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}"
        )
    p = int(num_prefix_tokens)
    if p < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {p}")
    s = n_tokens - p
    if grid is None:
        side = math.isqrt(s) if s > 0 else 0
        if s <= 0 or side * side != s:
            raise ValueError(
                f"cannot infer a square patch grid: N={n_tokens} tokens with P={p} prefix tokens "
                f"leave N - P = {s}, not a positive perfect square; pass grid=(gh, gw)"
            )
        return (side, side), p
    try:
        gh, gw = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (gh, gw) or None, got {grid!r}") from None
    for name, value in (("grid[0]", gh), ("grid[1]", gw)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"grid must have positive sides, got grid={tuple(grid)!r}")
    gh, gw = int(gh), int(gw)
    if n_tokens != p + gh * gw:
        raise ValueError(
            f"N={n_tokens} tokens do not match P={p} prefix tokens plus a grid={(gh, gw)} of "
            f"{gh * gw} patches (N must equal P + gh·gw = {p + gh * gw})"
        )
    return (gh, gw), p


def _as_4d(name: str, value, what: str) -> torch.Tensor:
    tensor = as_tensor(name, value).detach()
    if tensor.ndim != 4:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    return tensor


def _finish(dist: torch.Tensor, patch_size: float, reduction: str, numpy_out: bool):
    """Per-query distances in patch units → the requested reduction, in pixels."""
    if reduction == "none":
        out = (dist * patch_size).to(torch.float32)
    else:
        n_batch, _, s = dist.shape
        # A float64 sum in torch's fixed order: deterministic, no atomics.
        out = dist.sum(dim=(0, 2), dtype=torch.float64) * (patch_size / (n_batch * s))
    return out.cpu().numpy() if numpy_out else out


def attention_distance(attn, *, patch_size=16, grid=None, num_prefix_tokens=1, reduction="mean",
                       check=True, backend="auto"):
    """Mean attention distance per head, in pixels (Dosovitskiy et al. 2021; conventions §5).

    For spatial query q, `dist = Σ_{k spatial} A[b, h, q, k] · ‖pos_q − pos_k‖₂` with
    `pos = patch_size · (row, col)`; prefix keys are dropped without renormalising.

    Args:
        attn: `(B, H, N, N)` attention probabilities (rows sum to 1 over keys), torch.Tensor
            (CPU or CUDA) or numpy.ndarray; float16, bfloat16, float32 or float64.
        patch_size: patch side in pixels (> 0). Default: 16.
        grid: `(gh, gw)` patch grid with `N = num_prefix_tokens + gh·gw`, or None to infer a
            square grid.
        num_prefix_tokens: P, the leading non-spatial tokens (class, distillation, registers).
        reduction: "mean" for the per-head mean over the batch and spatial queries, "none" for
            every spatial query.
        check: raise `ValueError` when a row of attn does not sum to 1 (within a dtype tolerance,
            read from the row sums the pass computes anyway). Only spatial query rows are read.
        backend: "auto", "torch", "triton" or "reference".
    Returns:
        "mean": `(H,)` float64, a tensor on attn's device (numpy array for NumPy input).
        "none": `(B, H, N − P)` float32 per-query distances.

    Example:
        >>> a = torch.full((1, 12, 197, 197), 1 / 197)
        >>> vitsim.attention_distance(a).round(decimals=2)[:1]
        tensor([115.9000], dtype=torch.float64)
    """
    check_choice("reduction", reduction, REDUCTIONS)
    patch_size = check_positive("patch_size", patch_size)
    a = _as_4d("attn", attn, "(B, H, N, N)")
    if a.shape[2] != a.shape[3]:
        raise ValueError(f"attn must have shape (B, H, N, N), got shape {tuple(a.shape)}")
    grid_hw, p = resolve_grid(a.shape[-1], num_prefix_tokens, grid)
    dist, row_sums = _dispatch.attention_maps_distance(a, grid_hw, p, backend)

    # One host sync for every check: finite data never pays for a scan of the input.
    finite, row_err = torch.stack([
        torch.isfinite(dist).all().to(torch.float64) * torch.isfinite(row_sums).all(),
        (row_sums.to(torch.float64) - 1.0).abs().max(),
    ]).tolist()
    if not finite:
        raise_if_not_finite(attn=a)
        raise ValueError("the attention distance overflowed: attn holds values far outside [0, 1]")
    if check and not row_err <= ROW_SUM_TOL[a.dtype]:
        raise ValueError(
            f"rows of attn must sum to 1 over the N={a.shape[-1]} keys (probabilities after the "
            f"softmax): the largest |row sum - 1| is {row_err:.3g} > {ROW_SUM_TOL[a.dtype]:g}; "
            "pass check=False to skip this check"
        )
    return _finish(dist, patch_size, reduction, isinstance(attn, np.ndarray))


def attention_distance_qk(q, k, *, scale=None, patch_size=16, grid=None, num_prefix_tokens=1,
                          reduction="mean", backend="auto"):
    """Attention distance of `softmax(q kᵀ · scale)` without forming the N×N matrix (conventions §5).

    The softmax runs over all N keys (prefix keys included in the normaliser); the distance sum
    runs over spatial keys only, as in :func:`attention_distance`. The Triton path is an online
    softmax (flash-attention style) with O(B·H·N) extra memory.

    Args:
        q: `(B, H, N, D)` queries as the attention computes them (after any q/k norm), torch or
            NumPy; float16, bfloat16, float32 or float64.
        k: `(B, H, N, D)` keys, same shape and device as q (mixed dtypes are promoted).
        scale: softmax scale; default `D ** -0.5`.
        patch_size, grid, num_prefix_tokens, reduction, backend: as in
            :func:`attention_distance`.
    Returns:
        "mean": `(H,)` float64, a tensor on q's device (numpy array for NumPy input).
        "none": `(B, H, N − P)` float32 per-query distances.

    Example:
        >>> q = torch.zeros(2, 12, 197, 64)
        >>> vitsim.attention_distance_qk(q, q).round(decimals=2)[:1]
        tensor([115.9000], dtype=torch.float64)
    """
    check_choice("reduction", reduction, REDUCTIONS)
    patch_size = check_positive("patch_size", patch_size)
    qt = _as_4d("q", q, "(B, H, N, D)")
    kt = _as_4d("k", k, "(B, H, N, D)")
    if qt.shape != kt.shape:
        raise ValueError(
            f"q and k must have the same shape (B, H, N, D): q.shape={tuple(qt.shape)}, "
            f"k.shape={tuple(kt.shape)}"
        )
    if qt.device != kt.device:
        raise ValueError(f"q is on {qt.device} and k on {kt.device}; move both to the same device")
    if qt.shape[-1] == 0:
        raise ValueError(f"q and k have no features: shape {tuple(qt.shape)}")
    if scale is None:
        scale = qt.shape[-1] ** -0.5
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"scale must be a number, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
    if qt.dtype != kt.dtype:
        common = torch.promote_types(qt.dtype, kt.dtype)
        qt, kt = qt.to(common), kt.to(common)
    grid_hw, p = resolve_grid(qt.shape[2], num_prefix_tokens, grid)
    dist = _dispatch.attention_qk_distance(qt, kt, scale, grid_hw, p, backend)
    check_finite_result(dist, {"q": qt, "k": kt},
                        "the softmax overflowed: q kᵀ · scale is not finite; rescale q or k")
    numpy_out = isinstance(q, np.ndarray) and isinstance(k, np.ndarray)
    return _finish(dist, patch_size, reduction, numpy_out)
