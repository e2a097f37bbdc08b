"""The one place that picks the reference, the torch path or a Triton kernel.

`resolve_backend` turns the user's `backend=` into a concrete one; the `*_stats` functions
route a validated `(n, d)` pair to the chosen implementation. Triton is imported lazily, only
when a Triton backend is about to run, so a CPU-only install never needs it.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

from . import blas_cpu, grad_route, torch_path
from ._validate import BACKENDS, check_choice


class BackendUnavailableError(RuntimeError, ValueError):
    """`backend="triton"` was asked for where it cannot run (no CUDA device or no Triton)."""


def interpreter_enabled() -> bool:
    """True when `TRITON_INTERPRET=1`: Triton kernels then run (slowly) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when `import triton` works (CUDA builds of torch ship it)."""
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Can the Triton kernels run on tensors living on `device`?"""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()


def kernel_function(module: str, name: str):
    """`vitsim.kernels.<module>.<name>`, or None when that kernel has not been written."""
    try:
        mod = importlib.import_module(f"vitsim.kernels.{module}")
    except ImportError:
        return None
    return getattr(mod, name, None)


def resolve_backend(backend: str, device: torch.device, kernel: tuple[str, str] | None = None) -> str:
    """Map "auto"/"torch"/"triton"/"reference" to the backend that will run.

    Args:
        backend: the user's choice.
        device: where the inputs live.
        kernel: `(module, function)` of the Triton kernel that would serve this call.
    Returns:
        "reference", "torch" or "triton". "auto" picks Triton on CUDA when it imports and the
        kernel exists, the torch path otherwise (also on CPU under the interpreter, which is slow).
    """
    check_choice("backend", backend, BACKENDS)
    has_kernel = kernel is not None and triton_importable() and kernel_function(*kernel) is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_kernel and triton_runs_on(device) else "torch"
    if backend == "triton":
        if kernel is None or not triton_importable() or kernel_function(*kernel) is None:
            raise BackendUnavailableError(
                "backend='triton' is not available: Triton is not installed or has no kernel for "
                "this call; use backend='auto' or 'torch'"
            )
        if not triton_runs_on(device):
            raise BackendUnavailableError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU, or use backend='torch'"
            )
    return backend


# --- HSIC statistics ----------------------------------------------------------------------

FEATURE_KERNEL = ("hsic_features", "feature_stats")
GRAM_KERNEL = ("hsic_gram", "gram_stats")
MEDIAN_KERNEL = ("rbf_median", "median_sq_distance")


def linear_space(n: int, d1: int, d2: int) -> str:
    """"feature" or "gram": whichever needs fewer multiply-adds for linear HSIC/CKA.

    Feature space forms XcᵀYc, XcᵀXc, YcᵀYc (self terms symmetric): `n·(d1·d2 + (d1² + d2²)/2)`.
    Gram space forms K and L (both symmetric): `n²·(d1 + d2)/2`.
    """
    feature = n * (d1 * d2 + (d1 * d1 + d2 * d2) / 2)
    gram = n * n * (d1 + d2) / 2
    return "feature" if feature <= gram else "gram"


def linear_stats(x: torch.Tensor, y: torch.Tensor, backend: str, space: str | None = None):
    """`(Σ K∘L, GramStats_K, GramStats_L)` for the linear kernel on `(n, d1)`, `(n, d2)` inputs."""
    if x.requires_grad or y.requires_grad:
        return grad_route.linear_stats(x, y)
    space = space or linear_space(x.shape[0], x.shape[1], y.shape[1])
    kernel = FEATURE_KERNEL if space == "feature" else GRAM_KERNEL
    if resolve_backend(backend, x.device, kernel) == "triton":
        if space == "feature":
            return kernel_function(*FEATURE_KERNEL)(x, y)
        return kernel_function(*GRAM_KERNEL)(x, y, kernel="linear")
    if space == "feature":
        if x.device.type == "cpu":  # NumPy's BLAS has syrk for the self terms; torch has not
            return blas_cpu.linear_feature_stats(x, y)
        return torch_path.linear_feature_stats(x, y)
    return torch_path.linear_gram_stats(x, y)


def median_sq_distance(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Exact median of the n² squared distances of `x` `(n, d)`; 0-d float64 tensor."""
    if resolve_backend(backend, x.device, MEDIAN_KERNEL) == "triton":
        return kernel_function(*MEDIAN_KERNEL)(x)
    return torch_path.median_sq_distance(x)


def rbf_stats(x: torch.Tensor, y: torch.Tensor, backend: str, threshold: float,
              sigmas: tuple[float, float] | None):
    """`(Σ K∘L, GramStats_K, GramStats_L)` for the RBF kernel (median bandwidth unless `sigmas`)."""
    if x.requires_grad or y.requires_grad:
        return grad_route.rbf_stats(x, y, threshold, sigmas)
    if resolve_backend(backend, x.device, GRAM_KERNEL) == "triton":
        if sigmas is None:
            sigma2 = [threshold**2 * median_sq_distance(z, backend) for z in (x, y)]
        else:
            sigma2 = [torch.tensor(s * s, dtype=torch.float64, device=x.device) for s in sigmas]
        return kernel_function(*GRAM_KERNEL)(x, y, kernel="rbf", sigma2_x=sigma2[0], sigma2_y=sigma2[1])
    return torch_path.rbf_gram_stats(x, y, threshold, sigmas)


# --- Attention distance -------------------------------------------------------------------

ATTENTION_MAPS_KERNEL = ("attention_distance", "maps_distance")
ATTENTION_QK_KERNEL = ("attention_distance", "qk_distance")


def attention_maps_distance(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int,
                            backend: str):
    """`(dist, row_sums)` of validated `(B, H, N, N)` maps, both `(B, H, N − P)`.

    `dist` is `Σ_{k spatial} A·‖Δ‖` in patch units (float64 from the reference, otherwise the
    compute dtype), `row_sums` the full row sums of the spatial queries.
    """
    chosen = resolve_backend(backend, attn.device, ATTENTION_MAPS_KERNEL)
    if chosen == "triton":
        return kernel_function(*ATTENTION_MAPS_KERNEL)(attn, grid, num_prefix_tokens)
    if chosen == "torch":
        from . import torch_attention

        return torch_attention.maps_distance(attn, grid, num_prefix_tokens)
    from . import reference

    a64 = attn.detach().to(torch.float64).cpu().numpy()
    dist = reference.attention_distance_per_query(a64, 1.0, grid, num_prefix_tokens)
    row_sums = a64[:, :, num_prefix_tokens:].sum(axis=-1)
    return (torch.from_numpy(dist).to(attn.device), torch.from_numpy(row_sums).to(attn.device))


def attention_qk_distance(q: torch.Tensor, k: torch.Tensor, scale: float, grid: tuple[int, int],
                          num_prefix_tokens: int, backend: str) -> torch.Tensor:
    """`(B, H, N − P)` `Σ_{k spatial} softmax(q kᵀ·scale)·‖Δ‖` in patch units, never forming
    the N×N matrix on the Triton path."""
    chosen = resolve_backend(backend, q.device, ATTENTION_QK_KERNEL)
    if chosen == "triton":
        return kernel_function(*ATTENTION_QK_KERNEL)(q, k, scale, grid, num_prefix_tokens)
    if chosen == "torch":
        from . import torch_attention

        return torch_attention.qk_distance(q, k, scale, grid, num_prefix_tokens)
    from . import reference

    q64, k64 = (t.detach().to(torch.float64).cpu().numpy() for t in (q, k))
    dist = reference.attention_distance_qk(q64, k64, scale, 1.0, grid, num_prefix_tokens,
                                           reduction="none")
    return torch.from_numpy(dist).to(q.device)
