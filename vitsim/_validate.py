"""Input checks shared by every public entry point (the error table of conventions §7).

Each check raises with a message that names the offending argument, so a user never gets a
silent wrong number. Checks that would need a pass over the data (NaN/Inf) are done lazily:
callers inspect their (cheap) result first and call :func:`raise_if_not_finite` only when it
is not finite.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNELS = ("linear", "rbf")
BACKENDS = ("auto", "torch", "triton", "reference")


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """Return `value` as a torch tensor, or raise `TypeError` naming `name`.

    Accepts `torch.Tensor` and `numpy.ndarray` of float16/bfloat16/float32/float64. A tensor is
    returned as it is (its autograd graph included); an array is viewed without a copy unless
    torch cannot view it (see `_from_numpy`).
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        if value.dtype.kind != "f" or value.dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"{name} has dtype {value.dtype}; expected float16, float32 or float64")
        tensor = _from_numpy(value)
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {tensor.dtype}; expected one of float16, bfloat16, float32, float64"
        )
    return tensor


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing a float `array` of either byte order and any strides (conventions §1).

    torch views only native-order arrays whose strides are non-negative multiples of the item
    size; anything else (big-endian data, a reversed view such as `x[::-1]`, a field of a
    structured array) is copied once, converting to native order, with the axes in the array's
    memory order (`order="K"`). The caller's array is never modified.
    """
    viewable = array.dtype.isnative and all(
        s >= 0 and s % array.itemsize == 0 for s in array.strides)
    if not viewable:
        array = array.astype(array.dtype.newbyteorder("="), order="K")
    with warnings.catch_warnings():
        # vitsim never writes to its inputs, so a read-only array is safe to view.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def as_matrix(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """View an `(n, ...)` activation set as `(n, d)`, flattening trailing axes in C order.

    Reshapes without a copy whenever the strides allow it (`torch.reshape` semantics).
    """
    if tensor.ndim < 2:
        raise ValueError(
            f"{name} must have shape (n, ...) with at least 2 dimensions, got shape "
            f"{tuple(tensor.shape)}; for one feature per example use {name}.reshape(-1, 1)"
        )
    if any(s == 0 for s in tensor.shape[1:]):
        raise ValueError(f"{name} has no features: shape {tuple(tensor.shape)}")
    # an explicit width: `reshape(0, -1)` is ambiguous, and n = 0 is reported by `check_n`
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))


def check_pair(x: torch.Tensor, y: torch.Tensor, xname: str = "x", yname: str = "y") -> None:
    """Same number of examples and same device for two activation sets."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{xname} and {yname} must have the same number of examples n: "
            f"{xname}.shape={tuple(x.shape)}, {yname}.shape={tuple(y.shape)}"
        )
    if x.device != y.device:
        raise ValueError(
            f"{xname} is on {x.device} and {yname} on {y.device}; move both to the same device"
        )


def min_examples(unbiased: bool) -> int:
    """Smallest n the estimator is defined for: 2 (biased) or 4 (unbiased)."""
    return 4 if unbiased else 2


def check_n(n: int, unbiased: bool, what: str = "n") -> None:
    """`ValueError` naming n and the estimator when n is too small."""
    need = min_examples(unbiased)
    if n < need:
        est = "unbiased" if unbiased else "biased"
        raise ValueError(f"the {est} estimator needs {what} >= {need} examples, got {what}={n}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """`ValueError` listing the valid names when `value` is not one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, choices))}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """A Python or NumPy bool, or `TypeError` naming `name` (a string is not a flag)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0, or `ValueError` naming `name`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not np.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_sigma(sigma: Any) -> tuple[float, float] | None:
    """`sigma=None`, one bandwidth for both inputs, or a pair `(sigma_x, sigma_y)`."""
    if sigma is None:
        return None
    if isinstance(sigma, (tuple, list)):
        if len(sigma) != 2:
            raise ValueError(f"sigma must be a number or a pair (sigma_x, sigma_y), got {sigma!r}")
        return check_positive("sigma[0]", sigma[0]), check_positive("sigma[1]", sigma[1])
    s = check_positive("sigma", sigma)
    return s, s


def check_finite_result(results, inputs: dict, overflow: str) -> None:
    """One host sync on the (small) `results`; only when one is not finite, scan `inputs` (raising
    `ValueError` naming the first with NaN/Inf) and, if they are all finite, raise `overflow`.

    Args:
        results: a tensor or a sequence of tensors (any shapes) computed from `inputs`.
        inputs: `{argument name: tensor}`.
        overflow: the message when the inputs are finite but a result is not.
    """
    results = results if isinstance(results, (list, tuple)) else (results,)
    if bool(torch.isfinite(torch.cat([r.reshape(-1) for r in results])).all()):
        return
    raise_if_not_finite(**inputs)
    raise ValueError(overflow)


def raise_if_not_finite(**tensors: torch.Tensor) -> None:
    """Scan the named tensors and raise `ValueError` naming the first with NaN or Inf.

    Called only after a result came out non-finite, so finite data never pays for the scan.
    """
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise ValueError(f"{name} contains {bad} values")
