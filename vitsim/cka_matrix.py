"""`vitsim.cka_matrix`: CKA between every pair of layers, each Gram matrix formed once (conventions §3).

The same private helpers serve `MinibatchCKA.update` (vitsim/streaming.py), so the functional
and the stateful forms compute identical numbers for a batch.

Gram space (any kernel). HSIC is bilinear in (K, L), so with a per-layer transform T,
`HSIC(K, L) = ⟨T(K), T(L)⟩ / c`: the biased estimator takes `T(K) = HKH`, `c = (n−1)²`; the
unbiased one takes Székely and Rizzo's U-centring (diagonal of K zeroed, then
`T_ij = K̃_ij − r_i/(n−2) − r_j/(n−2) + 1ᵀr/((n−1)(n−2))` off the diagonal, 0 on it, with
`r = K̃1`), `c = n(n−3)`; expanding the inner product gives Song et al.'s three terms. Every
layer's T(K) is formed once, in float64, and the whole `(len(xs), len(ys))` HSIC matrix is one
matrix product of the flattened stacks. Each centred Gram matrix comes from a copy of the
input shifted by its (rounded) column mean, chunk by chunk, so a large offset never reaches a
product (conventions §3); the HSIC product and all sums are float64.
Memory: `(len(xs) + len(ys)) · n²` float64 numbers (n = 2,048 and 40 layers: 1.3 GiB), on the
inputs' device; fine for n up to a few thousand.

Feature space (linear kernel, when cheaper): each layer's column mean, centred row norms and
`‖XcᵀXc‖_F²` are computed once; each pair then costs one `XcᵀYc` (`n·d1·d2`), and the
estimators of `vitsim._stats` finish the job.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from . import _dispatch, reference, torch_path
from ._stats import GramStats, cka_from_hsic, hsic_from_stats, self_term_floor
from ._validate import (
    as_matrix,
    as_tensor,
    check_bool,
    check_finite_result,
    check_n,
    check_pair,
    raise_if_not_finite,
)
from .cka import check_options

# Half-precision Gram matrices on CUDA keep the shifted copy in the input dtype (products at the
# half-precision rate) only when its rounding averages out: at least this many features and
# examples. Measured on CPU with bfloat16, d ≈ 1,000: unbiased CKA error ~2e-4 at n = 64
# (6e-4 with one example 30x further out), but 5e-3 at n = 4 (conventions §8 allows 1e-3); small
# problems are cheap in float32 anyway.
# --- validation ---------------------------------------------------------------------------


def layer_sequence(name: str, layers, count: int | None = None, count_name: str = "") -> list:
    """`layers` as a list of activation sets, or an error naming `name`.

    A stacked tensor is refused (a lone `(n, d)` activation passed by mistake would otherwise be
    read as n layers).
    """
    if isinstance(layers, (torch.Tensor, np.ndarray)) or not isinstance(layers, Sequence):
        raise TypeError(
            f"{name} must be a list or tuple of (n, ...) activation sets, one per layer, got "
            f"{type(layers).__name__}; for a stacked (L, n, ...) tensor pass list({name})"
        )
    if len(layers) == 0:
        raise ValueError(f"{name} is empty: pass at least one layer")
    if count is not None and len(layers) != count:
        raise ValueError(
            f"{name} has {len(layers)} layers, expected {count_name}={count} (every update "
            "must pass the same layers)"
        )
    return list(layers)


def prepare_layers(name: str, layers, unbiased: bool, first=None) -> list[torch.Tensor]:
    """Validate a list of layers and view each as `(n, d)`.

    Args:
        name: the argument's name ("xs", "ys"); layers are named `xs[i]` in errors.
        layers: list of `(n, ...)` tensors or arrays.
        unbiased: the estimator, for the minimum n.
        first: `(label, tensor)` every layer must match in n and device (default: `name[0]`).
    Returns:
        The `(n, d)` views (no copies unless a reshape needs one).
    """
    mats = []
    for i, raw in enumerate(layers):
        label = f"{name}[{i}]"
        t = as_tensor(label, raw).detach()
        mat = as_matrix(label, t)
        if first is None:
            first = (label, t)
            try:
                check_n(t.shape[0], unbiased)
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
        check_pair(first[1], t, first[0], label)
        mats.append(mat)
    return mats


LAYERS_OVERFLOW = "the result overflowed: rescale the inputs (or pass float32 inputs)"


# --- Gram matrices ------------------------------------------------------------------------


def transform_gram_(k: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """In place: `HKH` (biased) or the U-centred K (unbiased), so `HSIC = ⟨T(K), T(L)⟩ / c`."""
    n = k.shape[0]
    if not unbiased:
        return torch_path.double_centre(k)
    k.fill_diagonal_(0.0)
    rows = k.sum(dim=1)
    k -= rows[:, None] / (n - 2)
    k -= rows[None, :] / (n - 2)
    k += rows.sum() / ((n - 1) * (n - 2))
    return k.fill_diagonal_(0.0)


def hsic_norm(n: int, unbiased: bool) -> float:
    """The estimator's normalisation: `n(n−3)` (unbiased) or `(n−1)²` (biased)."""
    return float(n * (n - 3)) if unbiased else float((n - 1) ** 2)


def _gram_stack(mats, kernel, unbiased, threshold, sigma):
    """`((L, n·n) transformed Grams, (L,) self-term floors)`, one Gram per layer."""
    n = mats[0].shape[0]
    stack = torch.empty(len(mats), n, n, dtype=torch.float64, device=mats[0].device)
    floors = torch.empty(len(mats), dtype=torch.float64, device=mats[0].device)
    for i, mat in enumerate(mats):
        k = torch_path.kernel_gram(mat, kernel, threshold, sigma)
        flat = k.reshape(-1)
        floors[i] = self_term_floor(GramStats(n, None, torch.diagonal(k), flat @ flat))
        stack[i] = transform_gram_(k, unbiased)
    return stack.reshape(len(mats), n * n), floors


def _row_dots(f: torch.Tensor) -> torch.Tensor:
    """`(L,)` squared norms of the rows of `f` `(L, m)`, without an `(L, m)` temporary."""
    return (f.unsqueeze(1) @ f.unsqueeze(2)).reshape(-1)


def _symmetric(h: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a square matrix, mirrored (so the result is exactly symmetric)."""
    return torch.triu(h) + torch.triu(h, diagonal=1).T


def _gram_blocks(xs2, ys2, kernel, unbiased, threshold, sigmas):
    n = xs2[0].shape[0]
    norm = hsic_norm(n, unbiased)
    sx, sy = (None, None) if sigmas is None else sigmas
    fx, floor_x = _gram_stack(xs2, kernel, unbiased, threshold, sx)
    if ys2 is None:
        hxy = _symmetric(fx @ fx.T) / norm
        hxx = torch.diagonal(hxy).clone()
        return hxy, hxx, hxx, floor_x, floor_x
    fy, floor_y = _gram_stack(ys2, kernel, unbiased, threshold, sy)
    hxy = (fx @ fy.T) / norm
    return hxy, _row_dots(fx) / norm, _row_dots(fy) / norm, floor_x, floor_y


# --- feature space (linear kernel) --------------------------------------------------------


def rows_per_chunk(width: int) -> int:
    """Rows of a float64 `(rows, width)` chunk of about `torch_path.CHUNK_BYTES`."""
    return max(64, torch_path.CHUNK_BYTES // (max(width, 1) * 8))


def centred_rows(block: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype):
    """`(block − mean in dtype, the same in float64)`: centred in float64, so a large offset
    loses nothing, then cast for the products."""
    centred = block.to(torch.float64) - mean
    return centred.to(dtype), centred


def _feature_cross(x, mx, y, my) -> torch.Tensor:
    """`‖Xcᵀ Yc‖_F²` in float64, centring each row chunk in float64 as it is loaded."""
    dtype = torch_path.compute_dtype(x, y)
    acc = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
    step = rows_per_chunk(max(x.shape[1], y.shape[1]))
    for start in range(0, x.shape[0], step):
        xc, _ = centred_rows(x[start:start + step], mx, dtype)
        yc = xc if y is x else centred_rows(y[start:start + step], my, dtype)[0]
        acc += xc.T @ yc
    return acc.square().sum()


def _feature_layer(x):
    """Column mean and the `GramStats` of the centred linear kernel of one layer."""
    mean = torch_path.column_mean(x)
    norms = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = rows_per_chunk(x.shape[1])
    for start in range(0, x.shape[0], step):
        rows = x[start:start + step].to(torch.float64) - mean
        norms[start:start + step] = rows.square().sum(dim=1)
    return mean, GramStats(x.shape[0], None, norms, _feature_cross(x, mean, x, mean))


def _feature_blocks(xs2, ys2, unbiased):
    lx = [_feature_layer(x) for x in xs2]
    ly = lx if ys2 is None else [_feature_layer(y) for y in ys2]
    ys_ = xs2 if ys2 is None else ys2
    dev = xs2[0].device

    def selfs(layers):
        return torch.stack([hsic_from_stats(k.self_sum, k, k, unbiased) for _, k in layers])

    def floors(layers):
        return torch.stack([torch.as_tensor(self_term_floor(k)) for _, k in layers]).to(dev)

    hxx = selfs(lx)
    hyy = hxx if ys2 is None else selfs(ly)
    hxy = torch.empty(len(xs2), len(ys_), dtype=torch.float64, device=dev)
    for i, (x, (mx, kx)) in enumerate(zip(xs2, lx)):
        for j, (y, (my, ky)) in enumerate(zip(ys_, ly)):
            if ys2 is None and j < i:
                hxy[i, j] = hxy[j, i]
            elif ys2 is None and j == i:
                hxy[i, j] = hxx[i]
            else:
                hxy[i, j] = hsic_from_stats(_feature_cross(x, mx, y, my), kx, ky, unbiased)
    floor_x = floors(lx)
    floor_y = floor_x if ys2 is None else floors(ly)
    return hxy, hxx, hyy, floor_x, floor_y


def linear_space_many(n: int, dx: list[int], dy: list[int] | None) -> str:
    """"feature" or "gram", whichever costs fewer multiply-adds for all pairs together.

    Feature: `n·d_i·d_j` per pair plus `n·d_i²/2` per layer (its self term); Gram: `n²·d_i/2` per
    layer plus the `n²` per pair of the HSIC product (the per-pair costs of
    `vitsim._dispatch.linear_space`, with each layer's share paid once).
    """
    if dy is None:
        pairs = sum(dx[i] * dx[j] for i in range(len(dx)) for j in range(i + 1, len(dx)))
        layers, count = dx, len(dx) * (len(dx) + 1) / 2
    else:
        pairs = sum(a * b for a in dx for b in dy)
        layers, count = dx + dy, len(dx) * len(dy)
    feature = n * (pairs + sum(d * d for d in layers) / 2)
    gram = n * n * (sum(layers) / 2 + count)
    return "feature" if feature <= gram else "gram"


def hsic_blocks(xs2, ys2, kernel, unbiased, threshold=1.0, sigmas=None, space=None):
    """HSIC between every pair of layers from validated `(n, d)` views (the shared core).

    Args:
        xs2: list of `(n, d_i)` tensors on one device.
        ys2: list of `(n, d_j)` tensors, or None for the symmetric self-comparison of xs2.
        kernel, unbiased, threshold: as `cka`; sigmas: None or `(σ for xs, σ for ys)`.
        space: "gram" or "feature" to force the linear-kernel route (default: by cost).
    Returns:
        `(hxy (X, Y), hxx (X,), hyy (Y,), floor_x (X,), floor_y (Y,))` float64 tensors: the HSIC
        matrix, the self terms and the floors below which a self term counts as zero.
    """
    if kernel == "linear":
        n = xs2[0].shape[0]
        space = space or linear_space_many(
            n, [x.shape[1] for x in xs2], None if ys2 is None else [y.shape[1] for y in ys2])
        if space == "feature":
            return _feature_blocks(xs2, ys2, unbiased)
    return _gram_blocks(xs2, ys2, kernel, unbiased, threshold, sigmas)


def _bad_names(name: str, self_terms: torch.Tensor, floors: torch.Tensor) -> str:
    bad = torch.nonzero(~(self_terms > floors)).reshape(-1).tolist()
    return ", ".join(f"{name}[{i}]" for i in bad) or name


def cka_from_blocks(hxy, hxx, hyy, floor_x, floor_y, xname="xs", yname="ys") -> torch.Tensor:
    """CKA matrix from `hsic_blocks` output; NaN plus a `RuntimeWarning` naming each layer whose
    self term is not above its floor."""
    names = (_bad_names(xname, hxx, floor_x), _bad_names(yname, hyy, floor_y))
    return cka_from_hsic(hxy, hxx[:, None], hyy[None, :], floor_x[:, None], floor_y[None, :], names)


# --- public -------------------------------------------------------------------------------


def _reference_matrix(xs2, ys2, kernel, unbiased, threshold, sigmas):
    named = {f"xs[{i}]": x for i, x in enumerate(xs2)}
    named.update({f"ys[{j}]": y for j, y in enumerate(ys2 or [])})
    raise_if_not_finite(**named)
    sx, sy = (None, None) if sigmas is None else sigmas
    xa = [x.to(torch.float64).cpu().numpy() for x in xs2]
    ya = xa if ys2 is None else [y.to(torch.float64).cpu().numpy() for y in ys2]
    out = np.array([[reference.cka_from_grams(reference.gram(a, kernel, threshold, sx),
                                              reference.gram(b, kernel, threshold, sy), unbiased)
                     for b in ya] for a in xa])
    if np.isnan(out).any():
        warnings.warn("CKA is undefined for some pairs (HSIC self-term <= 0); returning NaN",
                      RuntimeWarning, stacklevel=3)
    return torch.from_numpy(out).to(xs2[0].device)


def cka_matrix(xs, ys=None, *, kernel="linear", unbiased=False, threshold=1.0, sigma=None,
               backend="auto"):
    """CKA between every layer of `xs` and every layer of `ys` (conventions §3), each Gram formed once.

    Args:
        xs: list of `(n, ...)` activation sets (torch.Tensor or numpy.ndarray; float16, bfloat16,
            float32, float64), all with the same n and on the same device; d may differ per layer.
        ys: a second such list of the same n examples, or None for the symmetric `xs`-vs-`xs`
            matrix (only the upper triangle is computed).
        kernel: "linear" or "rbf" (exact median bandwidth per layer, `σ² = threshold²·median(D²)`).
        unbiased: the unbiased HSIC estimator (n ≥ 4) in all three terms.
        threshold: RBF bandwidth multiplier. sigma: explicit RBF σ (a number, or `(σ_xs, σ_ys)`).
        backend: "auto" or "torch" (torch ops, on any device), "reference" (float64 NumPy, slow).
            There is no Triton kernel for the matrix: "triton" raises.
    Returns:
        `(len(xs), len(ys))` float64 tensor on the inputs' device (a NumPy array when every input
        is NumPy). NaN, with a RuntimeWarning naming the layers, where a self term is ≤ 0.
    Memory:
        In Gram space `(len(xs) + len(ys)) · n²` float64 numbers (n = 2,048, 40 layers: 1.3 GiB).
        The linear kernel uses feature space instead when that is cheaper (small d, large n).

    Example:
        >>> vitsim.cka_matrix([x1, x2, x3]).shape   # symmetric, ones on the diagonal
        torch.Size([3, 3])
    """
    threshold, sigmas = check_options(kernel, threshold, sigma)
    unbiased = check_bool("unbiased", unbiased)
    if ys is xs:
        ys = None
    x_list = layer_sequence("xs", xs)
    y_list = None if ys is None else layer_sequence("ys", ys)
    xs2 = prepare_layers("xs", x_list, unbiased)
    ys2 = None if y_list is None else prepare_layers(
        "ys", y_list, unbiased, first=("xs[0]", as_tensor("xs[0]", x_list[0])))
    numpy_out = all(isinstance(a, np.ndarray) for a in x_list + (y_list or []))
    if _dispatch.resolve_backend(backend, xs2[0].device) == "reference":
        out = _reference_matrix(xs2, ys2, kernel, unbiased, threshold, sigmas)
        return out.cpu().numpy() if numpy_out else out
    blocks = hsic_blocks(xs2, ys2, kernel, unbiased, threshold, sigmas)
    named = {f"xs[{i}]": x for i, x in enumerate(xs2)}
    named.update({f"ys[{j}]": y for j, y in enumerate(ys2 or [])})
    check_finite_result(blocks[:3], named, LAYERS_OVERFLOW)
    out = cka_from_blocks(*blocks)
    return out.cpu().numpy() if numpy_out else out
