"""Attention-distance benchmark workloads (issue 4): W3 reads attention maps, W4 starts from q, k.

W3 is bandwidth-bound: its figure is the bytes of attention read (the spatial query rows, all
N keys each) per second, against the measured copy bandwidth; target ≥ 85% of it. W4's target
is ≤ 0.7× the time of `scaled_dot_product_attention`'s forward on the same q, k (and a random
v), with O(B·H·N) extra memory. The baseline of W3 is the torch path (softmax maps already
formed, chunked reduction).
"""

from __future__ import annotations

import torch

from .. import _dispatch, torch_attention
from ..attention import attention_distance, attention_distance_qk
from .workload import Workload

# (B, H, grid, P): a ViT-B/16 at 224 px (N = 197), and a 64×64 grid with a class token (N = 4,097).
W3_FULL = [(64, 12, (14, 14), 1), (4, 16, (64, 64), 1)]
W3_SMOKE = [(2, 3, (7, 7), 1), (1, 2, (4, 8), 1)]
# (B, H, grid, P, D): N = 4,096 patches, no prefix token.
W4_FULL = (4, 16, (64, 64), 0, 64)
W4_SMOKE = (1, 2, (4, 8), 0, 16)


def _backend(device: torch.device, kernel: tuple[str, str]) -> str:
    """"triton" where the kernel can run on `device` (CUDA, or CPU under the interpreter),
    else "torch"."""
    try:
        return _dispatch.resolve_backend("triton", device, kernel)
    except _dispatch.BackendUnavailableError:
        return "torch"


def _maps_setup(b, h, grid, p, dtype):
    def setup(device):
        n = p + grid[0] * grid[1]
        g = torch.Generator(device=device).manual_seed(0)
        attn = torch.empty(b, h, n, n, dtype=dtype, device=device)
        # One example at a time: the float32 logits never exceed one example's maps.
        for i in range(b):
            logits = 2.0 * torch.randn(h, n, n, generator=g, device=device)
            attn[i] = torch.softmax(logits, dim=-1).to(dtype)
        return {"attn": attn}

    return setup


def _maps_reference(grid, p):
    def reference(inputs) -> float:
        # Float64 torch path, one example at a time; all examples have the same weight.
        attn = inputs["attn"]
        total = 0.0
        for i in range(attn.shape[0]):
            dist, _ = torch_attention.maps_distance(attn[i:i + 1].to(torch.float64), grid, p)
            total += float(dist.mean(dim=(0, 2)).sum()) * 16.0
        return total / (attn.shape[0] * attn.shape[1])

    return reference


def _mean_over_heads(result) -> float:
    return float(result.double().mean())


def _w3(device: torch.device, smoke: bool) -> list[Workload]:
    backend = _backend(device, _dispatch.ATTENTION_MAPS_KERNEL)
    out = []
    for b, h, grid, p in W3_SMOKE if smoke else W3_FULL:
        n = p + grid[0] * grid[1]
        for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            def run(inputs, grid=grid, p=p, backend=backend):
                return _mean_over_heads(attention_distance(
                    inputs["attn"], grid=grid, num_prefix_tokens=p, backend=backend))

            def baseline(inputs, grid=grid, p=p):
                return _mean_over_heads(attention_distance(
                    inputs["attn"], grid=grid, num_prefix_tokens=p, backend="torch"))

            out.append(Workload(
                name=f"W3 maps {tag} B{b} H{h} N{n}",
                suite="attention",
                setup=_maps_setup(b, h, grid, p, dtype),
                run=run,
                baseline=baseline,
                reference=_maps_reference(grid, p),
                bytes=float(b * h * (n - p) * n * dtype.itemsize),
                ceiling="copy",
                target="≥85% of copy bandwidth",
                info={"B": b, "H": h, "N": n, "grid": list(grid), "num_prefix_tokens": p,
                      "dtype": tag, "backend": backend,
                      "result": "mean over heads of the per-head mean distance (px)",
                      "bytes": "attention read: B·H·(N−P) query rows × N keys"},
            ))
    return out


def _w4(device: torch.device, smoke: bool) -> list[Workload]:
    backend = _backend(device, _dispatch.ATTENTION_QK_KERNEL)
    b, h, grid, p, d = W4_SMOKE if smoke else W4_FULL
    n = p + grid[0] * grid[1]
    dtype = torch.bfloat16

    def setup(device):
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g, device=device).to(dtype) for _ in range(3))
        return {"q": q, "k": k, "v": v}

    def run(inputs):
        return _mean_over_heads(attention_distance_qk(
            inputs["q"], inputs["k"], grid=grid, num_prefix_tokens=p, backend=backend))

    def baseline(inputs):
        out = torch.nn.functional.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
        # A read of one element: the same synchronising shape as `run`.
        return float(out[0, 0, 0, 0])

    def reference(inputs) -> float:
        total = 0.0
        for i in range(b):
            q64, k64 = (inputs[x][i:i + 1].to(torch.float64) for x in ("q", "k"))
            dist = torch_attention.qk_distance(q64, k64, d ** -0.5, grid, p)
            total += float(dist.mean(dim=(0, 2)).sum()) * 16.0
        return total / (b * h)

    return [Workload(
        name=f"W4 qk bf16 B{b} H{h} N{n} D{d}",
        suite="attention",
        setup=setup,
        run=run,
        baseline=baseline,
        reference=reference,
        flops=float(2 * b * h * n * n * d),
        bytes=float(2 * b * h * n * d * dtype.itemsize),
        ceiling="matmul_bf16",
        target="≤0.7× SDPA forward time; extra memory O(B·H·N)",
        info={"B": b, "H": h, "N": n, "D": d, "grid": list(grid), "num_prefix_tokens": p,
              "dtype": "bf16", "backend": backend,
              "baseline": "torch.nn.functional.scaled_dot_product_attention forward (q, k, v)",
              "result": "mean over heads of the per-head mean distance (px)",
              "flops": "q kᵀ only: 2·B·H·N²·D"},
    )]


def workloads(device: torch.device, smoke: bool) -> list[Workload]:
    """The W3 (maps) and W4 (q/k) workloads on `device`; `smoke=True`: tiny sizes that run on
    CPU in seconds (the Triton backend only where it can run there, else the torch path)."""
    device = torch.device(device)
    return _w3(device, smoke) + _w4(device, smoke)
