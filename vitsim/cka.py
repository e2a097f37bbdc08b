"""`vitsim.hsic` and `vitsim.cka`: validate, dispatch, return (conventions §1-3, §7)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _dispatch, reference
from ._stats import cka_from_stats, hsic_triple, hsic_unscaled
from ._validate import (
    BACKENDS,
    KERNELS,
    as_matrix,
    as_tensor,
    check_bool,
    check_choice,
    check_finite_result,
    check_n,
    check_pair,
    check_positive,
    check_sigma,
    raise_if_not_finite,
)


def _tracked(name: str, value) -> torch.Tensor:
    """`value` as a tensor, keeping its autograd graph only when a gradient can flow back."""
    tensor = as_tensor(name, value)
    if tensor.requires_grad and torch.is_grad_enabled():
        return tensor
    return tensor.detach()


def prepare_pair(x, y, unbiased: bool):
    """Validate two activation sets and view them as `(n, d1)`, `(n, d2)` tensors.

    Inputs that require grad keep their graph (under grad mode), so the result can be
    differentiated; the others are detached. Returns `(x2, y2, numpy_out)`; `numpy_out` is
    True when both inputs were NumPy arrays.
    """
    xt, yt = _tracked("x", x), _tracked("y", y)
    x2, y2 = as_matrix("x", xt), as_matrix("y", yt)
    check_pair(xt, yt)
    check_n(x2.shape[0], unbiased)
    numpy_out = isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
    return x2, y2, numpy_out


def finish(value: torch.Tensor, numpy_out: bool):
    """0-d float64 tensor (torch inputs) or `numpy.float64` (NumPy inputs)."""
    return np.float64(value.item()) if numpy_out else value


def _reference(x2, y2, what, kernel, unbiased, threshold, sigmas):
    # The oracle is slow anyway: scan the inputs up front.
    raise_if_not_finite(x=x2, y=y2)
    args = [z.detach().to(torch.float64).cpu().numpy() for z in (x2, y2)]
    fn = reference.cka if what == "cka" else reference.hsic
    value = fn(*args, kernel=kernel, unbiased=unbiased, threshold=threshold, sigma=sigmas)
    if np.isnan(value):
        warnings.warn("CKA is undefined (HSIC self-term <= 0 for x or y); returning NaN",
                      RuntimeWarning, stacklevel=4)
    return torch.tensor(value, dtype=torch.float64, device=x2.device)


def pair_stats(x2, y2, kernel, threshold, sigmas, backend):
    """`(Σ K∘L, GramStats_K, GramStats_L)` of a validated pair through the dispatcher."""
    if kernel == "linear":
        return _dispatch.linear_stats(x2, y2, backend)
    return _dispatch.rbf_stats(x2, y2, backend, threshold, sigmas)


def check_options(kernel, threshold, sigma):
    """Validate the kernel options shared by `hsic`, `cka` and the many-layer APIs."""
    check_choice("kernel", kernel, KERNELS)
    threshold = check_positive("threshold", threshold)
    sigmas = check_sigma(sigma)
    if kernel == "linear" and sigmas is not None:
        raise ValueError("sigma only applies to kernel='rbf'")
    return threshold, sigmas


def _similarity(what, x, y, kernel, unbiased, threshold, sigma, backend):
    threshold, sigmas = check_options(kernel, threshold, sigma)
    unbiased = check_bool("unbiased", unbiased)
    x2, y2, numpy_out = prepare_pair(x, y, unbiased)
    # the Triton/torch choice is made per call in `_dispatch` (it depends on the kernel)
    if check_choice("backend", backend, BACKENDS) == "reference":
        return finish(_reference(x2, y2, what, kernel, unbiased, threshold, sigmas), numpy_out)
    cross, k, l = pair_stats(x2, y2, kernel, threshold, sigmas, backend)
    terms = hsic_triple(cross, k, l, unbiased)
    check_finite_result(terms, {"x": x2, "y": y2},
                        "the result overflowed: rescale x and y (or pass float32 inputs)")
    if what == "hsic":
        return finish(hsic_unscaled(terms[0], k, l), numpy_out)
    return finish(cka_from_stats(cross, k, l, unbiased), numpy_out)


def hsic(x, y, *, kernel="linear", unbiased=False, threshold=1.0, sigma=None, backend="auto"):
    """Hilbert-Schmidt independence criterion between two activation sets (conventions §3).

    Args:
        x: `(n, ...)` activations; trailing axes are flattened in C order. torch.Tensor (CPU or
            CUDA) or numpy.ndarray; float16, bfloat16, float32 or float64.
        y: `(n, ...)` activations of the same n examples, on the same device; d may differ.
        kernel: "linear" or "rbf".
        unbiased: False for the biased estimator `tr(KHLH)/(n−1)²` (n ≥ 2), True for Song et
            al.'s unbiased estimator (n ≥ 4; it can be negative).
        threshold: RBF bandwidth `σ² = threshold² · median(D²)` (exact median).
        sigma: explicit RBF bandwidth σ (a number, or a pair `(σ_x, σ_y)`); overrides threshold.
        backend: "auto", "torch", "triton" or "reference".
    Returns:
        0-d float64 tensor on x's device (numpy.float64 when x and y are NumPy arrays).
        Differentiable when x or y requires grad (see `cka`).

    Example:
        >>> x = torch.randn(100, 64); vitsim.hsic(x, 2 * x) > 0
        tensor(True)
    """
    return _similarity("hsic", x, y, kernel, unbiased, threshold, sigma, backend)


def cka(x, y, *, kernel="linear", unbiased=False, threshold=1.0, sigma=None, backend="auto"):
    """Centered kernel alignment `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` (conventions §3).

    Args:
        x: `(n, ...)` activations; trailing axes are flattened in C order. torch.Tensor (CPU or
            CUDA) or numpy.ndarray; float16, bfloat16, float32 or float64.
        y: `(n, ...)` activations of the same n examples, on the same device; d may differ.
        kernel: "linear" or "rbf".
        unbiased: use the unbiased HSIC estimator in all three terms (n ≥ 4).
        threshold: RBF bandwidth `σ² = threshold² · median(D²)` (exact median).
        sigma: explicit RBF bandwidth σ (a number, or a pair `(σ_x, σ_y)`); overrides threshold.
        backend: "auto", "torch", "triton" or "reference".
    Returns:
        0-d float64 tensor on x's device (numpy.float64 when x and y are NumPy arrays). NaN,
        with a RuntimeWarning naming the input, when a self term is ≤ 0 (e.g. constant features).

    Gradients (conventions §3):
        When x or y requires grad (and grad mode is on) the result is a differentiable function
        of them, on CPU and CUDA, for both kernels and estimators, computed with plain torch ops
        whatever the backend (backend="reference" returns a constant). A given `sigma` is a
        constant; the median rule's σ² is computed from the inputs and also held constant, so
        its gradient equals the one with that σ passed as `sigma=`. Use it as a loss:
        `loss = 1 - vitsim.cka(student(x), teacher(x).detach()); loss.backward()`.

    Example:
        >>> x = torch.randn(100, 64); vitsim.cka(x, x)
        tensor(1.0000, dtype=torch.float64)
    """
    return _similarity("cka", x, y, kernel, unbiased, threshold, sigma, backend)
