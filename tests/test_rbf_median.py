"""Exact median of the n² squared distances (`vitsim.kernels.rbf_median`).

Two checks: the selection is exactly `numpy.median` of the float32 distances the kernels compute
(`rbf_median.sq_distances`, the same tiles the RBF statistics use), and those distances agree
with the float64 reference. Interpreter on CPU (CI), compiled on CUDA (`pytest -m gpu`).
"""

import numpy as np
import pytest
import torch

from vitsim import reference
from vitsim.kernels import _launch, rbf_median
from _data import related_pair, to_numpy
from conftest import KERNEL_DEVICES

# Relative error of the median against the float64 reference on the same rounded inputs:
# float32 distances from float32 Gram tiles ~1e-6 (1e-5 allowed); float16 operands round each
# centred value to 11 bits (2e-3 allowed, below the 1e-3-in-CKA budget of conventions §8).
REL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
PLANS = list(rbf_median.PLANS)


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """Scratch buffers start as NaN / -1: an entry a kernel forgot to write fails the test."""
    monkeypatch.setattr(_launch, "POISON_SCRATCH", True)


def _numpy_median(x):
    """numpy's median of the kernel's own float32 distances (mean of the middle two in float64)."""
    return float(np.median(rbf_median.sq_distances(x).double().cpu().numpy()))


def _check(x, plan, rel):
    got = rbf_median.median_sq_distance(x, plan=plan)
    assert got.dtype == torch.float64 and got.ndim == 0 and got.device == x.device
    assert got.item() == _numpy_median(x)
    want = reference.median_sq_distance(to_numpy(x))
    assert abs(got.item() - want) <= rel * abs(want)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("n,d", [(2, 3), (3, 1), (4, 1), (5, 17), (33, 17), (130, 200)], ids=str)
def test_median_is_exact_float32(n, d, plan, kernel_device):
    """Odd and even counts n², both radix plans."""
    x, _ = related_pair(n, d, 1, torch.float32, seed=n + d, device=kernel_device)
    _check(x, plan, REL[torch.float32])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(4, 17), (33, 200)], ids=str)
def test_median_is_exact_half(n, d, dtype, kernel_device):
    x, _ = related_pair(n, d, 1, dtype, seed=n, device=kernel_device)
    _check(x, None, REL[dtype])


def _middle_pair(x):
    """The two middle strictly-upper distances (float32) that an even count averages."""
    d2 = rbf_median.sq_distances(x).cpu().numpy()
    u = np.sort(d2[np.triu_indices(d2.shape[0], 1)])
    lo, hi = rbf_median._middle_ranks(d2.shape[0])
    assert hi == lo + 1
    return u[lo], u[hi]


def _same_last_bucket(a, b, plan):
    bits = rbf_median.PLANS[plan][-1][1]
    return (np.float32(a).view(np.int32) >> bits) == (np.float32(b).view(np.int32) >> bits)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("plan", PLANS)
def test_upper_middle_value_paths(plan, kernel_device):
    """The upper middle value is a tie, the next key of the last histogram, or the least
    distance above the final prefix: each path is constructed and checked to be taken."""
    dev = kernel_device
    # ties: integer points with a power-of-two n (exact means, exact distances)
    g = torch.Generator().manual_seed(0)
    tie = torch.randint(0, 3, (64, 5), generator=g).float().to(dev)
    a, b = _middle_pair(tie)
    assert a == b
    # 4096 and 4096 + 1/64: 32 ulps apart, same last-digit bucket
    near = torch.tensor([[0.0, 0.0], [0.0, 0.125], [64.0, 0.0], [300.0, 300.0]], device=dev)
    a, b = _middle_pair(near)
    assert a != b and _same_last_bucket(a, b, plan)
    # 99² and 100²: different prefixes
    far = torch.tensor([[0.0], [1.0], [100.0], [1000.0]], device=dev)
    a, b = _middle_pair(far)
    assert not _same_last_bucket(a, b, plan)
    for x in (tie, near, far):
        got = rbf_median.median_sq_distance(x, plan=plan).item()
        assert got == _numpy_median(x)
        assert got == pytest.approx(reference.median_sq_distance(to_numpy(x)), rel=REL[torch.float32])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_duplicates_and_constant_input(kernel_device):
    x, _ = related_pair(9, 3, 1, torch.float32, seed=1, device=kernel_device)
    # most rows equal: more than half of the 81 distances are exactly zero
    x[1:8] = x[0]
    assert rbf_median.median_sq_distance(x).item() == 0.0 == reference.median_sq_distance(to_numpy(x))
    const = torch.full((6, 4), 3.25, device=kernel_device)
    assert rbf_median.median_sq_distance(const).item() == 0.0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_deterministic_and_strided(kernel_device):
    base, _ = related_pair(33, 40, 1, torch.bfloat16, seed=3, device=kernel_device)
    x = base[:, ::2]
    assert x.stride(1) == 2
    first = rbf_median.median_sq_distance(x)
    assert torch.equal(first, rbf_median.median_sq_distance(x))
    assert first.item() == _numpy_median(x)
    # a column-major view is read in place and gives the same distances
    xt = x.contiguous().T.contiguous().T
    assert xt.stride(0) == 1
    assert rbf_median.median_sq_distance(xt).item() == pytest.approx(first.item(), rel=1e-6)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_large_offset(kernel_device):
    x, _ = related_pair(33, 17, 1, torch.float32, seed=5, device=kernel_device, offset=1e3)
    _check(x, None, REL[torch.float32])


def test_float64_uses_torch_path():
    x, _ = related_pair(7, 3, 1, torch.float64, seed=7)
    got = rbf_median.median_sq_distance(x).item()
    assert abs(got - reference.median_sq_distance(to_numpy(x))) <= 1e-12 * got
