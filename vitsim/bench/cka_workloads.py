"""CKA benchmark workloads (issue 3): the feature-space, Gram-space and moonshot regimes.

- W1 feature regime: n = 65,536, d1 = d2 = 1,024, float32 with TF32 and bfloat16. Target: time
  ≤ 0.7× the torch matmul formula (centred copies, three full products) on the same data, and
  ≥ 70% of the measured matmul ceiling.
- W2 Gram regime: n = 8,192, d1 = d2 = 150,528 (a ViT block, 197 × 768, flattened), bfloat16,
  linear biased and unbiased, and RBF with the exact median bandwidth. Target: ≤ 0.6× the torch
  Gram formula (explicit n×n matrices), extra memory ≤ 1% of the inputs.
- Moonshot: exact linear CKA at n = 1,000,000, d = 4,096, bfloat16 (16 GB of inputs), reported
  as measured (goal: < 0.2 s on one H100).

`flops` counts the multiply-adds the kernels perform (×2): symmetric products once, and for RBF
the radix passes of the exact median too. The float64 reference is a chunked float64 torch
computation on the device (no float64 copy of the inputs).
"""

from __future__ import annotations

import torch

from .. import _dispatch, torch_path
from .._stats import GramStats, cka_from_stats
from ..cka import cka
from .ceilings import matmul_precision
from .workload import Workload

# (n, d1, d2): full size and smoke size (CPU, seconds).
W1 = {False: (65_536, 1024, 1024), True: (512, 64, 64)}
W2 = {False: (8192, 150_528, 150_528), True: (48, 2048, 2048)}
MOONSHOT = {False: (1_000_000, 4096, 4096), True: (4096, 32, 32)}
CHUNK_BYTES = 1 << 26


def _backend(device: torch.device, kernel: tuple[str, str]) -> str:
    """"triton" on CUDA when the kernel can run, else the torch path (also on CPU: the
    interpreter is far too slow for a benchmark, even in smoke mode)."""
    if device.type != "cuda":
        return "torch"
    try:
        return _dispatch.resolve_backend("triton", device, kernel)
    except _dispatch.BackendUnavailableError:
        return "torch"


def _setup(n: int, d1: int, d2: int, dtype: torch.dtype, seed: int):
    """Related activations: y's first columns are x's plus noise; both have a column offset."""
    def setup(device):
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, d1, generator=g, device=device, dtype=dtype)
        y = torch.randn(n, d2, generator=g, device=device, dtype=dtype)
        k = min(d1, d2)
        y[:, :k] += x[:, :k]
        x += 0.5
        return {"x": x, "y": y}

    return setup


# --- torch formulas (the baselines) -------------------------------------------------------


def feature_formula(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased linear CKA the plain torch way: centred copies, three full products, Frobenius
    norms (products in the input dtype, TF32 as the float32 matmul precision allows)."""
    xc = x - x.mean(dim=0)
    yc = y - y.mean(dim=0)
    cross = (xc.T @ yc).float().square().sum()
    sxx = (xc.T @ xc).float().square().sum()
    syy = (yc.T @ yc).float().square().sum()
    return cross / torch.sqrt(sxx * syy)


def _formula_gram(z: torch.Tensor, kernel: str) -> torch.Tensor:
    zc = z - z.mean(dim=0)
    k = (zc @ zc.T).float()
    if kernel == "linear":
        return k
    d2 = torch_path.sq_distances_from_gram(k)
    return torch_path.rbf_from_sq_distances(d2, torch_path.median(d2).float())


def _formula_hsic(k: torch.Tensor, l: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = k.shape[0]
    if not unbiased:
        kc = k - k.mean(dim=0) - k.mean(dim=1, keepdim=True) + k.mean()
        lc = l - l.mean(dim=0) - l.mean(dim=1, keepdim=True) + l.mean()
        return (kc * lc).sum() / (n - 1) ** 2
    kt = k - torch.diag(torch.diagonal(k))
    lt = l - torch.diag(torch.diagonal(l))
    rk, rl = kt.sum(dim=1), lt.sum(dim=1)
    value = (kt * lt).sum() + rk.sum() * rl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk @ rl)
    return value / (n * (n - 3))


def gram_formula(x: torch.Tensor, y: torch.Tensor, kernel: str, unbiased: bool) -> torch.Tensor:
    """CKA the plain torch way: explicit n×n Gram matrices (float32), the RBF bandwidth from a
    full sort of the distances, centring by row/column means."""
    k, l = _formula_gram(x, kernel), _formula_gram(y, kernel)
    kl = _formula_hsic(k, l, unbiased)
    return kl / torch.sqrt(_formula_hsic(k, k, unbiased) * _formula_hsic(l, l, unbiased))


# --- float64 references -------------------------------------------------------------------


def _mean64(z: torch.Tensor) -> torch.Tensor:
    step = max(1, CHUNK_BYTES // (8 * z.shape[1]))
    total = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
    for s in range(0, z.shape[0], step):
        total += z[s:s + step].to(torch.float64).sum(dim=0)
    return total / z.shape[0]


def feature_stats64(x: torch.Tensor, y: torch.Tensor):
    """Float64 feature-space statistics over row chunks (no float64 copy of the inputs)."""
    n, d1 = x.shape
    mx, my = _mean64(x), _mean64(y)
    acc = [torch.zeros(a, b, dtype=torch.float64, device=x.device)
           for a, b in ((d1, y.shape[1]), (d1, d1), (y.shape[1], y.shape[1]))]
    a = torch.empty(n, dtype=torch.float64, device=x.device)
    b = torch.empty(n, dtype=torch.float64, device=x.device)
    step = max(1, CHUNK_BYTES // (8 * max(d1, y.shape[1])))
    for s in range(0, n, step):
        xc = x[s:s + step].to(torch.float64) - mx
        yc = y[s:s + step].to(torch.float64) - my
        a[s:s + step] = xc.square().sum(dim=1)
        b[s:s + step] = yc.square().sum(dim=1)
        acc[0] += xc.T @ yc
        acc[1] += xc.T @ xc
        acc[2] += yc.T @ yc
    sq = [m.square().sum() for m in acc]
    return sq[0], GramStats(n, None, a, sq[1]), GramStats(n, None, b, sq[2])


def gram64(z: torch.Tensor) -> torch.Tensor:
    """Float64 `Zc Zcᵀ` over column chunks."""
    n, d = z.shape
    mean = _mean64(z)
    gram = torch.zeros(n, n, dtype=torch.float64, device=z.device)
    step = max(1, CHUNK_BYTES // (8 * n))
    for s in range(0, d, step):
        zc = z[:, s:s + step].to(torch.float64) - mean[s:s + step]
        gram += zc @ zc.T
    return gram


def _gram_stats64(k: torch.Tensor) -> GramStats:
    return GramStats(k.shape[0], k.sum(dim=1), torch.diagonal(k).clone(), k.square().sum())


def reference_cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", unbiased: bool = False,
                  space: str | None = None) -> float:
    """Float64 CKA of `x`, `y` `(n, d)` computed on their device in chunks."""
    space = space or _dispatch.linear_space(x.shape[0], x.shape[1], y.shape[1])
    if kernel == "linear" and space == "feature":
        return float(cka_from_stats(*feature_stats64(x, y), unbiased=unbiased))
    grams = []
    for z in (x, y):
        k = gram64(z)
        if kernel == "rbf":
            d2 = torch_path.sq_distances_from_gram(k)
            k = torch_path.rbf_from_sq_distances(d2, torch_path.median(d2))
        grams.append(k)
    k, l = grams
    return float(cka_from_stats((k * l).sum(), _gram_stats64(k), _gram_stats64(l), unbiased=unbiased))


# --- workloads ----------------------------------------------------------------------------


def _median_passes(d: int) -> int:
    """Radix passes of the exact median (`vitsim.kernels.rbf_median`) for `d` features."""
    try:
        from ..kernels import rbf_median
    except ImportError:
        return 3
    return len(rbf_median.PLANS[rbf_median.plan_for(d)])


def _w1(device, smoke) -> list[Workload]:
    n, d1, d2 = W1[smoke]
    backend = _backend(device, _dispatch.FEATURE_KERNEL)
    flops = 2.0 * n * (d1 * d2 + (d1 * d1 + d2 * d2) / 2)
    out = []
    for dtype, tag, precision, ceiling in ((torch.float32, "fp32 TF32", "high", "matmul_tf32"),
                                           (torch.bfloat16, "bf16", "highest", "matmul_bf16")):
        def run(inputs, precision=precision):
            with matmul_precision(precision):
                return cka(inputs["x"], inputs["y"], backend=backend)

        def baseline(inputs, precision=precision):
            with matmul_precision(precision):
                return feature_formula(inputs["x"], inputs["y"])

        out.append(Workload(
            name=f"W1 feature {tag}", suite="cka", setup=_setup(n, d1, d2, dtype, seed=1),
            run=run, baseline=baseline,
            reference=lambda inputs: reference_cka(inputs["x"], inputs["y"], space="feature"),
            flops=flops, ceiling=ceiling,
            target="≤0.7× torch matmul formula; ≥70% of matmul ceiling",
            info={"n": n, "d1": d1, "d2": d2, "dtype": tag, "backend": backend, "estimator": "biased",
                  "flops": "2·n·(d1·d2 + (d1² + d2²)/2): symmetric self terms",
                  "baseline": "centred copies, XcᵀYc, XcᵀXc, YcᵀYc, Frobenius norms"}))
    return out


def _w2(device, smoke) -> list[Workload]:
    n, d1, d2 = W2[smoke]
    backend = _backend(device, _dispatch.GRAM_KERNEL)
    gram_flops = float(n) * n * (d1 + d2)
    out = []
    for kernel, unbiased, tag in (("linear", False, "linear biased"),
                                  ("linear", True, "linear unbiased"), ("rbf", False, "rbf biased")):
        passes = _median_passes(max(d1, d2)) if kernel == "rbf" else 0
        out.append(Workload(
            name=f"W2 gram {tag} bf16", suite="cka", setup=_setup(n, d1, d2, torch.bfloat16, seed=2),
            run=lambda inputs, k=kernel, u=unbiased: cka(inputs["x"], inputs["y"], kernel=k,
                                                         unbiased=u, backend=backend),
            baseline=lambda inputs, k=kernel, u=unbiased: gram_formula(inputs["x"], inputs["y"], k, u),
            reference=lambda inputs, k=kernel, u=unbiased: reference_cka(
                inputs["x"], inputs["y"], kernel=k, unbiased=u, space="gram"),
            flops=gram_flops * (1 + passes), ceiling="matmul_bf16",
            target="≤0.6× torch Gram formula; extra memory ≤1% of inputs",
            info={"n": n, "d1": d1, "d2": d2, "dtype": "bf16", "backend": backend, "kernel": kernel,
                  "estimator": "unbiased" if unbiased else "biased",
                  "flops": "n²·(d1 + d2) per pass over the upper Gram tiles"
                           + (f"; 1 fused pass + {passes} median passes per input" if passes else ""),
                  "baseline": "explicit float32 n×n Gram matrices, centring by means"
                              + ("; median by full selection" if kernel == "rbf" else "")}))
    return out


def _moonshot(device, smoke) -> list[Workload]:
    n, d1, d2 = MOONSHOT[smoke]
    backend = _backend(device, _dispatch.FEATURE_KERNEL)
    return [Workload(
        name="Moonshot linear bf16 n=1M d=4096" if not smoke else "Moonshot linear bf16 (smoke)",
        suite="cka", setup=_setup(n, d1, d2, torch.bfloat16, seed=3),
        run=lambda inputs: cka(inputs["x"], inputs["y"], backend=backend),
        baseline=lambda inputs: feature_formula(inputs["x"], inputs["y"]),
        reference=lambda inputs: reference_cka(inputs["x"], inputs["y"], space="feature"),
        flops=2.0 * n * (d1 * d2 + (d1 * d1 + d2 * d2) / 2), ceiling="matmul_bf16",
        target="<0.2 s on one H100 (reported as measured)",
        info={"n": n, "d1": d1, "d2": d2, "dtype": "bf16", "backend": backend,
              "input_gb": round(2 * n * (d1 + d2) / 1e9, 2)})]


def workloads(device: torch.device, smoke: bool) -> list[Workload]:
    """W1, W2 and the moonshot on `device`; `smoke=True`: tiny sizes that run on CPU in seconds."""
    device = torch.device(device)
    return _w1(device, smoke) + _w2(device, smoke) + _moonshot(device, smoke)

