"""Invariances of CKA (Kornblith et al. 2019), checked with hypothesis on seeded float64 data."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitsim
from vitsim import _dispatch
from vitsim._stats import hsic_triple

PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# float64 everywhere: the properties are exact in exact arithmetic, so 1e-9 bounds rounding.
TOL = 1e-9

sizes = st.tuples(st.integers(6, 40), st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**31))
kernels = st.sampled_from(["linear", "rbf"])
estimators = st.booleans()


def _pair(n, d1, d2, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y, g


def _close(a, b):
    a, b = float(a), float(b)
    return (np.isnan(a) and np.isnan(b)) or abs(a - b) <= TOL


@PROPS
@given(sizes, kernels, estimators)
def test_self_similarity_is_one(size, kernel, unbiased):
    x, _, _ = _pair(*size)
    assert abs(vitsim.cka(x, x, kernel=kernel, unbiased=unbiased).item() - 1.0) <= TOL


@PROPS
@given(sizes, kernels, estimators)
def test_symmetry(size, kernel, unbiased):
    x, y, _ = _pair(*size)
    assert _close(vitsim.cka(x, y, kernel=kernel, unbiased=unbiased), vitsim.cka(y, x, kernel=kernel, unbiased=unbiased))


@PROPS
@given(sizes, kernels, estimators)
def test_orthogonal_transform_invariance(size, kernel, unbiased):
    x, y, g = _pair(*size)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=g, dtype=torch.float64))
    base = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased)
    assert _close(vitsim.cka(x @ q, y, kernel=kernel, unbiased=unbiased), base)


@PROPS
@given(sizes, kernels, estimators, st.floats(1e-3, 1e3))
def test_isotropic_scale_invariance(size, kernel, unbiased, scale):
    x, y, _ = _pair(*size)
    base = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased)
    assert _close(vitsim.cka(scale * x, y, kernel=kernel, unbiased=unbiased), base)


@PROPS
@given(sizes, kernels, estimators, st.floats(-1e3, 1e3))
def test_common_translation_invariance(size, kernel, unbiased, shift):
    x, y, g = _pair(*size)
    offset = shift * torch.rand(x.shape[1], generator=g, dtype=torch.float64)
    base = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased)
    assert _close(vitsim.cka(x + offset, y, kernel=kernel, unbiased=unbiased), base)


@PROPS
@given(sizes, kernels, estimators)
def test_same_permutation_of_examples(size, kernel, unbiased):
    x, y, g = _pair(*size)
    perm = torch.randperm(x.shape[0], generator=g)
    base = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased)
    assert _close(vitsim.cka(x[perm], y[perm], kernel=kernel, unbiased=unbiased), base)


@PROPS
@given(sizes, estimators)
def test_feature_space_equals_gram_space(size, unbiased):
    x, y, _ = _pair(*size)
    feat = hsic_triple(*_dispatch.linear_stats(x, y, "torch", space="feature"), unbiased)
    gram = hsic_triple(*_dispatch.linear_stats(x, y, "torch", space="gram"), unbiased)
    for a, b in zip(feat, gram):
        assert abs(a.item() - b.item()) <= 1e-9 * max(1.0, abs(b.item()))
