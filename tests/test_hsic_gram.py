"""Gram-space HSIC kernel, linear and RBF (`vitsim.kernels.hsic_gram`), against the reference.

Runs under the Triton interpreter on CPU (CI) and compiled on CUDA (`pytest -m gpu`).
"""

import numpy as np
import pytest
import torch

import vitsim
from vitsim import _dispatch, reference
from vitsim._stats import cka_from_stats
from vitsim.kernels import _launch, hsic_gram, rbf_median
from _data import related_pair, to_numpy
from conftest import KERNEL_DEVICES

# conventions §8, absolute error in CKA against the float64 reference on the same rounded inputs:
# float32 at "highest" precision 1e-5; float16/bfloat16 inputs (float16 products, float32
# accumulation) 1e-3; float64 (torch path inside the launcher) 1e-10.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}

SHAPES = [(4, 1, 17), (33, 17, 200), (130, 200, 1)]


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """Scratch buffers start as NaN / -1: an entry a kernel forgot to write fails the test."""
    monkeypatch.setattr(_launch, "POISON_SCRATCH", True)


def _centred_gram(z):
    zc = to_numpy(z) - to_numpy(z).mean(axis=0)
    return zc @ zc.T


def _check_cka(stats, x, y, tol, **kw):
    xn, yn = to_numpy(x), to_numpy(y)
    for unbiased in ([False, True] if x.shape[0] >= 4 else [False]):
        got = cka_from_stats(*stats, unbiased=unbiased).item()
        want = reference.cka(xn, yn, unbiased=unbiased, **kw)
        assert abs(got - want) <= tol, (unbiased, got, want)


def _check_gram_stats(stats, k, l, rel):
    """Σ K∘L, Σ K∘K, Σ L∘L, row sums and diagonals against float64 Gram matrices."""
    cross, sk, sl = stats
    scale_k, scale_l = np.abs(k).max(), np.abs(l).max()
    n = k.shape[0]
    assert abs(cross.item() - (k * l).sum()) <= rel * n * n * scale_k * scale_l
    assert abs(sk.self_sum.item() - (k * k).sum()) <= rel * n * n * scale_k**2
    assert abs(sl.self_sum.item() - (l * l).sum()) <= rel * n * n * scale_l**2
    for got, m, scale in ((sk, k, scale_k), (sl, l, scale_l)):
        assert got.rows.dtype == torch.float64 and got.rows.shape == (n,)
        np.testing.assert_allclose(got.rows.cpu().numpy(), m.sum(axis=1), atol=rel * n * scale)
        np.testing.assert_allclose(got.diag.cpu().numpy(), np.diag(m), atol=rel * scale)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,d1,d2", SHAPES, ids=str)
def test_linear_gram_stats_match_reference(n, d1, d2, dtype, kernel_device):
    x, y = related_pair(n, d1, d2, dtype, seed=n + d2, device=kernel_device)
    stats = hsic_gram.gram_stats(x, y)
    assert stats[0].dtype == torch.float64 and stats[0].ndim == 0 and stats[0].device == x.device
    _check_cka(stats, x, y, TOL[dtype])
    rel = 1e-6 if dtype == torch.float32 else 2e-3
    _check_gram_stats(stats, _centred_gram(x), _centred_gram(y), rel)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,d1,d2", SHAPES[:2], ids=str)
def test_rbf_gram_stats_match_reference(n, d1, d2, dtype, kernel_device):
    """Given bandwidths (the median is tested in test_rbf_median.py)."""
    x, y = related_pair(n, d1, d2, dtype, seed=n + d1, device=kernel_device)
    sx2 = reference.median_sq_distance(to_numpy(x))
    sy2 = 0.5 * reference.median_sq_distance(to_numpy(y))
    stats = hsic_gram.gram_stats(x, y, kernel="rbf", sigma2_x=sx2,
                                 sigma2_y=torch.tensor(sy2, dtype=torch.float64, device=x.device))
    _check_cka(stats, x, y, TOL[dtype], kernel="rbf", sigma=(sx2**0.5, sy2**0.5))
    k = reference.gram_rbf(to_numpy(x), sigma=sx2**0.5)
    l = reference.gram_rbf(to_numpy(y), sigma=sy2**0.5)
    _check_gram_stats(stats, k, l, 1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rbf_zero_bandwidth_is_the_indicator_limit(kernel_device):
    """σ² = 0: K_ij = 1[D²_ij = 0] (duplicated rows give off-diagonal ones)."""
    x, y = related_pair(33, 5, 3, torch.float32, seed=21, device=kernel_device)
    x[10:14] = x[3]
    y[20:22] = y[0]
    stats = hsic_gram.gram_stats(x, y, kernel="rbf", sigma2_x=0.0, sigma2_y=0.0)
    k = reference.gram_rbf(to_numpy(x), sigma=0.0)
    l = reference.gram_rbf(to_numpy(y), sigma=0.0)
    assert k.sum() > 33 + 10 and l.sum() > 33
    _check_gram_stats(stats, k, l, 1e-12)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_public_api_runs_gram_kernel(kernel, dtype, kernel_device):
    """`vitsim.cka`/`vitsim.hsic` with backend="triton": median bandwidth, both estimators."""
    n, d1, d2 = 33, 200, 17
    assert _dispatch.linear_space(n, d1, d2) == "gram"
    x, y = related_pair(n, d1, d2, dtype, seed=23, device=kernel_device)
    xn, yn = to_numpy(x), to_numpy(y)
    for unbiased in (False, True):
        got = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased, backend="triton")
        assert got.dtype == torch.float64 and got.device == x.device
        want = reference.cka(xn, yn, kernel=kernel, unbiased=unbiased)
        assert abs(got.item() - want) <= TOL[dtype]
    h = vitsim.hsic(x, y, kernel=kernel, backend="triton").item()
    scale = np.sqrt(reference.hsic(xn, xn, kernel=kernel) * reference.hsic(yn, yn, kernel=kernel))
    assert abs(h - reference.hsic(xn, yn, kernel=kernel)) <= TOL[dtype] * scale


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rbf_uses_the_median_kernel_distances(kernel_device):
    """The RBF tiles are `exp(−D²/(2σ²))` of exactly the distances `rbf_median` selects from."""
    x, y = related_pair(33, 17, 9, torch.float32, seed=25, device=kernel_device)
    sx2 = rbf_median.median_sq_distance(x)
    sy2 = rbf_median.median_sq_distance(y)
    cross, sk, sl = hsic_gram.gram_stats(x, y, kernel="rbf", sigma2_x=sx2, sigma2_y=sy2)
    k = np.exp(-rbf_median.sq_distances(x).double().cpu().numpy() / (2 * sx2.item()))
    l = np.exp(-rbf_median.sq_distances(y).double().cpu().numpy() / (2 * sy2.item()))
    # float32 exp of the same float32 distances: a few ulps per entry
    assert abs(cross.item() - (k * l).sum()) <= 1e-6 * (k * l).sum()
    np.testing.assert_allclose(sk.rows.cpu().numpy(), k.sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(sl.rows.cpu().numpy(), l.sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous_views(kernel_device):
    n, d1, d2 = 33, 40, 17
    base_x, base_y = related_pair(n + 3, 2 * d1, d2, torch.float32, seed=27, device=kernel_device)
    x = base_x[3:, ::2]  # no unit stride: copied
    y = base_y[3:].T.contiguous().T  # column-major: used in place
    assert x.stride(1) == 2 and y.stride(0) == 1
    _check_cka(hsic_gram.gram_stats(x, y), x, y, TOL[torch.float32])
    sx2, sy2 = (reference.median_sq_distance(to_numpy(z)) for z in (x, y))
    stats = hsic_gram.gram_stats(x, y, kernel="rbf", sigma2_x=sx2, sigma2_y=sy2)
    _check_cka(stats, x, y, TOL[torch.float32], kernel="rbf")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_bitwise_deterministic(kernel, kernel_device):
    x, y = related_pair(130, 17, 40, torch.bfloat16, seed=29, device=kernel_device)
    kw = dict(sigma2_x=3.0, sigma2_y=2.0) if kernel == "rbf" else {}
    first = hsic_gram.gram_stats(x, y, kernel=kernel, **kw)
    second = hsic_gram.gram_stats(x, y, kernel=kernel, **kw)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1:], second[1:]):
        for field in ("rows", "diag", "self_sum"):
            assert torch.equal(getattr(a, field), getattr(b, field))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e3), (torch.bfloat16, 100.0)], ids=str)
def test_large_offset(dtype, offset, kernel_device):
    """conventions §3: centring as the tiles load keeps every digit under a large common offset."""
    x, y = related_pair(33, 40, 17, dtype, seed=31, device=kernel_device, offset=offset)
    _check_cka(hsic_gram.gram_stats(x, y), x, y, TOL[dtype])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_float64_and_mixed_dtypes(kernel_device):
    x, y = related_pair(33, 17, 40, torch.float64, seed=33, device=kernel_device)
    _check_cka(hsic_gram.gram_stats(x, y), x, y, 1e-10)
    stats = hsic_gram.gram_stats(x, y, kernel="rbf", sigma2_x=2.0, sigma2_y=3.0)
    _check_cka(stats, x, y, 1e-10, kernel="rbf", sigma=(2.0**0.5, 3.0**0.5))
    # a float16/float32 pair: each Gram matrix is formed from its own operand (as the median
    # sees it), so K has float16 products and the half-precision bound applies
    xh, yf = x.to(torch.float16), y.to(torch.float32)
    _check_cka(hsic_gram.gram_stats(xh, yf), xh, yf, TOL[torch.float16])


def test_unknown_kernel_and_missing_bandwidth():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="kernel"):
        hsic_gram.gram_stats(x, x, kernel="poly")
    with pytest.raises(ValueError, match="sigma2"):
        hsic_gram.gram_stats(x, x, kernel="rbf")
