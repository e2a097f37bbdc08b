"""Launch-side helpers shared by the HSIC kernel modules (no Triton kernels here).

Dtypes, strides, precision and scratch buffers are decided the same way by every launcher, so
the kernels of `hsic_features`, `hsic_gram` and `rbf_median` see the same operands and the
distances of `rbf_median` are bit-identical to those the RBF statistics use.
"""

from __future__ import annotations

import os

import torch

# Tests set this to True: scratch buffers then start as NaN (float) or -1 (int), so an entry a
# kernel never wrote shows up in the result instead of passing silently.
POISON_SCRATCH = False

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True under `TRITON_INTERPRET=1` (kernels run on CPU tensors, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def scratch(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer the kernel fills entirely (NaN / -1 when `POISON_SCRATCH`)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not POISON_SCRATCH:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def strided_operand(x: torch.Tensor) -> torch.Tensor:
    """`x` `(n, d)` unchanged when one of its strides is 1 (the kernels take both strides, so
    row- and column-major views need no copy); a contiguous copy only when neither is."""
    if x.stride(1) == 1 or x.stride(0) == 1 or x.shape[1] == 1:
        return x
    return x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for float32 operands (conventions §3); ignored for half types.

    "highest" → "tf32x3" (float32 accuracy from three TF32 products); "high"/"medium" → "tf32".
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def half_operands(*tensors: torch.Tensor) -> bool:
    """True when every input is float16/bfloat16: the `tl.dot` operands are then float16."""
    return all(t.dtype in HALF_DTYPES for t in tensors)


def operand_meta(*tensors: torch.Tensor) -> dict:
    """The `tl.constexpr` arguments that say how centred tiles become `tl.dot` operands.

    float16/bfloat16 inputs: float16 operands scaled by a power of two (see
    `vitsim.kernels.centring`; this also keeps the interpreter away from its bfloat16 `tl.dot`,
    which multiplies raw bits), split into hi + lo for fewer than `SPLIT_BELOW` examples.
    Otherwise (float32, or a float32/half mix, no copy needed since
    tiles are converted as they load): float32 operands at the precision conventions §3 asks for.
    """
    import triton.language as tl

    from .centring import SPLIT_BELOW

    if half_operands(*tensors):
        split = tensors[0].shape[0] < SPLIT_BELOW
        return dict(DOT_DTYPE=tl.float16, PRECISION="tf32", SPLIT=split)
    return dict(DOT_DTYPE=tl.float32, PRECISION=dot_precision(torch.float32), SPLIT=False)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small constant under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
