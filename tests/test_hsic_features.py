"""Feature-space linear HSIC kernel (`vitsim.kernels.hsic_features`) against the float64 reference.

Runs under the Triton interpreter on CPU (CI) and compiled on CUDA (`pytest -m gpu`).
"""

import numpy as np
import pytest
import torch

import vitsim
from vitsim import _dispatch, reference
from vitsim._stats import cka_from_stats, hsic_triple
from vitsim.kernels import _launch, hsic_features
from _data import related_pair, to_numpy
from conftest import KERNEL_DEVICES

# conventions §8, absolute error in CKA against the float64 reference on the same rounded inputs:
# float32 at "highest" precision (tf32x3 on the GPU, exact float32 products under the
# interpreter) 1e-5; float16/bfloat16 inputs (float16 products, float32 accumulation) 1e-3.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# conventions §8: TF32 products ("high" precision) 2e-3.
TOL_TF32 = 2e-3

SHAPES = [(4, 1, 17), (33, 17, 200), (130, 200, 1)]


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """Scratch buffers start as NaN / -1: an entry a kernel forgot to write fails the test."""
    monkeypatch.setattr(_launch, "POISON_SCRATCH", True)


def _reference_stats(x, y):
    """float64 `‖XcᵀYc‖²`, `‖XcᵀXc‖²`, `‖YcᵀYc‖²` and the centred row norms²."""
    xc = to_numpy(x) - to_numpy(x).mean(axis=0)
    yc = to_numpy(y) - to_numpy(y).mean(axis=0)
    return ((xc.T @ yc) ** 2).sum(), ((xc.T @ xc) ** 2).sum(), ((yc.T @ yc) ** 2).sum(), \
        (xc**2).sum(axis=1), (yc**2).sum(axis=1)


def _check_cka(stats, x, y, tol):
    """CKA from the kernel statistics, both estimators, against the reference."""
    xn, yn = to_numpy(x), to_numpy(y)
    for unbiased in ([False, True] if x.shape[0] >= 4 else [False]):
        got = cka_from_stats(*stats, unbiased=unbiased).item()
        want = reference.cka(xn, yn, unbiased=unbiased)
        assert abs(got - want) <= tol, (unbiased, got, want)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,d1,d2", SHAPES, ids=str)
def test_feature_stats_match_reference(n, d1, d2, dtype, kernel_device):
    x, y = related_pair(n, d1, d2, dtype, seed=n + d1, device=kernel_device)
    cross, kx, ky = hsic_features.feature_stats(x, y)
    assert cross.dtype == torch.float64 and cross.ndim == 0 and cross.device == x.device
    assert kx.rows is None and ky.rows is None
    assert kx.diag.shape == (n,) and kx.diag.dtype == torch.float64
    _check_cka((cross, kx, ky), x, y, TOL[dtype])
    # the sums themselves, relative (float16 operands: ~2^-11 per centred value)
    rel = 1e-6 if dtype == torch.float32 else 2e-3
    want = _reference_stats(x, y)
    for got_v, want_v in zip((cross, kx.self_sum, ky.self_sum), want[:3]):
        assert abs(got_v.item() - want_v) <= rel * abs(want_v)
    for got_v, want_v in ((kx.diag, want[3]), (ky.diag, want[4])):
        np.testing.assert_allclose(got_v.cpu().numpy(), want_v, rtol=rel, atol=rel * want_v.max())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_api_runs_feature_kernel(dtype, kernel_device):
    n, d1, d2 = 130, 17, 5
    assert _dispatch.linear_space(n, d1, d2) == "feature"
    x, y = related_pair(n, d1, d2, dtype, seed=3, device=kernel_device)
    xn, yn = to_numpy(x), to_numpy(y)
    for unbiased in (False, True):
        got = vitsim.cka(x, y, unbiased=unbiased, backend="triton")
        assert got.dtype == torch.float64 and got.device == x.device
        assert abs(got.item() - reference.cka(xn, yn, unbiased=unbiased)) <= TOL[dtype]
        # HSIC relative to its natural scale sqrt(HSIC(x,x)·HSIC(y,y))
        h = vitsim.hsic(x, y, unbiased=unbiased, backend="triton").item()
        scale = np.sqrt(reference.hsic(xn, xn, unbiased=unbiased)
                        * reference.hsic(yn, yn, unbiased=unbiased))
        assert abs(h - reference.hsic(xn, yn, unbiased=unbiased)) <= TOL[dtype] * scale


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous_views(kernel_device):
    n, d1, d2 = 33, 17, 40
    base_x, base_y = related_pair(n, 2 * d1 + 3, d2, torch.float32, seed=5, device=kernel_device)
    # column-major y (unit row stride: no copy), a column-strided x (no unit stride: copied)
    y = base_y.T.contiguous().T
    x = base_x[:, 3::2]
    assert x.shape == (n, d1) and y.stride(0) == 1 and x.stride(1) == 2
    cross, kx, ky = hsic_features.feature_stats(x, y)
    _check_cka((cross, kx, ky), x, y, TOL[torch.float32])
    # an offset slice with unit column stride is used in place
    x2 = base_x[2:, 5:5 + d1]
    y2 = base_y[2:]
    _check_cka(hsic_features.feature_stats(x2, y2), x2, y2, TOL[torch.float32])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype, kernel_device):
    x, y = related_pair(130, 40, 17, dtype, seed=7, device=kernel_device)
    first = hsic_features.feature_stats(x, y)
    second = hsic_features.feature_stats(x, y)
    for a, b in ((first[0], second[0]), (first[1].self_sum, second[1].self_sum),
                 (first[2].self_sum, second[2].self_sum), (first[1].diag, second[1].diag),
                 (first[2].diag, second[2].diag)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e3), (torch.bfloat16, 100.0),
                                          (torch.float16, 100.0)], ids=str)
def test_large_offset(dtype, offset, kernel_device):
    """conventions §3: centring before the products keeps every digit under a large common offset."""
    x, y = related_pair(130, 17, 5, dtype, seed=9, device=kernel_device, offset=offset)
    _check_cka(hsic_features.feature_stats(x, y), x, y, TOL[dtype])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_tf32_precision(kernel_device):
    x, y = related_pair(33, 17, 200, torch.float32, seed=11, device=kernel_device)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert _launch.dot_precision(torch.float32) == "tf32"
        stats = hsic_features.feature_stats(x, y)
    finally:
        torch.set_float32_matmul_precision(previous)
    _check_cka(stats, x, y, TOL_TF32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mixed_dtypes_and_float64(kernel_device):
    x, y = related_pair(33, 17, 5, torch.float32, seed=13, device=kernel_device)
    # a half/float32 pair multiplies float32 operands (no copy): the float32 bound applies
    xb = x.to(torch.bfloat16)
    _check_cka(hsic_features.feature_stats(xb, y), xb, y, TOL[torch.float32])
    # float64 runs the torch path inside the launcher (conventions §8: 1e-10)
    x64, y64 = x.double(), y.double()
    _check_cka(hsic_features.feature_stats(x64, y64), x64, y64, 1e-10)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_constant_column_and_hsic_terms(kernel_device):
    """A constant feature contributes nothing; all three HSIC terms match the reference."""
    x, y = related_pair(33, 17, 3, torch.float32, seed=17, device=kernel_device)
    x[:, 4] = 2.5
    stats = hsic_features.feature_stats(x, y)
    xn, yn = to_numpy(x), to_numpy(y)
    for unbiased in (False, True):
        got = hsic_triple(*stats, unbiased=unbiased)
        want = (reference.hsic(xn, yn, unbiased=unbiased), reference.hsic(xn, xn, unbiased=unbiased),
                reference.hsic(yn, yn, unbiased=unbiased))
        for g, w in zip(got, want):
            assert abs(g.item() - w) <= 1e-5 * abs(want[1] * want[2]) ** 0.5
