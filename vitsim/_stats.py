"""The sufficient statistics of a Gram pair, and the HSIC/CKA estimators computed from them.

Every backend (torch path, Triton kernels, streaming accumulators, `cka_matrix`) reduces its
inputs to these few float64 numbers; the estimators below turn them into HSIC and CKA. Keeping
the formulas in one place is what makes all paths agree.

For Gram matrices K, L of n examples (both estimators of conventions §3):
    kl = Σ K∘L,  r_K = K1 (row sums),  d_K = diag(K)
    biased:   tr(KHLH) = kl − (2/n) r_K·r_L + (1ᵀr_K)(1ᵀr_L)/n²
    unbiased: with u_K = K̃1 = r_K − d_K,
              tr(K̃L̃) = kl − d_K·d_L,  1ᵀK̃1 = 1ᵀu_K,  1ᵀK̃L̃1 = u_K·u_L
For a linear kernel on column-centred features r_K = 0 and d_K = a (the centred row norms²),
which is how the feature-space path fills the same structure (`rows=None`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class GramStats:
    """Statistics of one Gram matrix K `(n, n)` (float64 tensors on the input's device).

    Attributes:
        n: number of examples.
        rows: `(n,)` row sums `K1`, or None when they are zero (centred linear kernel).
        diag: `(n,)` diagonal of K.
        self_sum: 0-d `Σ K∘K`.
        scale: the statistics are those of the Gram matrix of `scale · X` (linear kernel: they
            are `scale²` times K's); a power of two that the routes multiply inputs by so that
            no square under- or overflows (conventions §3, "Scale"). 1 for RBF kernels, whose
            values do not depend on it. CKA comes out of the scaled statistics unchanged;
            `hsic_unscaled` divides the scales out of an HSIC value.
    """

    n: int
    rows: torch.Tensor | None
    diag: torch.Tensor
    self_sum: torch.Tensor
    scale: torch.Tensor | float = 1.0


def _dot(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | float:
    if a is None or b is None:
        return 0.0
    return torch.dot(a, b)


def _total(a: torch.Tensor | None) -> torch.Tensor | float:
    return 0.0 if a is None else a.sum()


def hsic_from_stats(cross: torch.Tensor, k: GramStats, l: GramStats, unbiased: bool) -> torch.Tensor:
    """HSIC of the pair (K, L) from `cross = Σ K∘L` and each matrix's `GramStats`.

    Returns a 0-d float64 tensor. Normalisation as conventions §3: `(n−1)²` (biased), `n(n−3)` (unbiased).
    """
    n = k.n
    if not unbiased:
        value = cross - 2.0 / n * _dot(k.rows, l.rows) + _total(k.rows) * _total(l.rows) / n**2
        return value / (n - 1) ** 2
    uk = -k.diag if k.rows is None else k.rows - k.diag
    ul = -l.diag if l.rows is None else l.rows - l.diag
    trace = cross - torch.dot(k.diag, l.diag)
    value = trace + uk.sum() * ul.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * torch.dot(uk, ul)
    return value / (n * (n - 3))


def hsic_triple(cross, k: GramStats, l: GramStats, unbiased: bool):
    """`(HSIC(K, L), HSIC(K, K), HSIC(L, L))` as 0-d float64 tensors."""
    return (
        hsic_from_stats(cross, k, l, unbiased),
        hsic_from_stats(k.self_sum, k, k, unbiased),
        hsic_from_stats(l.self_sum, l, l, unbiased),
    )


def hsic_unscaled(value: torch.Tensor, k: GramStats, l: GramStats) -> torch.Tensor:
    """HSIC of the unscaled pair from `value`, the HSIC of the scaled statistics `k`, `l`
    (exact: the scales are powers of two). May under- or overflow float64 where the true HSIC
    does; CKA never needs this."""
    factor = k.scale * l.scale
    if isinstance(factor, float) and factor == 1.0:
        return value
    return value / (torch.as_tensor(factor, dtype=torch.float64, device=value.device) ** 2)


def self_term_floor(k: GramStats) -> torch.Tensor:
    """Self-HSIC at or below this is rounding noise, not signal (e.g. a constant input under an
    RBF kernel, whose centred Gram matrix is zero only up to float64 rounding)."""
    return 1e-10 * k.self_sum / k.n**2


def cka_from_hsic(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor,
                  floor_x: torch.Tensor | float = 0.0, floor_y: torch.Tensor | float = 0.0,
                  names: tuple[str, str] = ("x", "y")) -> torch.Tensor:
    """`hxy / sqrt(hxx · hyy)`, or NaN with a `RuntimeWarning` naming the degenerate input.

    A self term at or below its floor (see `self_term_floor`) makes CKA undefined. Works
    elementwise, so it also serves CKA matrices (`hxx` `(X, 1)`, `hyy` `(1, Y)`).
    """
    bad_x = ~(hxx > floor_x)
    bad_y = ~(hyy > floor_y)
    undefined = bad_x | bad_y
    if bool(undefined.any()):
        bad = [name for name, flag in zip(names, (bad_x, bad_y)) if bool(flag.any())]
        warnings.warn(
            f"CKA is undefined (HSIC self-term <= 0 for {' and '.join(bad)}: constant features, "
            "or an unbiased self-term that came out non-positive); returning NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    denom = (hxx * hyy).clamp_min(0).sqrt()
    return torch.where(undefined, torch.full_like(denom, float("nan")), hxy / denom)


def cka_from_stats(cross, k: GramStats, l: GramStats, unbiased: bool,
                   names: tuple[str, str] = ("x", "y")) -> torch.Tensor:
    """CKA of the pair (K, L) from its statistics; 0-d float64 tensor (NaN when undefined)."""
    hxy, hxx, hyy = hsic_triple(cross, k, l, unbiased)
    return cka_from_hsic(hxy, hxx, hyy, self_term_floor(k), self_term_floor(l), names)
