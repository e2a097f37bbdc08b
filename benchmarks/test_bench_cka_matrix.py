"""CPU benchmark (issue 5): `vitsim.cka_matrix` over 12 × 12 layers against the pairwise loop.

Run: .venv/bin/python -m pytest benchmarks/test_bench_cka_matrix.py --benchmark-only
Layers of n = 512 examples with d = 197·192 features (a small ViT block, flattened), float32.
`cka_matrix` forms 24 centred Gram matrices and one HSIC product; the loop
`[[cka(a, b) for b in ys] for a in xs]` forms two Gram matrices per pair, 288 in all. The
pairwise loop takes minutes on two cores, so it runs one round.
"""

import platform

import numpy as np
import pytest
import torch

import vitsim

LAYERS, N, D = 12, 512, 197 * 192
_times: dict[str, float] = {}
_results: dict[str, np.ndarray] = {}


@pytest.fixture(scope="module")
def layers():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, D, generator=g)
    # Each layer a differently noisy copy of a common signal, so CKA is neither 0 nor 1.
    xs = [base + (k + 1) * 0.3 * torch.randn(N, D, generator=g) for k in range(LAYERS)]
    ys = [torch.relu(base) + (k + 1) * 0.3 * torch.randn(N, D, generator=g) for k in range(LAYERS)]
    return xs, ys


def _info(benchmark, what):
    benchmark.extra_info.update({
        "what": what, "layers": f"{LAYERS}x{LAYERS}", "n": N, "d": D, "dtype": "float32",
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "vitsim": vitsim.__version__,
        # Gram GEMM flops (2·n²·d per Gram), the part that dominates both
        "gram_flops": 2 * N * N * D * (2 * LAYERS if what == "cka_matrix" else 2 * LAYERS * LAYERS),
    })


def test_cka_matrix_12x12(benchmark, layers):
    xs, ys = layers
    benchmark.group = "cka 12x12 layers, n=512, d=37824, float32, CPU"
    _info(benchmark, "cka_matrix")
    out = benchmark.pedantic(lambda: vitsim.cka_matrix(xs, ys), rounds=3, warmup_rounds=1)
    _times["matrix"] = benchmark.stats.stats.median
    _results["matrix"] = out.numpy()


def test_pairwise_loop_12x12(benchmark, layers):
    xs, ys = layers
    benchmark.group = "cka 12x12 layers, n=512, d=37824, float32, CPU"
    _info(benchmark, "pairwise loop")

    def loop():
        return [[vitsim.cka(a, b) for b in ys] for a in xs]

    out = benchmark.pedantic(loop, rounds=1, warmup_rounds=0)
    pairwise = np.array([[v.item() for v in row] for row in out])
    _times["pairwise"] = benchmark.stats.stats.median
    if "matrix" in _times:
        ratio = _times["pairwise"] / _times["matrix"]
        benchmark.extra_info["speedup_of_cka_matrix"] = ratio
        print(f"\ncka_matrix {_times['matrix']:.2f} s, pairwise loop {_times['pairwise']:.2f} s: "
              f"cka_matrix is {ratio:.1f}x faster")
        # Same numbers both ways (float32, conventions §8).
        assert np.abs(_results["matrix"] - pairwise).max() <= 1e-5
