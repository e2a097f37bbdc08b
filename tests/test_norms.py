"""Ratio of norms across skip connections (conventions §6) against `vitsim.reference`."""

import math

import numpy as np
import pytest
import torch

import vitsim
from vitsim import reference

from _data import to_numpy

# conventions §8: float64 to 1e-10; float32 inputs (norms accumulated in float32) to 1e-5 relative;
# float16/bfloat16 inputs (accumulated in float32) to 1e-3 relative, against the reference on the
# already rounded values.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def tokens(b, n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, n, c, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    fz = torch.randn(b, n, c, generator=g, dtype=torch.float64).to(dtype)
    return z, fz


@pytest.mark.parametrize("b,n,c,p", [(1, 2, 1, 1), (3, 17, 31, 1), (5, 22, 7, 2), (2, 21, 9, 5)], ids=str)
@pytest.mark.parametrize("dtype", list(REL_TOL), ids=str)
def test_ratio_of_norms_tokens_matches_reference(b, n, c, p, dtype):
    z, fz = tokens(b, n, c, dtype, seed=b + n)
    want = reference.ratio_of_norms_tokens(to_numpy(z), to_numpy(fz), num_prefix_tokens=p)
    got = vitsim.ratio_of_norms(z, fz, num_prefix_tokens=p)
    for key in ("cls", "spatial"):
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(want[key], rel=REL_TOL[dtype])


def test_ratio_of_norms_numpy_input_and_no_class_token():
    z, fz = tokens(2, 9, 5, torch.float64, seed=1)
    want = reference.ratio_of_norms_tokens(z.numpy(), fz.numpy(), num_prefix_tokens=0)
    got = vitsim.ratio_of_norms(z.numpy(), fz.numpy(), num_prefix_tokens=0)
    assert got["spatial"] == pytest.approx(want["spatial"], rel=1e-10)
    assert math.isnan(got["cls"])
    # Registers without a class token: token 0 is a register, not a class token.
    got = vitsim.ratio_of_norms(z, fz, num_prefix_tokens=4, class_token=False)
    assert math.isnan(got["cls"])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 3), (4, 9)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_ratio_of_norms_maps_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    fz = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    want = reference.ratio_of_norms_maps(to_numpy(z), to_numpy(fz))
    got = vitsim.ratio_of_norms_maps(z, fz)
    assert got == pytest.approx(want, rel=REL_TOL[dtype])


def test_streamed_mean_equals_mean_over_all_batches():
    z, fz = tokens(11, 10, 6, torch.float64, seed=3)
    acc = vitsim.RatioOfNorms("tokens", num_prefix_tokens=2)
    for start, stop in ((0, 4), (4, 5), (5, 11)):
        acc.update(z[start:stop], fz[start:stop])
    want = reference.ratio_of_norms_tokens(z.numpy(), fz.numpy(), num_prefix_tokens=2)
    got = acc.compute()
    assert got["cls"] == pytest.approx(want["cls"], rel=1e-12)
    assert got["spatial"] == pytest.approx(want["spatial"], rel=1e-12)

    maps = vitsim.RatioOfNorms("maps")
    x = torch.rand(7, 3, 4, 4, dtype=torch.float64)
    y = torch.rand(7, 3, 4, 4, dtype=torch.float64)
    maps.update(x[:3], y[:3])
    maps.update(x[3:], y[3:])
    assert maps.compute() == pytest.approx(reference.ratio_of_norms_maps(x.numpy(), y.numpy()), rel=1e-12)


def test_state_dict_round_trip_and_merge_are_exact():
    z, fz = tokens(9, 6, 4, torch.float32, seed=4)
    whole = vitsim.RatioOfNorms("tokens", num_prefix_tokens=1)
    whole.update(z[:5], fz[:5])
    whole.update(z[5:], fz[5:])

    first = vitsim.RatioOfNorms("tokens", num_prefix_tokens=1)
    first.update(z[:5], fz[:5])
    resumed = vitsim.RatioOfNorms("tokens", num_prefix_tokens=1)
    resumed.load_state_dict(first.state_dict())
    resumed.update(z[5:], fz[5:])
    assert torch.equal(resumed.sums, whole.sums) and torch.equal(resumed.counts, whole.counts)

    second = vitsim.RatioOfNorms("tokens", num_prefix_tokens=1)
    second.update(z[5:], fz[5:])
    first.merge(second)
    assert torch.equal(first.sums, whole.sums)

    with pytest.raises(ValueError, match="num_prefix_tokens"):
        vitsim.RatioOfNorms("tokens", num_prefix_tokens=2).load_state_dict(whole.state_dict())


def test_zero_branch_gives_infinite_ratio_not_an_error():
    z = torch.ones(2, 3, 4)
    assert vitsim.ratio_of_norms(z, torch.zeros_like(z))["spatial"] == math.inf
    assert vitsim.ratio_of_norms_maps(z, torch.zeros_like(z)) == math.inf


def test_errors_name_the_argument():
    z = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match=r"z\.shape=\(2, 3, 4\), fz\.shape=\(2, 3, 5\)"):
        vitsim.ratio_of_norms(z, torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        vitsim.ratio_of_norms(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="no spatial tokens"):
        vitsim.ratio_of_norms(z, z, num_prefix_tokens=3)
    with pytest.raises(TypeError, match="fz"):
        vitsim.ratio_of_norms(z, torch.ones(2, 3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="z"):
        vitsim.ratio_of_norms_maps([[1.0]], z)
    bad = z.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="fz contains NaN"):
        vitsim.ratio_of_norms(z, bad)
    with pytest.raises(ValueError, match="kind"):
        vitsim.RatioOfNorms("pixels")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        vitsim.RatioOfNorms("tokens", num_prefix_tokens=-1)
    assert np.isnan(vitsim.RatioOfNorms("maps").compute())
