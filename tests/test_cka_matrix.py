"""`vitsim.cka_matrix` against the float64 reference, pair by pair (conventions §3, §7, §8)."""

import importlib

import numpy as np
import pytest
import torch

import vitsim
from vitsim import _dispatch, reference, torch_path
from _data import related_pair, to_numpy

# `vitsim.cka_matrix` is the function; the module is reached through sys.modules.
cm = importlib.import_module("vitsim.cka_matrix")

# conventions §8, absolute error in CKA against the float64 reference on the same rounded inputs. On
# CPU the torch path multiplies float32 at full precision and upcasts half inputs to float32.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}
# The CUDA half-precision route rounds the shifted copy to the input dtype: the 1e-3 of conventions §8.
HALF_TOL = 1e-3


def _layers(n, dims, dtype=torch.float64, seed=0, offset=0.0):
    """Seeded layers of odd widths: layer 0 random, layer k a noisy nonlinear map of layer 0
    (so CKA stays well inside (0, 1)). Rounded to `dtype`; references use the rounded values."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dims[0], generator=g, dtype=torch.float64)
    out = [base]
    for d in dims[1:]:
        w = torch.randn(dims[0], d, generator=g, dtype=torch.float64) / dims[0] ** 0.5
        out.append(torch.tanh(base @ w) + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return [(t + offset).to(dtype) for t in out]


def _want(xs, ys, **kw):
    return np.array([[reference.cka(to_numpy(a), to_numpy(b), **kw) for b in ys] for a in xs])


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
# The first shape takes Gram space, the second feature space (by cost).
@pytest.mark.parametrize("n,dx,dy", [(37, (3, 200, 1), (5, 130)), (90, (3, 17), (1, 9, 4))],
                         ids=str)
def test_matches_reference_pairwise(n, dx, dy, kernel, unbiased, dtype):
    xs = _layers(n, dx, dtype, seed=1)
    ys = _layers(n, dy, dtype, seed=7)
    got = vitsim.cka_matrix(xs, ys, kernel=kernel, unbiased=unbiased)
    assert got.dtype == torch.float64 and got.shape == (len(xs), len(ys))
    want = _want(xs, ys, kernel=kernel, unbiased=unbiased)
    assert np.abs(got.numpy() - want).max() <= TOL[dtype]


@pytest.mark.parametrize("space", ["gram", "feature"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("self_mode", [False, True], ids=["xs-ys", "self"])
def test_both_linear_spaces_match_reference(space, unbiased, self_mode):
    xs = _layers(41, (6, 33, 2), seed=3)
    ys = None if self_mode else _layers(41, (12, 5), seed=4)
    blocks = cm.hsic_blocks(xs, ys, "linear", unbiased, space=space)
    got = cm.cka_from_blocks(*blocks).numpy()
    want = _want(xs, xs if ys is None else ys, unbiased=unbiased)
    assert np.abs(got - want).max() <= 1e-10  # float64, conventions §8


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_self_matrix_symmetric_with_unit_diagonal(kernel, unbiased):
    xs = _layers(29, (4, 70, 3, 11), torch.float32, seed=5)
    got = vitsim.cka_matrix(xs, kernel=kernel, unbiased=unbiased)
    assert torch.equal(got, got.T)
    ones = torch.ones(4, dtype=torch.float64)
    assert torch.allclose(torch.diagonal(got), ones, atol=1e-12, rtol=0)
    want = _want(xs, xs, kernel=kernel, unbiased=unbiased)
    assert np.abs(got.numpy() - want).max() <= 1e-5  # float32, conventions §8


def test_multidimensional_numpy_and_torch_inputs():
    g = np.random.default_rng(0)
    x4 = g.normal(size=(23, 3, 5, 2))            # a conv feature map (n, C, H, W)
    x3 = g.normal(size=(23, 7, 4)) + x4.reshape(23, -1)[:, :1, None]  # tokens (n, T, C)
    y2 = np.tanh(x4.reshape(23, -1)[:, :9]) + 0.3 * g.normal(size=(23, 9))
    got = vitsim.cka_matrix([x4, x3], [y2, x3], unbiased=True)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    want = _want([torch.from_numpy(x4), torch.from_numpy(x3)],
                 [torch.from_numpy(y2), torch.from_numpy(x3)], unbiased=True)
    assert np.abs(got - want).max() <= 1e-10  # float64, conventions §8
    mixed = vitsim.cka_matrix([torch.from_numpy(x4), x3], [y2])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (2, 1)


def test_reference_backend_agrees():
    xs = _layers(19, (5, 8), seed=2)
    ys = _layers(19, (3,), seed=9)
    got = vitsim.cka_matrix(xs, ys, kernel="rbf", unbiased=True)
    ref = vitsim.cka_matrix(xs, ys, kernel="rbf", unbiased=True, backend="reference")
    assert torch.allclose(got, ref, atol=1e-10, rtol=0)  # float64, conventions §8


def test_same_bits_on_repeat():
    xs = _layers(64, (10, 300, 7), torch.float32, seed=8)
    ys = _layers(64, (20, 3), torch.float32, seed=6)
    for kernel in ("linear", "rbf"):
        first = vitsim.cka_matrix(xs, ys, kernel=kernel, unbiased=True)
        assert torch.equal(first, vitsim.cka_matrix(xs, ys, kernel=kernel, unbiased=True))


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_large_common_offset_float32(unbiased):
    # A 1e4 offset (post-ReLU / residual-stream like) must not cost digits: centre first.
    xs = _layers(50, (6, 300), torch.float32, seed=11, offset=1e4)
    ys = _layers(50, (4, 90), torch.float32, seed=12, offset=1e4)
    got = vitsim.cka_matrix(xs, ys, unbiased=unbiased)
    want = _want(xs, ys, unbiased=unbiased)
    assert np.abs(got.numpy() - want).max() <= 1e-5  # float32, conventions §8


@pytest.mark.parametrize("case", ["plain", "offset", "outlier"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_half_precision_gram_route(case, unbiased):
    # The CUDA bfloat16 route (shift by the rounded mean, products in bf16, float64 centring),
    # run here through its exact float32 fallback, at the route's minimum n.
    x, y = related_pair(torch_path.HALF_FAST_MIN_EXAMPLES, 1500, 1100, torch.float64, seed=3)
    if case == "offset":
        x, y = x + 1e3, y + 1e3
    if case == "outlier":  # an example far out
        x[0] *= 30
        y[0] *= 30
    x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    k, l = (torch_path.shifted_gram(z, torch.bfloat16) for z in (x, y))
    tk, tl = (cm.transform_gram_(g.clone(), unbiased).reshape(-1) for g in (k, l))
    got = (tk @ tl / torch.sqrt((tk @ tk) * (tl @ tl))).item()
    want = reference.cka(to_numpy(x), to_numpy(y), unbiased=unbiased)
    assert abs(got - want) <= HALF_TOL  # bfloat16, conventions §8


def test_space_choice_by_cost():
    assert cm.linear_space_many(100_000, [64] * 4, [32] * 3) == "feature"
    assert cm.linear_space_many(512, [197 * 192] * 12, [197 * 192] * 12) == "gram"
    assert cm.linear_space_many(512, [197 * 192] * 12, None) == "gram"
    assert cm.linear_space_many(4096, [16, 8], None) == "feature"


def test_constant_layer_is_nan_with_warning_naming_it():
    xs = _layers(20, (5, 6), seed=1)
    xs.append(torch.ones(20, 3, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match=r"xs\[2\]"):
        got = vitsim.cka_matrix(xs)
    assert torch.isnan(got[2]).all() and torch.isnan(got[:, 2]).all()
    assert not torch.isnan(got[:2, :2]).any()


# --- errors (conventions §7): type and a message naming the argument and the layer -----------------


def test_mismatched_n_names_the_layer():
    xs = _layers(20, (5, 6), seed=1)
    ys = [torch.randn(20, 3, dtype=torch.float64), torch.randn(19, 3, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"ys\[1\]"):
        vitsim.cka_matrix(xs, ys)
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        vitsim.cka_matrix([xs[0], xs[1][:7]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_nan_inf_names_the_layer(bad, kernel):
    xs = _layers(20, (5, 6, 4), torch.float32, seed=1)
    ys = _layers(20, (3, 8), torch.float32, seed=2)
    ys[1][3, 2] = bad
    with pytest.raises(ValueError, match=r"ys\[1\] contains (NaN|Inf)"):
        vitsim.cka_matrix(xs, ys, kernel=kernel)
    xs[2][0, 0] = bad
    with pytest.raises(ValueError, match=r"xs\[2\] contains (NaN|Inf)"):
        vitsim.cka_matrix(xs, kernel=kernel)


def test_too_few_examples_names_n_and_estimator():
    xs = _layers(3, (5, 6), seed=1)
    with pytest.raises(ValueError, match=r"xs\[0\].*unbiased.*n >= 4"):
        vitsim.cka_matrix(xs, unbiased=True)
    with pytest.raises(ValueError, match=r"biased.*n >= 2"):
        vitsim.cka_matrix([x[:1] for x in xs])


def test_bad_types_and_names():
    x = torch.randn(10, 4)
    with pytest.raises(TypeError, match=r"xs must be a list"):
        vitsim.cka_matrix(x)
    with pytest.raises(TypeError, match=r"ys must be a list"):
        vitsim.cka_matrix([x], np.zeros((10, 3)))
    with pytest.raises(TypeError, match=r"ys\[0\].*int64"):
        vitsim.cka_matrix([x], [torch.zeros(10, 3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"xs is empty"):
        vitsim.cka_matrix([])
    with pytest.raises(ValueError, match=r"xs\[1\].*at least 2 dimensions"):
        vitsim.cka_matrix([x, torch.randn(10)])
    with pytest.raises(ValueError, match=r"kernel.*'linear', 'rbf'"):
        vitsim.cka_matrix([x], kernel="poly")
    with pytest.raises(ValueError, match=r"backend"):
        vitsim.cka_matrix([x], backend="cuda")
    with pytest.raises(_dispatch.BackendUnavailableError, match=r"triton"):
        vitsim.cka_matrix([x], backend="triton")
