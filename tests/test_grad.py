"""Gradients through `vitsim.cka` and `vitsim.hsic` (conventions §3, "Gradients"): gradcheck in
float64, agreement with autograd through the textbook formulas written in torch here, a float32
training smoke, σ from the median rule held constant, and no graph where none was asked for."""

import warnings

import numpy as np
import pytest
import torch

import vitsim
from vitsim import grad_route, reference
from _data import related_pair, to_numpy

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FNS = {"cka": vitsim.cka, "hsic": vitsim.hsic}
# (n, d1, d2): feature space and Gram space of the differentiable route (asserted below)
SHAPES = {"feature": (9, 3, 2), "gram": (7, 6, 11)}
OPTIONS = [
    pytest.param({"kernel": "linear"}, id="linear"),
    pytest.param({"kernel": "rbf", "sigma": 2.5}, id="rbf-sigma"),
    pytest.param({"kernel": "rbf", "sigma": (1.5, 4.0)}, id="rbf-sigma-pair"),
]


def _leaf_pair(n, d1, d2, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    x, y = related_pair(n, d1, d2, torch.float64, seed=seed)
    return ((x * scale).to(dtype).to(device).requires_grad_(),
            (y * scale).to(dtype).to(device).requires_grad_())


# --- the formulas of conventions §2-3, in torch, float64, no tricks -----------------------


def _gram(z, kernel, sigma):
    z = z.reshape(z.shape[0], -1).to(torch.float64)
    if kernel == "linear":
        return z @ z.T
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return torch.exp(-d2 / (2.0 * sigma**2))


def _hsic(k, l, unbiased):
    n = k.shape[0]
    if not unbiased:
        h = torch.eye(n, dtype=k.dtype) - 1.0 / n
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2
    off = 1.0 - torch.eye(n, dtype=k.dtype)
    k, l = k * off, l * off
    one = torch.ones(n, dtype=k.dtype)
    value = (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (one @ k @ l @ one))
    return value / (n * (n - 3))


def _formula(what, x, y, kernel="linear", unbiased=False, sigma=None):
    sx, sy = (sigma, sigma) if not isinstance(sigma, tuple) else sigma
    k, l = _gram(x, kernel, sx), _gram(y, kernel, sy)
    if what == "hsic":
        return _hsic(k, l, unbiased)
    return _hsic(k, l, unbiased) / torch.sqrt(_hsic(k, k, unbiased) * _hsic(l, l, unbiased))


def _grads(fn, x, y, **kw):
    return torch.autograd.grad(fn(x, y, **kw), (x, y))


# --- tests ----------------------------------------------------------------------------------


def test_shapes_cover_both_spaces():
    for space, (n, d1, d2) in SHAPES.items():
        assert grad_route._space(n, d1, d2) == space


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("what", list(FNS))
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("space", list(SHAPES))
def test_gradcheck_float64(space, options, unbiased, what, device):
    x, y = _leaf_pair(*SHAPES[space], device=device, seed=1)
    assert torch.autograd.gradcheck(
        lambda a, b: FNS[what](a, b, unbiased=unbiased, **options), (x, y),
        eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("what", list(FNS))
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("space", list(SHAPES))
def test_gradients_equal_autograd_through_the_formula(space, options, unbiased, what):
    x, y = _leaf_pair(*SHAPES[space], seed=2)
    x3 = x.detach().reshape(x.shape[0], 3, -1).requires_grad_()  # trailing axes flattened
    got = _grads(FNS[what], x3, y, unbiased=unbiased, **options)
    want = _grads(lambda a, b, **kw: _formula(what, a, b, **kw), x3, y, unbiased=unbiased,
                  **options)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float64
        # float64, conventions §8 (relative to the gradient's size)
        assert (g - w).abs().max() <= 1e-10 * (1.0 + w.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=str)
def test_half_and_float32_gradients_near_float64(dtype, tol):
    x, y = _leaf_pair(40, 13, 6, dtype, seed=3)
    got = _grads(vitsim.cka, x, y, unbiased=True)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))  # the rounded values
    want = _grads(lambda a, b: _formula("cka", a, b, unbiased=True), x64, y64)
    for g, w, leaf in zip(got, want, (x, y)):
        assert g.dtype == leaf.dtype
        # float32 products: relative error of the gradient well under 1e-4; bfloat16 gradients
        # are rounded to 8 bits (4e-3 relative) on the way back
        assert (g.double() - w).abs().max() <= tol * w.abs().max()


def test_grad_fn_present_only_where_asked():
    x, y = _leaf_pair(12, 4, 5, seed=4)
    out = vitsim.cka(x, y.detach())
    assert out.grad_fn is not None and out.dtype == torch.float64 and out.shape == ()
    out.backward()
    assert x.grad is not None and y.grad is None
    assert torch.isfinite(x.grad).all()
    plain = vitsim.cka(x.detach(), y.detach())
    assert plain.grad_fn is None and not plain.requires_grad
    assert abs(plain.item() - out.item()) <= 1e-12  # float64, conventions §8: same statistics
    with torch.no_grad():
        assert vitsim.hsic(x, y).grad_fn is None
    numpy_out = vitsim.cka(to_numpy(x), to_numpy(y))
    assert isinstance(numpy_out, np.float64)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_values_match_reference(kernel):
    x, y = _leaf_pair(30, 8, 17, seed=5)
    for unbiased in (False, True):
        for what in FNS:
            got = FNS[what](x, y, kernel=kernel, unbiased=unbiased)
            want = getattr(reference, what)(to_numpy(x), to_numpy(y), kernel=kernel,
                                            unbiased=unbiased)
            assert abs(got.item() - want) <= 1e-10 * max(1.0, abs(want))  # float64, §8


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_median_sigma_is_a_constant(threshold, unbiased):
    x, y = _leaf_pair(15, 4, 7, seed=6)
    got = _grads(vitsim.cka, x, y, kernel="rbf", threshold=threshold, unbiased=unbiased)
    sigmas = tuple(threshold * reference.median_sq_distance(to_numpy(t)) ** 0.5 for t in (x, y))
    want = _grads(vitsim.cka, x, y, kernel="rbf", sigma=sigmas, unbiased=unbiased)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-10 * (1.0 + w.abs().max())  # float64, conventions §8


@pytest.mark.parametrize("space", list(SHAPES))
@pytest.mark.parametrize("scale", [1e-14, 1e-30, 1e15], ids=str)
def test_float32_any_scale(scale, space):
    # CKA is scale-invariant; the route rescales by an exact power of two before any product
    x, y = _leaf_pair(*SHAPES[space], torch.float32, seed=7, scale=scale)
    y_plain = (y.detach() / scale).requires_grad_()
    want = reference.cka(to_numpy(x), to_numpy(y_plain))
    got = vitsim.cka(x, y_plain)
    assert abs(got.item() - want) <= 1e-5  # float32, conventions §8
    hsic = vitsim.hsic(x, y_plain)
    want_h = reference.hsic(to_numpy(x), to_numpy(y_plain))
    assert abs(hsic.item() - want_h) <= 1e-5 * abs(want_h)  # float32, relative
    gx, _ = torch.autograd.grad(got, (x, y_plain))
    assert torch.isfinite(gx).all() and gx.abs().max() > 0


def test_wide_bandwidth_follows_reference():
    x, y = _leaf_pair(25, 5, 9, seed=8)
    for sigma in (1e3, 1e5):
        got = vitsim.cka(x, y, kernel="rbf", sigma=sigma)
        want = reference.cka(to_numpy(x), to_numpy(y), kernel="rbf", sigma=sigma)
        assert abs(got.item() - want) <= 1e-6  # float64 reference's own exp() rounding at σ ≥ 1e3
        assert torch.isfinite(torch.autograd.grad(got, x)[0]).all()


def test_zero_median_bandwidth_warns_and_has_zero_gradient():
    x, y = _leaf_pair(10, 3, 4, seed=9)
    x = torch.cat([x[:2], x[2:3].expand(8, 3)]).detach().requires_grad_()  # most rows equal
    with pytest.warns(RuntimeWarning, match="indicator"):
        out = vitsim.cka(x, y, kernel="rbf")
    want = reference.cka(to_numpy(x), to_numpy(y), kernel="rbf")
    assert abs(out.item() - want) <= 1e-10  # float64, conventions §8
    gx, gy = torch.autograd.grad(out, (x, y))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.isfinite(gy).all()


def test_float32_training_smoke():
    # CKA as a loss: a linear student learns to align with a fixed teacher representation
    x, target = related_pair(64, 10, 6, torch.float32, seed=10)
    student = torch.nn.Linear(10, 5)
    torch.nn.init.normal_(student.weight, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = 1.0 - vitsim.cka(torch.tanh(student(x)), target)
        loss.backward()
        assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_backend_reference_is_a_constant_and_errors_still_name_inputs(device):
    x, y = _leaf_pair(8, 3, 4, device=device, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = vitsim.cka(x, y, backend="reference")
    assert ref.grad_fn is None and ref.device == x.device
    bad = x.detach().clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^x contains NaN"):
        vitsim.cka(bad.requires_grad_(), y)
