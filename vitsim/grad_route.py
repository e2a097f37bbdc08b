"""The differentiable route: HSIC statistics from plain torch ops, for inputs that require grad.

`vitsim.cka` and `vitsim.hsic` come here (through `vitsim._dispatch`) when x or y requires grad
and grad mode is on, so the result is a differentiable function of the inputs (conventions §3,
"Gradients"). Same statistics and precision as the other routes, without their in-place tricks:

- centre first: column means in float64, the centred rows formed in float64 and multiplied by a
  detached power of two that brings the largest centred magnitude into [1/2, 1) (exact, so no
  square under- or overflows), then rounded to the compute dtype (float64 for float64 inputs,
  float32 otherwise);
- products in the compute dtype (on CUDA, float32 matmuls follow torch's precision setting);
- every large sum (Frobenius norms, row norms, Gram sums) is reduced in float64.

σ is a constant: a given `sigma` is one, and the median rule's σ² is computed from detached
distances, so no gradient flows through the median.
"""

from __future__ import annotations

import warnings

import torch

from . import torch_path
from ._stats import GramStats

# Keeps the power-of-two factor and its square inside float64's range.
_MAX_EXPONENT = 500


def _scaled_centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(s · (x − mean) in the compute dtype, s)` for an `(n, d)` input, s a 0-d float64 power of
    two (detached) with `max |s · (x − mean)|` in [1/2, 1); s = 1 for a constant input."""
    centred = x.to(torch.float64)
    centred = centred - centred.mean(dim=0)
    _, exponent = torch.frexp(centred.detach().abs().max())
    scale = torch.ldexp(torch.ones((), dtype=torch.float64, device=x.device),
                        -exponent.clamp(-_MAX_EXPONENT, _MAX_EXPONENT))
    return (centred * scale).to(torch_path.compute_dtype(x)), scale


def _frobenius_sq(m: torch.Tensor) -> torch.Tensor:
    """`‖m‖_F²` as a 0-d float64 tensor (products in m's dtype, sums in float64)."""
    return (m * m).sum(dim=1, dtype=torch.float64).sum()


def _space(n: int, d1: int, d2: int) -> str:
    """"feature" or "gram" by multiply-adds, forward and backward alike. torch's matmul has no
    symmetric product, so the self terms cost as much as the cross term: feature space
    `n·(d1·d2 + d1² + d2²)`, Gram space `n²·(d1 + d2)`."""
    return "feature" if d1 * d2 + d1 * d1 + d2 * d2 <= n * (d1 + d2) else "gram"


def _double_centre(gram: torch.Tensor) -> torch.Tensor:
    """`HKH` of a float64 `(n, n)` matrix, out of place (autograd-safe)."""
    rows, cols = gram.mean(dim=1, keepdim=True), gram.mean(dim=0, keepdim=True)
    return gram - rows - cols + rows.mean()


def _gram_stats(k: torch.Tensor, scale: torch.Tensor | float = 1.0) -> GramStats:
    return GramStats(k.shape[0], k.sum(dim=1), torch.diagonal(k), (k * k).sum(), scale)


def _centred_gram(xs: torch.Tensor) -> torch.Tensor:
    """Float64 `(n, n)` Gram matrix of already centred rows, double-centred again in float64 so
    its row sums are zero to float64 rounding."""
    return _double_centre((xs @ xs.T).to(torch.float64))


def linear_stats(x: torch.Tensor, y: torch.Tensor):
    """Differentiable `(Σ K∘L, GramStats_K, GramStats_L)` for the linear kernel.

    Args:
        x: `(n, d1)` float tensor (CPU or CUDA), usually with `requires_grad`.
        y: `(n, d2)` float tensor on the same device.
    Returns:
        0-d float64 cross sum and two `GramStats` (float64, on x's device), those of the Gram
        matrices of `s_x · X` and `s_y · Y` (`GramStats.scale` = s, a detached power of two).
        Feature space (`‖XcᵀYc‖²`, rows None) or Gram space, whichever costs less.
    """
    xs, sx = _scaled_centred(x)
    ys, sy = _scaled_centred(y)
    n, d1 = xs.shape
    if _space(n, d1, ys.shape[1]) == "gram":
        k, l = _centred_gram(xs), _centred_gram(ys)
        return (k * l).sum(), _gram_stats(k, sx), _gram_stats(l, sy)
    a = (xs * xs).sum(dim=1, dtype=torch.float64)
    b = (ys * ys).sum(dim=1, dtype=torch.float64)
    return (_frobenius_sq(xs.T @ ys),
            GramStats(n, None, a, _frobenius_sq(xs.T @ xs), sx),
            GramStats(n, None, b, _frobenius_sq(ys.T @ ys), sy))


def _rbf_offset_gram(x: torch.Tensor, threshold: float, sigma: float | None) -> torch.Tensor:
    """`K − 11ᵀ = expm1(−D²/(2σ²))` `(n, n)` float64 for one input (conventions §2).

    HSIC does not see the constant (both estimators centre it away), and `expm1` keeps the
    digits of small `D²/(2σ²)` that `exp` would round to 1, so wide bandwidths follow linear
    CKA. σ² is the median rule's on detached distances unless `sigma` is given; σ² = 0 (more
    than half the pairs identical) gives the indicator kernel, with a `RuntimeWarning`.
    """
    xs, scale = _scaled_centred(x)
    gram = (xs @ xs.T).to(torch.float64)
    diag = torch.diagonal(gram)
    # the diagonal comes out exactly 0 (a + a − 2a is exact), and so does its gradient
    d2 = (diag[:, None] + diag[None, :] - 2.0 * gram).clamp_min(0.0)
    if sigma is not None:
        # the distances are those of s·x; (σ·s)² stays in range where σ² · s² might not
        return torch.expm1(d2 * (-0.5 / (sigma * scale) ** 2))
    sigma2 = threshold**2 * torch_path.median(d2.detach())
    if bool(sigma2 > 0):
        return torch.expm1(d2 * (-0.5 / sigma2))
    warnings.warn("RBF bandwidth is 0 (more than half of the pairwise distances are 0): using "
                  "the indicator kernel 1[x_i = x_j], the sigma -> 0 limit", RuntimeWarning,
                  stacklevel=7)
    # piecewise constant: zero gradient, but the result stays in the graph
    return 0.0 * d2 - (d2.detach() > 0).to(torch.float64)


def rbf_stats(x: torch.Tensor, y: torch.Tensor, threshold: float,
              sigmas: tuple[float, float] | None):
    """Differentiable `(Σ K∘L, GramStats_K, GramStats_L)` for the RBF kernel.

    Args:
        x: `(n, d1)` float tensor (CPU or CUDA), usually with `requires_grad`.
        y: `(n, d2)` float tensor on the same device.
        threshold: median-rule multiplier, `σ² = threshold² · median(D²)` (σ² detached).
        sigmas: `(σ_x, σ_y)` given bandwidths (constants), or None for the median rule.
    Returns:
        0-d float64 cross sum and two `GramStats` of `K − 11ᵀ`, `L − 11ᵀ` (the same HSIC as K,
        L; `scale` 1), float64 on x's device.
    """
    k = _rbf_offset_gram(x, threshold, None if sigmas is None else sigmas[0])
    l = _rbf_offset_gram(y, threshold, None if sigmas is None else sigmas[1])
    return (k * l).sum(), _gram_stats(k), _gram_stats(l)
