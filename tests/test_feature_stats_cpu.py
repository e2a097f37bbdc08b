"""The two CPU feature-space implementations of the linear statistics against the reference:
`vitsim.blas_cpu` (what `cka`/`hsic` run on CPU tensors: NumPy BLAS, syrk self terms) and
`vitsim.torch_path` (the CUDA torch path, exercised here on the CPU)."""

import numpy as np
import pytest
import torch

from vitsim import blas_cpu, reference, torch_path
from vitsim._stats import hsic_triple
from _data import related_pair, to_numpy

IMPLEMENTATIONS = {"blas_cpu": blas_cpu.linear_feature_stats,
                   "torch_path": torch_path.linear_feature_stats}

# Error of each HSIC term (cross, x self, y self; both estimators) against the float64 reference
# on the same rounded values, relative to the term's natural size: the biased self terms bx, by
# for the self terms and sqrt(bx·by) for the cross term (the unbiased estimator at small n is a
# near-cancellation of terms of that size, so its own value is no scale) (conventions §8): float64 products 1e-10; float32 products with
# float32 accumulation 1e-5 (half inputs are upcast to float32 first, so the same bound).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _check(stats, x, y, dtype):
    xn, yn = to_numpy(x), to_numpy(y)
    bx, by = reference.hsic(xn, xn), reference.hsic(yn, yn)
    scales = [np.sqrt(bx * by), bx, by]
    for unbiased in (False, True):
        got = [v.item() for v in hsic_triple(*stats, unbiased)]
        want = [reference.hsic(a, b, unbiased=unbiased) for a, b in ((xn, yn), (xn, xn), (yn, yn))]
        for g, w, scale in zip(got, want, scales):
            assert abs(g - w) <= TOL[dtype] * scale, (unbiased, g, w)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("n,d1,d2", [(4, 1, 3), (17, 257, 3), (301, 40, 67), (1000, 5, 1)], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset1e4"])
def test_feature_stats_match_reference(impl, dtype, n, d1, d2, offset):
    if offset and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("a 1e4 offset leaves no significant bits of half-precision noise")
    x, y = related_pair(n, d1, d2, dtype, seed=n + d1, offset=offset)
    _check(IMPLEMENTATIONS[impl](x, y), x, y, dtype)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_many_row_chunks_match_one(impl, monkeypatch):
    x, y = related_pair(517, 33, 20, torch.float32, seed=3, offset=50.0)
    whole = IMPLEMENTATIONS[impl](x, y)
    monkeypatch.setattr(torch_path, "CHUNK_BYTES", 64 * 33 * 8)  # 64-row chunks (the minimum)
    monkeypatch.setattr(torch_path, "MEAN_PARTIAL", 7)
    chunked = IMPLEMENTATIONS[impl](x, y)
    _check(chunked, x, y, torch.float32)
    got = [chunked[0], chunked[1].self_sum, chunked[2].self_sum]
    for a, b in zip(got, [whole[0], whole[1].self_sum, whole[2].self_sum]):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    torch.testing.assert_close(chunked[1].diag, whole[1].diag, rtol=1e-5, atol=0)


def test_blas_path_reads_strided_inputs_and_leaves_them_untouched():
    base_x, base_y = related_pair(90, 40, 31, torch.float32, seed=5)
    x = base_x.T.contiguous().T[:, ::2]  # column-major, every other column
    y = base_y[::1, 1:].requires_grad_(False)
    before = (x.clone(), y.clone())
    stats = blas_cpu.linear_feature_stats(x, y)
    _check(stats, x, y, torch.float32)
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


def test_blas_path_accepts_tensors_that_require_grad():
    x, y = related_pair(40, 6, 5, torch.float32, seed=6)
    stats = blas_cpu.linear_feature_stats(x.requires_grad_(), y)
    _check(stats, x.detach(), y, torch.float32)


def test_blas_path_same_input_same_bits():
    x, y = related_pair(700, 130, 65, torch.float32, seed=7, offset=3.0)
    first = blas_cpu.linear_feature_stats(x, y)
    again = blas_cpu.linear_feature_stats(x, y)
    assert torch.equal(first[0], again[0])
    for a, b in zip(first[1:], again[1:]):
        assert torch.equal(a.diag, b.diag) and torch.equal(a.self_sum, b.self_sum)


def test_column_mean_is_exact_under_a_large_offset():
    x, _ = related_pair(1001, 9, 1, torch.float32, seed=8, offset=3e5)
    want = to_numpy(x).mean(axis=0)
    spread = to_numpy(x).std(axis=0)
    # a float32 running sum of 1,001 values near 3e5 would be off by ~1e-2·spread
    assert np.all(np.abs(blas_cpu.column_mean(x) - want) <= 1e-6 * spread)
    assert np.all(np.abs(torch_path.column_mean(x).numpy() - want) <= 1e-6 * spread)
    assert np.all(np.abs(torch_path.column_mean_torch(x).numpy() - want) <= 1e-6 * spread)


@pytest.mark.parametrize("work", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset1e4"])
def test_centred_gram_both_implementations(work, offset, monkeypatch):
    """`blas_cpu.shifted_gram` (CPU, syrk) and `torch_path.shifted_gram_torch` (CUDA's code, run
    here on the CPU) against the float64 centred Gram matrix, over several column chunks."""
    x, _ = related_pair(37, 301, 1, work, seed=9, offset=offset)
    xd = to_numpy(x)
    xd = xd - xd.mean(axis=0)
    want = xd @ xd.T
    # float32: products of centred values with float32 accumulation over 301 columns
    tol = 1e-10 if work == torch.float64 else 1e-5
    monkeypatch.setattr(torch_path, "CHUNK_BYTES", 37 * 4 * 100)  # 100-column chunks
    for got in (blas_cpu.shifted_gram(x, work), torch_path.shifted_gram_torch(x, work)):
        assert got.dtype == torch.float64
        assert np.abs(got.numpy() - want).max() <= tol * np.abs(want).max()
