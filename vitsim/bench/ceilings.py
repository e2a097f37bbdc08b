"""The device's own ceilings, measured in the same run as the workloads.

A large `torch.matmul` in bfloat16 and in float32 with TF32 gives the matmul ceilings (TFLOP/s),
a large device-to-device copy the memory bandwidth (GB/s, bytes read + bytes written). The
report expresses every workload as a percentage of one of these, so "83% of the copy
bandwidth" is measured on the same device, driver and clocks. On CPU (smoke mode) the same
measurements run at tiny sizes: they check the plumbing, not the machine.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .timing import measure

# Square matmul side and copy size: full (GPU) and smoke (CPU, seconds).
MATMUL_N = {False: 8192, True: 256}
COPY_BYTES = {False: 2 << 30, True: 16 << 20}


@contextmanager
def matmul_precision(precision: str):
    """Temporarily set `torch.set_float32_matmul_precision` ("highest", "high", "medium")."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _matmul(dtype: torch.dtype, n: int, device: torch.device, budget_s: float) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    timing = measure(lambda: torch.matmul(a, b, out=out), device, warmup=2, budget_s=budget_s)
    flops = 2.0 * n**3
    return {"value": flops / timing.median / 1e12, "unit": "TFLOP/s", "seconds": timing.median,
            "repeats": timing.repeats, "size": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}"}


def _copy(nbytes: int, device: torch.device, budget_s: float) -> dict:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, budget_s=budget_s)
    moved = 2.0 * src.numel() * 4
    return {"value": moved / timing.median / 1e9, "unit": "GB/s", "seconds": timing.median,
            "repeats": timing.repeats,
            "size": f"{src.numel() * 4 / 2**20:.0f} MiB copy (read + write counted)"}


def measure_ceilings(device: torch.device, smoke: bool = False) -> dict:
    """`{"matmul_bf16": {...}, "matmul_tf32": {...}, "copy": {...}}` measured on `device`.

    Each entry has `value` (TFLOP/s or GB/s), `unit`, `seconds` (median per call), `repeats`
    and `size`. "matmul_tf32" is a float32 matmul with TF32 allowed (plain float32 on CPU).
    """
    device = torch.device(device)
    budget = 0.05 if smoke else 0.5
    n = MATMUL_N[smoke]
    result = {"matmul_bf16": _matmul(torch.bfloat16, n, device, budget)}
    with matmul_precision("high"):
        result["matmul_tf32"] = _matmul(torch.float32, n, device, budget)
    result["copy"] = _copy(COPY_BYTES[smoke], device, budget)
    return result
