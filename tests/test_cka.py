"""`vitsim.cka` / `vitsim.hsic` on the torch path against the float64 reference (conventions §3, §8)."""

import numpy as np
import pytest
import torch

import vitsim
from vitsim import _dispatch, reference
from _data import related_pair, rng, to_numpy

# conventions §8, absolute error in CKA against the float64 reference computed on the same rounded
# inputs. The CPU torch path runs float32 products at full precision and upcasts half inputs
# to float32, so every non-float64 dtype is held to the float32 bound.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

SHAPES = [
    (4, 1, 3),
    (5, 3, 1),
    (17, 257, 3),
    (130, 3, 257),
    (130, 257, 257),
    (1000, 3, 1),
    (1000, 257, 3),
]


def _hsic_scale(x, y, **kw):
    """Natural scale of HSIC(x, y) for a relative comparison: sqrt(HSIC(x,x) HSIC(y,y))."""
    hxx = abs(reference.hsic(x, x, **kw))
    hyy = abs(reference.hsic(y, y, **kw))
    return max(np.sqrt(hxx * hyy), 1e-300)


@pytest.mark.parametrize("n,d1,d2", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_torch_path_matches_reference(n, d1, d2, dtype, unbiased, kernel):
    if n < 4 and unbiased:
        pytest.skip("unbiased estimator needs n >= 4")
    x, y = related_pair(n, d1, d2, dtype, seed=n + d1 + d2)
    xn, yn = to_numpy(x), to_numpy(y)
    want = reference.cka(xn, yn, kernel=kernel, unbiased=unbiased)
    with _maybe_warns(want):
        got = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased, backend="torch")
    assert got.dtype == torch.float64 and got.ndim == 0
    if np.isnan(want):
        assert torch.isnan(got)
    else:
        assert abs(got.item() - want) <= TOL[dtype]
    h_want = reference.hsic(xn, yn, kernel=kernel, unbiased=unbiased)
    h_got = vitsim.hsic(x, y, kernel=kernel, unbiased=unbiased, backend="torch").item()
    scale = _hsic_scale(xn, yn, kernel=kernel, unbiased=unbiased)
    assert abs(h_got - h_want) <= TOL[dtype] * scale


class _maybe_warns:
    """Expect the undefined-CKA RuntimeWarning exactly when the reference is NaN."""

    def __init__(self, want):
        self.expect = bool(np.isnan(want))

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        if exc[0] is None:
            got = any(issubclass(w.category, RuntimeWarning) for w in self.caught)
            assert got == self.expect


@pytest.mark.parametrize("shape_x,shape_y", [((9, 3, 5), (9, 2, 3, 4)), ((33, 2, 2, 2), (33, 7))], ids=str)
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_trailing_axes_are_flattened(shape_x, shape_y, kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape_x, generator=g, dtype=torch.float64)
    y = torch.randn(shape_y, generator=g, dtype=torch.float64) + x.reshape(len(x), -1)[:, :1].reshape(
        (len(x),) + (1,) * (len(shape_y) - 1))
    want = reference.cka(x.reshape(len(x), -1).numpy(), y.reshape(len(y), -1).numpy(), kernel=kernel)
    assert abs(vitsim.cka(x, y, kernel=kernel).item() - want) <= 1e-10


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_numpy_in_numpy_out(unbiased):
    x, y = related_pair(40, 6, 5, torch.float64, seed=3)
    got = vitsim.cka(x.numpy(), y.numpy(), unbiased=unbiased)
    assert type(got) is np.float64
    assert abs(got - reference.cka(x.numpy(), y.numpy(), unbiased=unbiased)) <= 1e-10
    hs = vitsim.hsic(x.numpy(), y.numpy(), unbiased=unbiased)
    assert type(hs) is np.float64


def test_numpy_float32_and_float16_inputs():
    x, y = related_pair(50, 8, 4, torch.float64, seed=4)
    for dtype in (np.float32, np.float16):
        xn, yn = x.numpy().astype(dtype), y.numpy().astype(dtype)
        want = reference.cka(xn.astype(np.float64), yn.astype(np.float64))
        assert abs(vitsim.cka(xn, yn) - want) <= 1e-5


def test_reference_backend_returns_same_types():
    x, y = related_pair(20, 4, 3, torch.float32, seed=5)
    got = vitsim.cka(x, y, backend="reference")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert got.item() == pytest.approx(reference.cka(to_numpy(x), to_numpy(y)), abs=1e-12)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_feature_space_equals_gram_space(unbiased):
    x, y = related_pair(37, 11, 23, torch.float64, seed=6)
    from vitsim._stats import hsic_triple

    feat = hsic_triple(*_dispatch.linear_stats(x, y, "torch", space="feature"), unbiased)
    gram = hsic_triple(*_dispatch.linear_stats(x, y, "torch", space="gram"), unbiased)
    for a, b in zip(feat, gram):
        assert abs(a.item() - b.item()) <= 1e-10 * max(1.0, abs(b.item()))


def test_space_choice_follows_cost():
    assert _dispatch.linear_space(65536, 1024, 1024) == "feature"
    assert _dispatch.linear_space(512, 150528, 150528) == "gram"


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_large_common_offset_float32(kernel, unbiased):
    # conventions §3: post-ReLU-like offset of 1e4; uncentred float32 Gram matrices lose every digit.
    x, y = related_pair(300, 40, 20, torch.float32, seed=7, offset=1e4)
    want = reference.cka(to_numpy(x), to_numpy(y), kernel=kernel, unbiased=unbiased)
    got = vitsim.cka(x, y, kernel=kernel, unbiased=unbiased).item()
    assert abs(got - want) <= 1e-4


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_determinism_same_bits(kernel):
    x, y = related_pair(257, 33, 65, torch.float32, seed=8)
    a = vitsim.cka(x, y, kernel=kernel, unbiased=True)
    b = vitsim.cka(x, y, kernel=kernel, unbiased=True)
    assert a.item().hex() == b.item().hex()


def test_unbiased_hsic_can_be_negative():
    # Independent inputs: the unbiased estimate scatters around 0 and takes both signs.
    values = []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(12, 3, generator=g, dtype=torch.float64)
        y = torch.randn(12, 2, generator=g, dtype=torch.float64)
        got = vitsim.hsic(x, y, unbiased=True).item()
        assert abs(got - reference.hsic(x.numpy(), y.numpy(), unbiased=True)) <= 1e-10
        values.append(got)
    assert min(values) < 0 < max(values)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_constant_input_gives_nan_and_warning_naming_it(kernel):
    x = torch.ones(10, 3)
    y = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=r"\bx\b"):
        got = vitsim.cka(x, y, kernel=kernel)
    assert torch.isnan(got)
    with pytest.warns(RuntimeWarning, match=r"\by\b"):
        assert torch.isnan(vitsim.cka(y, x, kernel=kernel))


def test_explicit_sigma_matches_reference():
    x, y = related_pair(45, 7, 9, torch.float64, seed=9)
    for sigma in (0.5, 3.0, (1.0, 2.0)):
        want = reference.cka(x.numpy(), y.numpy(), kernel="rbf", sigma=sigma)
        assert abs(vitsim.cka(x, y, kernel="rbf", sigma=sigma).item() - want) <= 1e-10


def test_threshold_matches_reference():
    x, y = related_pair(45, 7, 9, torch.float64, seed=10)
    want = reference.cka(x.numpy(), y.numpy(), kernel="rbf", threshold=0.5)
    assert abs(vitsim.cka(x, y, kernel="rbf", threshold=0.5).item() - want) <= 1e-10


def test_non_contiguous_inputs():
    x, y = related_pair(64, 30, 24, torch.float32, seed=11)
    xt, ys = x.T.contiguous().T, y[:, ::2]
    want = reference.cka(to_numpy(xt), to_numpy(ys))
    assert abs(vitsim.cka(xt, ys).item() - want) <= 1e-5


def test_torch_median_is_numpy_median():
    from vitsim import torch_path

    g = torch.Generator().manual_seed(12)
    for n in (4, 5, 33):
        x = torch.randint(0, 3, (n, 2), generator=g).to(torch.float64)  # many ties
        # The torch path's distances come from the Gram identity a_i + a_j − 2 G_ij, exact
        # only to float64 rounding; the selection itself is exact.
        got = torch_path.median_sq_distance(x).item()
        assert got == pytest.approx(reference.median_sq_distance(x.numpy()), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("count", [1, 2, 7, 10, 101])
def test_median_selection_both_branches_follow_numpy(count):
    """The CPU branch (one `np.partition`) and the torch branch (`kthvalue`, what CUDA runs)."""
    from vitsim import torch_path

    values = torch.from_numpy(rng(count).integers(0, 5, count).astype(np.float64))  # ties
    want = np.median(values.numpy())
    assert torch_path.median(values).item() == want
    assert torch_path.median_torch(values).item() == want


def test_rbf_map_zero_bandwidth_and_nan():
    from vitsim import torch_path

    d2 = torch.tensor([[0.0, 2.0], [0.0, float("nan")]], dtype=torch.float64)
    zero = torch_path.rbf_from_sq_distances(d2, 0.0)
    assert zero[0].tolist() == [1.0, 0.0] and zero[1, 0].item() == 1.0
    assert torch.isnan(zero[1, 1])  # a NaN distance stays NaN, even at σ = 0
    k = torch_path.rbf_from_sq_distances(d2, 2.0)
    assert k[0].tolist() == [1.0, float(np.exp(-0.5))] and torch.isnan(k[1, 1])
    same = d2.clone()
    assert torch_path.rbf_from_sq_distances(same, 2.0, inplace=True) is same
    assert torch.equal(d2[0], torch.tensor([0.0, 2.0], dtype=torch.float64))  # not inplace: untouched
