"""Torch's float32 matmul precision, read through whichever of its two APIs the user set.

torch has a legacy setting (`torch.set_float32_matmul_precision("highest" | "high" | "medium")`)
and a newer one (`torch.backends.cuda.matmul.fp32_precision = "ieee" | "tf32"`, falling back to
`torch.backends.fp32_precision`, "none" meaning "inherit"). Once the newer one is set, reading the
legacy one raises ("mix of the legacy and new APIs"), so vitsim reads the newer one first and the
legacy one only when the newer one says nothing.
"""

from __future__ import annotations

import torch

PRECISIONS = ("highest", "high", "medium")
_FROM_NEW = {"ieee": "highest", "tf32": "high"}


def _new_api() -> str | None:
    """"highest"/"high" from the newer API, or None when it is unset ("none") or absent."""
    for owner in (getattr(torch.backends.cuda, "matmul", None), torch.backends):
        try:
            value = getattr(owner, "fp32_precision", None)
        except (AttributeError, RuntimeError):
            value = None
        if isinstance(value, str) and value in _FROM_NEW:
            return _FROM_NEW[value]
    return None


def float32_matmul_precision() -> str:
    """"highest" (full float32 products), "high" or "medium" (TF32 allowed), never raising.

    Returns:
        The precision torch's CUDA float32 matmuls run at, read from
        `torch.backends.cuda.matmul.fp32_precision` (then `torch.backends.fp32_precision`) when
        either is set, else from `torch.get_float32_matmul_precision()`; "highest" if neither
        can be read.
    """
    new = _new_api()
    if new is not None:
        return new
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        return "highest"
    return legacy if legacy in PRECISIONS else "highest"


def allows_tf32() -> bool:
    """True when float32 products may run as TF32 ("high" or "medium")."""
    return float32_matmul_precision() != "highest"
