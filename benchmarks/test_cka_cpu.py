"""CPU benchmark of linear CKA (issue #2): the torch path against the naive Gram formula.

    pytest benchmarks/test_cka_cpu.py --benchmark-only

n = 4,096, d1 = 2,048, d2 = 1,024, float32. The naive formula forms K = XXᵀ and L = YYᵀ,
centres them with H = I − 11ᵀ/n and takes traces (Kornblith et al.'s notebook, in torch).
"""

import pytest
import torch

import vitsim

N, D1, D2 = 4096, 2048, 1024


def naive_gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(KHLH) / sqrt(tr(KHKH) tr(LHLH)) with explicit n×n matrices (float32 products)."""
    n = x.shape[0]
    h = torch.eye(n) - torch.full((n, n), 1.0 / n)
    kc = h @ (x @ x.T) @ h
    lc = h @ (y @ y.T) @ h
    kl = torch.sum(kc * lc, dtype=torch.float64)
    kk = torch.sum(kc * kc, dtype=torch.float64)
    ll = torch.sum(lc * lc, dtype=torch.float64)
    return (kl / torch.sqrt(kk * ll)).item()


@pytest.fixture(scope="module")
def features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D1, generator=g)
    y = torch.tanh(x @ torch.randn(D1, D2, generator=g) / D1**0.5) + 0.5 * torch.randn(N, D2, generator=g)
    return x, y


def _info(benchmark):
    benchmark.extra_info.update(n=N, d1=D1, d2=D2, dtype="float32", threads=torch.get_num_threads())


def test_cka_torch_path(benchmark, features):
    x, y = features
    _info(benchmark)
    value = benchmark.pedantic(lambda: vitsim.cka(x, y, backend="torch").item(), rounds=5, warmup_rounds=1)
    assert 0 < value < 1


def test_cka_naive_gram(benchmark, features):
    x, y = features
    _info(benchmark)
    value = benchmark.pedantic(lambda: naive_gram_cka(x, y), rounds=2, warmup_rounds=1)
    assert 0 < value < 1
