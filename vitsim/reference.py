"""Float64 NumPy references, written straight from the formulas of conventions §2-6.

Slow and obvious on purpose: every other path (torch, Triton) is tested against these.
Inputs are anything `numpy.asarray` accepts; everything is computed in float64.
"""

from __future__ import annotations

import numpy as np


def _matrix(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


# --- Gram matrices (conventions §2) -------------------------------------------------------------


def gram_linear(x) -> np.ndarray:
    """`K = X Xᵀ` for `x` of shape `(n, ...)`; returns `(n, n)` float64."""
    x = _matrix(x)
    return x @ x.T


def sq_distances(x) -> np.ndarray:
    """All n² squared Euclidean distances `‖x_i − x_j‖²`, `(n, n)` float64."""
    x = _matrix(x)
    return np.stack([((x - row) ** 2).sum(axis=1) for row in x])


def median_sq_distance(x) -> float:
    """Exact median of the n² squared distances, diagonal zeros included (numpy's median)."""
    return float(np.median(sq_distances(x)))


def gram_rbf(x, threshold: float = 1.0, sigma: float | None = None) -> np.ndarray:
    """`K_ij = exp(−‖x_i − x_j‖² / (2σ²))`, `σ² = threshold² · median(D²)` unless `sigma` is given.

    A zero bandwidth (constant input, or most distances zero) is read as the limit σ → 0:
    `K_ij = 1` where `x_i = x_j` and 0 elsewhere.
    """
    d2 = sq_distances(x)
    sigma2 = sigma**2 if sigma is not None else threshold**2 * np.median(d2)
    if sigma2 == 0:
        return (d2 == 0).astype(np.float64)
    return np.exp(-d2 / (2.0 * sigma2))


def gram(x, kernel: str = "linear", threshold: float = 1.0, sigma: float | None = None):
    """Gram matrix of `x` for kernel "linear" or "rbf"."""
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, threshold=threshold, sigma=sigma)
    raise ValueError(f"unknown kernel {kernel!r}; valid: 'linear', 'rbf'")


# --- HSIC and CKA (conventions §3) --------------------------------------------------------------


def centering_matrix(n: int) -> np.ndarray:
    """`H = I − 11ᵀ/n`."""
    return np.eye(n) - np.ones((n, n)) / n


def hsic_biased(k, l) -> float:
    """`tr(K H L H) / (n − 1)²` for `(n, n)` Gram matrices, n ≥ 2."""
    k, l = np.asarray(k, np.float64), np.asarray(l, np.float64)
    n = k.shape[0]
    h = centering_matrix(n)
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def hsic_unbiased(k, l) -> float:
    """Song et al. (2012) unbiased HSIC for `(n, n)` Gram matrices, n ≥ 4."""
    k, l = np.array(k, np.float64), np.array(l, np.float64)
    n = k.shape[0]
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones = np.ones(n)
    term1 = np.trace(k @ l)
    term2 = (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ k @ l @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def hsic_from_grams(k, l, unbiased: bool = False) -> float:
    """HSIC of two Gram matrices with the chosen estimator."""
    return hsic_unbiased(k, l) if unbiased else hsic_biased(k, l)


def cka_from_grams(k, l, unbiased: bool = False) -> float:
    """`HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`; NaN when the denominator is ≤ 0."""
    kl = hsic_from_grams(k, l, unbiased)
    denom = hsic_from_grams(k, k, unbiased) * hsic_from_grams(l, l, unbiased)
    if not denom > 0:
        return float("nan")
    return float(kl / np.sqrt(denom))


def _sigmas(sigma):
    if sigma is None or np.isscalar(sigma):
        return sigma, sigma
    return sigma[0], sigma[1]


def center_features(x) -> np.ndarray:
    """Subtract the column means of an `(n, ...)` activation set (returned as `(n, d)`)."""
    x = _matrix(x)
    return x - x.mean(axis=0, keepdims=True)


def _grams(x, y, kernel, threshold, sigma):
    # Both estimators are invariant to centring the features, and every kernel here is
    # translation invariant: centring first keeps float64 exact for a large common offset.
    sx, sy = _sigmas(sigma)
    return (gram(center_features(x), kernel, threshold, sx),
            gram(center_features(y), kernel, threshold, sy))


def hsic(x, y, kernel="linear", unbiased=False, threshold=1.0, sigma=None) -> float:
    """HSIC between activation sets `x` `(n, ...)` and `y` `(n, ...)`."""
    return hsic_from_grams(*_grams(x, y, kernel, threshold, sigma), unbiased)


def cka(x, y, kernel="linear", unbiased=False, threshold=1.0, sigma=None) -> float:
    """CKA between activation sets `x` `(n, ...)` and `y` `(n, ...)`; NaN when undefined."""
    return cka_from_grams(*_grams(x, y, kernel, threshold, sigma), unbiased)


# --- Minibatch CKA (conventions §4) -------------------------------------------------------------


def minibatch_weight(n: int, unbiased: bool, weighting: str) -> float:
    """Weight of a batch of n examples: 1 ("equal"), or the estimator's normalisation
    ("examples": `n(n − 3)` unbiased, `(n − 1)²` biased)."""
    if weighting == "equal":
        return 1.0
    if weighting == "examples":
        return float(n * (n - 3)) if unbiased else float((n - 1) ** 2)
    raise ValueError(f"unknown weighting {weighting!r}; valid: 'equal', 'examples'")


def minibatch_cka(x_batches, y_batches, kernel="linear", unbiased=True, threshold=1.0,
                  weighting="equal") -> float:
    """`Σ_b w_b HSIC(K_b, L_b) / sqrt(Σ_b w_b HSIC(K_b, K_b) · Σ_b w_b HSIC(L_b, L_b))` over
    paired batches, `w_b = minibatch_weight(n_b, unbiased, weighting)`."""
    kl = kk = ll = 0.0
    for xb, yb in zip(x_batches, y_batches, strict=True):
        k, l = _grams(xb, yb, kernel, threshold, None)
        w = minibatch_weight(k.shape[0], unbiased, weighting)
        kl += w * hsic_from_grams(k, l, unbiased)
        kk += w * hsic_from_grams(k, k, unbiased)
        ll += w * hsic_from_grams(l, l, unbiased)
    denom = kk * ll
    return float(kl / np.sqrt(denom)) if denom > 0 else float("nan")


# --- Attention distance (conventions §5) --------------------------------------------------------


def patch_positions(grid, patch_size: float) -> np.ndarray:
    """`(gh·gw, 2)` pixel positions `p · (row, col)` of the patches, in row-major order."""
    gh, gw = grid
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return patch_size * np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)


def attention_distance_per_query(attn, patch_size=16, grid=None, num_prefix_tokens=1):
    """`(B, H, gh·gw)` float64: `Σ_{k spatial} A[b,h,q,k] · ‖pos_q − pos_k‖` for spatial q.

    `attn` is `(B, H, N, N)` with `N = P + gh·gw`; prefix keys are dropped, not renormalised.
    """
    attn = np.asarray(attn, dtype=np.float64)
    n_tokens = attn.shape[-1]
    p = num_prefix_tokens
    if grid is None:
        side = int(round(np.sqrt(n_tokens - p)))
        grid = (side, side)
    pos = patch_positions(grid, patch_size)
    dist = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    spatial = attn[:, :, p:, p:]
    return np.einsum("bhqk,qk->bhq", spatial, dist)


def attention_distance(attn, patch_size=16, grid=None, num_prefix_tokens=1, reduction="mean"):
    """Mean attention distance in pixels: `(H,)` for reduction "mean", `(B, H, N−P)` for "none"."""
    per_query = attention_distance_per_query(attn, patch_size, grid, num_prefix_tokens)
    if reduction == "none":
        return per_query
    return per_query.mean(axis=(0, 2))


def softmax(scores, axis=-1) -> np.ndarray:
    """Numerically stable softmax in float64."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = np.exp(scores - scores.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def attention_distance_qk(q, k, scale=None, patch_size=16, grid=None, num_prefix_tokens=1,
                          reduction="mean"):
    """Attention distance of `softmax(q kᵀ · scale)` for `q`, `k` of shape `(B, H, N, D)`."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = softmax(np.einsum("bhqd,bhkd->bhqk", q, k) * scale)
    return attention_distance(attn, patch_size, grid, num_prefix_tokens, reduction)


# --- Ratio of norms across a skip connection (conventions §6) -----------------------------------


def norm_ratio_tokens(z, fz) -> np.ndarray:
    """Per-token `‖z‖₂ / ‖f(z)‖₂` over the last (channel) axis; `(B, N, C)` → `(B, N)`."""
    z = np.asarray(z, dtype=np.float64)
    fz = np.asarray(fz, dtype=np.float64)
    return np.linalg.norm(z, axis=-1) / np.linalg.norm(fz, axis=-1)


def ratio_of_norms_tokens(z, fz, num_prefix_tokens=1) -> dict:
    """Transformer sub-block: mean ratio over the batch for the class token (token 0) and
    over the batch and all spatial tokens (tokens P..N−1). `z`, `fz`: `(B, N, C)`."""
    r = norm_ratio_tokens(z, fz)
    return {"cls": float(r[:, 0].mean()), "spatial": float(r[:, num_prefix_tokens:].mean())}


def ratio_of_norms_maps(z, fz) -> float:
    """ResNet block: mean over the batch of `‖z‖ / ‖f(z)‖` with norms over all C·H·W entries."""
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    fz = np.asarray(fz, dtype=np.float64).reshape(len(fz), -1)
    return float((np.linalg.norm(z, axis=1) / np.linalg.norm(fz, axis=1)).mean())
