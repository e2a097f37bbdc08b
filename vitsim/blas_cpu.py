"""The torch path's CPU side: feature-space statistics, centred Gram matrices and column means
through NumPy's BLAS.

The same statistics and conventions as `vitsim.torch_path` (whose functions call these for CPU
tensors), faster on the CPU for two reasons:

- torch exposes no symmetric rank-k update; NumPy's `matmul` calls BLAS `syrk` for `aᵀ @ a` and
  `a @ aᵀ`, which forms the self terms `XcᵀXc`, `YcᵀYc` (Gram space: `XcXcᵀ`) at half the cost
  of a GEMM in one call that keeps the GEMM's rate (blockwise torch GEMMs over the upper
  triangle lose that rate).
- centred copies are NumPy arrays, whose large allocations are backed by huge pages: a copy
  faults in far fewer pages than through torch's CPU allocator, and one buffer per input is
  reused from chunk to chunk.

Products run in float32 (float64 for float64 inputs; half inputs are upcast per chunk) with
float32 accumulation, every large reduction is summed as float32 row partials combined in
float64. The BLAS threads are NumPy's (OpenBLAS: `OPENBLAS_NUM_THREADS`), not
`torch.set_num_threads`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._stats import GramStats
from . import torch_path


def quiet(fn):
    """Run `fn` without NumPy's floating-point warnings: a NaN/Inf input or an overflow shows in
    the result, which the callers check (conventions §7) and report as one clear error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


def _numpy(block: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """`block` as a NumPy array of `dtype`: a view of the tensor when no cast is needed."""
    if block.dtype != dtype:
        block = block.to(dtype)
    return block.detach().numpy()


def _rows(x: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> np.ndarray:
    return _numpy(x[start:stop], dtype)


@quiet
def column_mean(x: torch.Tensor) -> np.ndarray:
    """`(d,)` float64 column means of a CPU `(n, d)` matrix.

    Rows are shifted by the first row (a large common offset would swamp float32 sums) one
    `torch_path.MEAN_PARTIAL`-row block at a time into a small reused buffer, summed as float32
    partials and added in float64: no copy of the input is made.
    """
    n, d = x.shape
    if x.dtype == torch.float64:
        return _rows(x, 0, n, torch.float64).sum(axis=0) / n
    origin = _rows(x, 0, 1, torch.float32)[0].astype(np.float64)
    shift = origin.astype(np.float32)
    total = np.zeros(d, dtype=np.float64)
    partial = torch_path.MEAN_PARTIAL
    buffer = np.empty((partial, d), dtype=np.float32)
    for start in range(0, n, partial):
        block = _rows(x, start, min(n, start + partial), torch.float32)
        shifted = np.subtract(block, shift, out=buffer[:block.shape[0]])
        total += shifted.sum(axis=0)
    return origin + total / n


class _Centring:
    """Subtract the column means, rounded to the compute dtype, from chunks of rows.

    The rounded mean `m` leaves each centred row shifted by the known float64 residual
    `c = mean − m` (about one ulp of a large offset); `_corrected_frobenius_sq` removes `n c c'ᵀ`
    from the accumulated products, and the row norms² come out exact:
    `‖x − mean‖² = ‖x − m‖² − 2 (x − m)·c + ‖c‖²`.
    """

    def __init__(self, x: torch.Tensor, dtype: torch.dtype):
        mean = column_mean(x)
        self.x, self.dtype = x, dtype
        self.mean = mean.astype(_NUMPY[dtype])
        self.residual = mean - self.mean
        self.residual_sq = float(self.residual @ self.residual)
        self.buffer = None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` centred by the rounded mean, in the compute dtype, written into one
        buffer reused from chunk to chunk (fresh pages cost more than the subtraction)."""
        if self.buffer is None:
            self.buffer = np.empty((stop - start, self.mean.shape[0]), dtype=self.mean.dtype)
        return np.subtract(_rows(self.x, start, stop, self.dtype), self.mean,
                           out=self.buffer[:stop - start])

    def norms(self, centred: np.ndarray) -> np.ndarray:
        """`(rows,)` float64 norms² of the exactly centred rows; squares `centred` in place."""
        shift = (centred @ self.residual.astype(centred.dtype)).astype(np.float64)
        return _row_sums_of_squares(centred) - 2.0 * shift + self.residual_sq


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


class _Products:
    """`Σ_chunks (aᵀ b)` for the three pairs of centred chunks, in the compute dtype."""

    def __init__(self):
        self.totals = self.scratch = None

    def add(self, xc: np.ndarray, yc: np.ndarray) -> None:
        pairs = ((xc, yc), (xc, xc), (yc, yc))  # NumPy runs aᵀ @ a (one buffer) as syrk
        if self.totals is None:
            self.totals = [a.T @ b for a, b in pairs]
            return
        if self.scratch is None:
            self.scratch = [np.empty_like(t) for t in self.totals]
        for total, part, (a, b) in zip(self.totals, self.scratch, pairs):
            total += np.matmul(a.T, b, out=part)


def _row_sums_of_squares(m: np.ndarray) -> np.ndarray:
    """`(rows,)` float64 `Σ_j m_ij²`, squaring `m` in place (no copy): NumPy sums along a
    contiguous row pairwise, which keeps float32 row sums of positive terms unbiased
    (`einsum`'s running sum drifts by ~1e-8 relative over 2,048 terms)."""
    np.square(m, out=m)
    return m.sum(axis=1).astype(np.float64)


def _frobenius_sq(m: np.ndarray) -> float:
    """`‖m‖_F²` from float32 (float64) pairwise row sums added in float64; overwrites `m`."""
    return float(_row_sums_of_squares(m).sum())


def _corrected_frobenius_sq(product: np.ndarray, c1: np.ndarray, c2: np.ndarray, n: int) -> float:
    """`‖P − n c1 c2ᵀ‖_F²` for `P = Σ (x_i − m)(y_i − m')ᵀ` and the float64 residuals `c1`, `c2`
    of the rounded means, expanded as `‖P‖² − 2n c1ᵀP c2 + n²‖c1‖²‖c2‖²` (the residuals are an
    ulp of the offset, so the correction is tiny and nothing cancels); overwrites `P`."""
    pc2 = (product @ c2.astype(product.dtype)).astype(np.float64)
    correction = -2.0 * n * float(c1 @ pc2) + n * n * float(c1 @ c1) * float(c2 @ c2)
    return _frobenius_sq(product) + correction


@quiet
def linear_feature_stats(x: torch.Tensor, y: torch.Tensor):
    """Linear-kernel statistics of CPU `x` `(n, d1)` and `y` `(n, d2)` in feature space.

    Cost `n·(d1·d2 + (d1² + d2²)/2)` multiply-adds (the self terms through `syrk`), extra memory
    the three products (twice, with several chunks) plus one chunk of centred rows of each input.

    Returns:
        `(cross, GramStats_x, GramStats_y)`: `cross = ‖XcᵀYc‖_F²` (0-d float64 tensor),
        `GramStats(n, rows=None, diag=a, self_sum=‖XcᵀXc‖_F²)` with `a` the `(n,)` float64
        centred row norms² (likewise for y), as `vitsim.torch_path.linear_feature_stats`.
    """
    n, d1 = x.shape
    d2 = y.shape[1]
    dtype = torch_path.compute_dtype(x, y)
    centre_x, centre_y = _Centring(x, dtype), _Centring(y, dtype)
    a = np.empty(n, dtype=np.float64)
    b = np.empty(n, dtype=np.float64)
    products = _Products()
    step = torch_path._chunk(max(d1, d2), torch.float64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        xc, yc = centre_x.rows(start, stop), centre_y.rows(start, stop)
        products.add(xc, yc)
        a[start:stop], b[start:stop] = centre_x.norms(xc), centre_y.norms(yc)
    rx, ry = centre_x.residual, centre_y.residual
    cxy, cxx, cyy = products.totals
    cross = _corrected_frobenius_sq(cxy, rx, ry, n)
    sxx = _corrected_frobenius_sq(cxx, rx, rx, n)
    syy = _corrected_frobenius_sq(cyy, ry, ry, n)

    def scalar(v):
        return torch.tensor(v, dtype=torch.float64)

    return (scalar(cross), GramStats(n, None, torch.from_numpy(a), scalar(sxx)),
            GramStats(n, None, torch.from_numpy(b), scalar(syy)))


@quiet
def shifted_gram(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """`(n, n)` float64 `Xc Xcᵀ` of a CPU `(n, d)` input, products in `work` (float32/float64).

    As `torch_path.shifted_gram`: each column chunk is shifted by the column mean rounded to
    `work`, multiplied as one `syrk` with accumulation in `work`, the chunks summed in float64
    and the sum double-centred in float64 (which removes what the rounded shift left).
    """
    n, d = x.shape
    shift = column_mean(x).astype(_NUMPY[work])
    step = max(64, torch_path.CHUNK_BYTES // (n * torch.finfo(work).bits // 8))
    buffer = np.empty((n, min(step, d)), dtype=shift.dtype)  # reused: fresh pages cost more
    gram = part = None
    for start in range(0, d, step):
        cols = min(step, d - start)
        out = buffer if cols == buffer.shape[1] else np.empty((n, cols), dtype=shift.dtype)
        shifted = np.subtract(_numpy(x[:, start:start + cols], work), shift[start:start + cols],
                              out=out)
        if gram is None:
            gram = (shifted @ shifted.T).astype(np.float64, copy=False)  # one buffer: syrk
            continue
        part = np.matmul(shifted, shifted.T, out=part)
        gram += part
    return torch_path.double_centre(torch.from_numpy(gram))
