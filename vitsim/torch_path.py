"""The torch path: HSIC statistics on CPU or CUDA without Triton (the fallback and the
benchmark baseline).

All functions take `(n, d)` matrices of any float dtype and return the cross sum `Σ K∘L` and
the two `GramStats` (see `vitsim._stats`). Columns are centred as each chunk is loaded,
products run in float32 (float64 for float64 inputs; TF32 on CUDA when
`torch.get_float32_matmul_precision()` allows it), and every large reduction is accumulated in
float64. Inputs are processed in chunks of rows (feature space) or columns (Gram space), so the
extra memory stays a fraction of the inputs'. On CPU tensors the column means and the Gram
matrices go through NumPy's BLAS (`vitsim.blas_cpu`, which also holds the CPU feature-space
statistics); the `*_torch` functions are the torch-only versions CUDA tensors run.
"""

from __future__ import annotations

import numpy as np
import torch

from ._stats import GramStats

# Bytes of one centred chunk: large enough for efficient GEMMs, small beside the inputs.
CHUNK_BYTES = 1 << 26


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half inputs are upcast per chunk)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# Rows per float32 partial sum of the column means (conventions §3: float32 partials of modest length,
# combined in float64).
MEAN_PARTIAL = 256


def column_mean(x: torch.Tensor) -> torch.Tensor:
    """`(d,)` float64 column means of an `(n, d)` matrix.

    Rows are shifted by the first row (so a large common offset does not swamp the float32
    partial sums), summed as float32 partials of `MEAN_PARTIAL` rows and added in float64; no
    float64 copy of the input is made.
    """
    if x.device.type == "cpu":
        from . import blas_cpu

        return torch.from_numpy(blas_cpu.column_mean(x))
    return column_mean_torch(x)


def column_mean_torch(x: torch.Tensor) -> torch.Tensor:
    """`column_mean` with torch ops on any device (what CUDA tensors run)."""
    n, d = x.shape
    if x.dtype == torch.float64:
        return x.sum(dim=0) / n
    origin = x[0].to(torch.float32)
    total = torch.zeros(d, dtype=torch.float64, device=x.device)
    step = max(MEAN_PARTIAL, _chunk(d, torch.float32) // MEAN_PARTIAL * MEAN_PARTIAL)
    for start in range(0, n, step):
        block = x[start:start + step].to(torch.float32) - origin
        rows = block.shape[0] - block.shape[0] % MEAN_PARTIAL
        if rows:
            total += block[:rows].reshape(-1, MEAN_PARTIAL, d).sum(dim=1).to(torch.float64).sum(dim=0)
        if rows < block.shape[0]:
            total += block[rows:].sum(dim=0).to(torch.float64)
    return origin.to(torch.float64) + total / n


def _chunk(width: int, dtype: torch.dtype) -> int:
    return max(64, CHUNK_BYTES // (max(width, 1) * torch.finfo(dtype).bits // 8))


class _Centring:
    """Subtract column means as chunks load, in the compute dtype (one pass over the chunk).

    The float32 mean `m` is the float64 mean rounded, so a chunk comes out shifted by the known
    residual `c = mean − m` (about one ulp of a large offset). The products are corrected with
    `Σ (x_i − m)(y_i − m')ᵀ = Xcᵀ Yc + n c c'ᵀ` (`correct`), the row norms² per row:
    `‖x − mean‖² = ‖x − m‖² − 2 (x − m)·c + ‖c‖²`.
    """

    def __init__(self, x: torch.Tensor, dtype: torch.dtype):
        mean = column_mean(x)
        self.dtype = dtype
        self.mean = mean.to(dtype)
        self.residual = mean - self.mean.to(torch.float64)
        self.residual_sq = self.residual.square().sum()

    def __call__(self, block: torch.Tensor):
        """`(centred block in the compute dtype, float64 row norms² of the exactly centred rows)`."""
        centred = block.to(self.dtype) - self.mean
        norms = torch.linalg.vecdot(centred, centred, dim=1).to(torch.float64)
        shift = (centred @ self.residual.to(self.dtype)).to(torch.float64)
        return centred, norms - 2.0 * shift + self.residual_sq

    def correct(self, product: torch.Tensor, other: "_Centring", n: int) -> None:
        """Remove `n c c'ᵀ` from an accumulated `Σ (x_i − m)(y_i − m')ᵀ` block, in place."""
        product.addr_(self.residual.to(product.dtype), other.residual.to(product.dtype), alpha=-n)


# Self terms XcᵀXc are symmetric: only the upper blocks of this width are multiplied.
SYM_BLOCK = 512


def _upper_blocks(d: int):
    """`(rows, cols, weight)` slices covering the upper block triangle of a d×d matrix."""
    edges = [round(i * d / max(1, d // SYM_BLOCK)) for i in range(max(1, d // SYM_BLOCK) + 1)]
    spans = [slice(a, b) for a, b in zip(edges, edges[1:])]
    return [(r, c, 1.0 if i == j else 2.0) for i, r in enumerate(spans) for j, c in enumerate(spans) if j >= i]


def frobenius_sq(m: torch.Tensor) -> torch.Tensor:
    """`‖m‖_F²` as float64: float32 (float64 for float64 `m`) row sums added in float64."""
    return torch.linalg.vecdot(m, m, dim=1).to(torch.float64).sum()


def linear_feature_stats(x: torch.Tensor, y: torch.Tensor):
    """Linear-kernel statistics in feature space, cost `n·(d1·d2 + (d1² + d2²)/2)`.

    `Σ K∘L = ‖Xcᵀ Yc‖_F²`, `Σ K∘K = ‖Xcᵀ Xc‖_F²` (upper blocks only), row sums zero, diagonals
    the centred row norms². Never forms an n×n matrix. Returns `(cross, GramStats_x, GramStats_y)`.
    """
    n, d1 = x.shape
    d2 = y.shape[1]
    dtype = compute_dtype(x, y)
    centre_x, centre_y = _Centring(x, dtype), _Centring(y, dtype)
    cxy = torch.zeros(d1, d2, dtype=dtype, device=x.device)
    cxx = torch.zeros(d1, d1, dtype=dtype, device=x.device)
    cyy = torch.zeros(d2, d2, dtype=dtype, device=x.device)
    bx, by = _upper_blocks(d1), _upper_blocks(d2)
    a = torch.empty(n, dtype=torch.float64, device=x.device)
    b = torch.empty(n, dtype=torch.float64, device=x.device)
    step = _chunk(max(d1, d2), torch.float64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        xc, a[start:stop] = centre_x(x[start:stop])
        yc, b[start:stop] = centre_y(y[start:stop])
        cxy.addmm_(xc.T, yc)
        for acc, zc, blocks in ((cxx, xc, bx), (cyy, yc, by)):
            for r, c, _ in blocks:
                acc[r, c].addmm_(zc[:, r].T, zc[:, c])
    centre_x.correct(cxy, centre_y, n)
    for acc, centre, blocks in ((cxx, centre_x, bx), (cyy, centre_y, by)):
        for r, c, _ in blocks:
            acc[r, c].addr_(centre.residual[r].to(dtype), centre.residual[c].to(dtype), alpha=-n)
    sxx = sum(w * frobenius_sq(cxx[r, c]) for r, c, w in bx)
    syy = sum(w * frobenius_sq(cyy[r, c]) for r, c, w in by)
    return frobenius_sq(cxy), GramStats(n, None, a, sxx), GramStats(n, None, b, syy)


HALF_FAST_MIN_FEATURES = 1024
HALF_FAST_MIN_EXAMPLES = 128

_MM_OUT_DTYPE = None  # None: untried; True/False: torch.mm(..., out_dtype=) works on CUDA


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for half-precision operands: products in the input dtype, float32 output."""
    global _MM_OUT_DTYPE
    if a.is_cuda and _MM_OUT_DTYPE is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False
        else:
            _MM_OUT_DTYPE = True
            return out
    # Exact: a product of two half-precision numbers fits float32's mantissa.
    return torch.mm(a.float(), b.float())


def double_centre(gram: torch.Tensor) -> torch.Tensor:
    """`HKH` of a symmetric float64 `(n, n)` matrix, in place."""
    rows = gram.mean(dim=1)
    gram -= rows[:, None]
    gram -= rows[None, :]
    gram += rows.mean()
    return gram


def shifted_gram(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """`(n, n)` float64 `Xc Xcᵀ` of an `(n, d)` input, with products in the dtype `work`.

    Each column chunk is shifted by a column mean rounded to `work` (where the offset is large
    every value lies within a factor 2 of it, so the difference is exact: Sterbenz), multiplied
    with float32 accumulation (float64 for float64), summed over chunks in float64 and
    double-centred in float64, which removes whatever offset the rounded shift left. One pass
    for the mean (`column_mean`), one over the data. CPU tensors go through NumPy's BLAS
    (`vitsim.blas_cpu.shifted_gram`: one syrk per chunk, half the multiply-adds).
    """
    if x.device.type == "cpu" and work in (torch.float32, torch.float64):
        from . import blas_cpu

        return blas_cpu.shifted_gram(x, work)
    return shifted_gram_torch(x, work)


def shifted_gram_torch(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """`shifted_gram` with torch ops on any device (what CUDA tensors run)."""
    n, d = x.shape
    shift = column_mean_torch(x).to(work)
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    half = work in (torch.float16, torch.bfloat16)
    step = max(64, CHUNK_BYTES // (n * torch.finfo(work).bits // 8))
    for start in range(0, d, step):
        shifted = x[:, start:start + step].to(work) - shift[start:start + step]
        gram += (_mm_float32(shifted, shifted.T) if half else shifted @ shifted.T).double()
    return double_centre(gram)


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """`(n, n)` float64 Gram matrix of the column-centred `(n, d)` input (conventions §3: centre first).

    float32/float64 inputs multiply in their own dtype; float16/bfloat16 ones in float32, except
    on CUDA with many examples and features, where the shifted copy stays in the input dtype
    (products exact, float32 accumulation) and its rounding averages out.
    """
    if x.dtype in (torch.float32, torch.float64):
        return shifted_gram(x, x.dtype)
    if x.is_cuda and x.shape[0] >= HALF_FAST_MIN_EXAMPLES and x.shape[1] >= HALF_FAST_MIN_FEATURES:
        return shifted_gram(x, x.dtype)
    return shifted_gram(x, torch.float32)


def kernel_gram(x: torch.Tensor, kernel: str, threshold: float,
                sigma: float | None) -> torch.Tensor:
    """Float64 `(n, n)` Gram matrix of `x` `(n, d)`: centred linear, or RBF with the exact median
    bandwidth `σ² = threshold² · median(D²)` of this `x` unless `sigma` is given."""
    gram = centred_gram(x)
    if kernel == "linear":
        return gram
    d2 = sq_distances_from_gram(gram, inplace=True)
    sigma2 = threshold**2 * median(d2) if sigma is None else sigma**2
    return rbf_from_sq_distances(d2, sigma2, inplace=True)


def sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`Σ a∘b` of two float64 `(n, n)` matrices as a 0-d tensor, without an n×n temporary on
    the CPU (float64 row sums, then their sum)."""
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.float64:
        with np.errstate(all="ignore"):  # a non-finite result is checked by the caller
            rows = np.einsum("ij,ij->i", a.numpy(), b.numpy())
        return torch.tensor(rows.sum(), dtype=torch.float64)
    return (a * b).sum()


def _gram_stats(k: torch.Tensor) -> GramStats:
    return GramStats(k.shape[0], k.sum(dim=1), torch.diagonal(k).clone(), sum_of_products(k, k))


def linear_gram_stats(x: torch.Tensor, y: torch.Tensor):
    """Linear-kernel statistics in Gram space, cost `n²·(d1 + d2)`, memory two n×n matrices."""
    k = centred_gram(x)
    l = centred_gram(y)
    return sum_of_products(k, l), _gram_stats(k), _gram_stats(l)


def sq_distances_from_gram(gram: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """`D²_ij = G_ii + G_jj − 2 G_ij`, clamped at 0, exact zeros on the diagonal; `inplace`
    overwrites `gram` (no n×n temporary)."""
    diag = torch.diagonal(gram).clone()
    d2 = gram if inplace else gram.clone()
    d2.mul_(-2.0).add_(diag[:, None]).add_(diag[None, :]).clamp_min_(0.0)
    d2.fill_diagonal_(0.0)
    return d2


def median(values: torch.Tensor) -> torch.Tensor:
    """Exact median with numpy's convention (mean of the two middle values for even counts);
    0-d float64 on `values`' device."""
    flat = values.reshape(-1)
    count = flat.numel()
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        # one selection for both middle positions (kthvalue would select twice)
        middle = np.partition(flat.numpy(), [(count - 1) // 2, count // 2])
        lo, hi = middle[(count - 1) // 2], middle[count // 2]
        return torch.tensor((np.float64(lo) + np.float64(hi)) / 2, dtype=torch.float64)
    return median_torch(flat)


def median_torch(flat: torch.Tensor) -> torch.Tensor:
    """`median` of a 1-D tensor with `torch.kthvalue` on any device (what CUDA tensors run)."""
    count = flat.numel()
    lo = torch.kthvalue(flat, (count + 1) // 2).values
    if count % 2:
        return lo.to(torch.float64)
    hi = torch.kthvalue(flat, count // 2 + 1).values
    return (lo.to(torch.float64) + hi.to(torch.float64)) / 2


def median_sq_distance(x: torch.Tensor) -> torch.Tensor:
    """Exact median of the n² squared distances of the rows of `x` `(n, d)`; 0-d float64."""
    return median(sq_distances_from_gram(centred_gram(x), inplace=True))


def rbf_from_sq_distances(d2: torch.Tensor, sigma2: torch.Tensor | float,
                          inplace: bool = False) -> torch.Tensor:
    """`exp(−D²/(2σ²))`; a zero bandwidth gives the σ → 0 limit, `1[D² = 0]`. `inplace`
    overwrites `d2`."""
    sigma2 = torch.as_tensor(sigma2, dtype=torch.float64, device=d2.device)
    # σ² = 0: the factor is −inf, D² > 0 gives exp(−inf) = 0 and D² = 0 gives NaN (0·∞), set
    # to 1 here (a NaN distance stays NaN).
    limit = (d2 == 0) & (sigma2 == 0)
    k = d2 if inplace else d2.clone()
    k.mul_(-0.5 / sigma2).exp_()
    return k.masked_fill_(limit, 1.0)


def rbf_gram_stats(x: torch.Tensor, y: torch.Tensor, threshold: float = 1.0,
                   sigmas: tuple[float, float] | None = None):
    """RBF-kernel statistics; the bandwidth is the exact median rule unless `sigmas` is given."""
    k = kernel_gram(x, "rbf", threshold, None if sigmas is None else sigmas[0])
    l = kernel_gram(y, "rbf", threshold, None if sigmas is None else sigmas[1])
    return sum_of_products(k, l), _gram_stats(k), _gram_stats(l)
