"""Every row of conventions §7 that applies to `cka`/`hsic`: the exception type and a message naming
the argument."""

import warnings

import numpy as np
import pytest
import torch

import vitsim
from vitsim import _dispatch

FNS = [vitsim.cka, vitsim.hsic]


def _xy(n=10, d1=3, d2=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d1, generator=g), torch.randn(n, d2, generator=g)


@pytest.mark.parametrize("fn", FNS)
def test_different_n_names_both_shapes(fn):
    x, _ = _xy(10)
    _, y = _xy(11)
    with pytest.raises(ValueError, match=r"\(10, 3\).*\(11, 4\)"):
        fn(x, y)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("n,unbiased", [(1, False), (3, True), (2, True)])
def test_too_few_examples_names_n_and_estimator(fn, n, unbiased):
    x, y = _xy(n)
    est = "unbiased" if unbiased else "biased"
    with pytest.raises(ValueError, match=rf"{est}.*n={n}"):
        fn(x, y, unbiased=unbiased)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_non_finite_input_names_it(fn, bad, which, kernel):
    x, y = _xy()
    (x if which == "x" else y)[3, 1] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one clear error, no floating-point warnings before it
        with pytest.raises(ValueError, match=rf"\b{which}\b contains"):
            fn(x, y, kernel=kernel)


@pytest.mark.parametrize("which", ["x", "y"])
def test_non_finite_numpy_and_reference_backend(which):
    x, y = (t.numpy() for t in _xy())
    (x if which == "x" else y)[0, 0] = np.nan
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match=rf"\b{which}\b contains NaN"):
            vitsim.cka(x, y, backend=backend)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(10, 3, dtype=torch.int64),
        torch.ones(10, 3, dtype=torch.bool),
        torch.ones(10, 3, dtype=torch.complex64),
        np.ones((10, 3), dtype=np.int32),
        np.ones((10, 3), dtype=object),
        np.ones((10, 3), dtype=np.complex128),
        [[1.0, 2.0]] * 10,
        "activations",
    ],
    ids=["int64", "bool", "complex64", "np-int32", "np-object", "np-complex", "list", "str"],
)
@pytest.mark.parametrize("which", ["x", "y"])
def test_unsupported_type_names_argument(fn, bad, which):
    x, y = _xy()
    args = (bad, y) if which == "x" else (x, bad)
    with pytest.raises(TypeError, match=rf"^{which}\b"):
        fn(*args)


@pytest.mark.parametrize("fn", FNS)
def test_one_dimensional_input_is_refused(fn):
    x, y = _xy()
    with pytest.raises(ValueError, match=r"^x .*shape \(10,\)"):
        fn(x[:, 0], y)


@pytest.mark.parametrize("fn", FNS)
def test_zero_features_refused(fn):
    x, y = _xy()
    with pytest.raises(ValueError, match=r"^y has no features"):
        fn(x, y[:, :0])


@pytest.mark.parametrize("fn", FNS)
def test_different_devices_refused(fn):
    x, y = _xy()
    with pytest.raises(ValueError, match=r"x is on cpu and y on meta"):
        fn(x, y.to("meta"))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"kernel": "cosine"}, r"kernel 'cosine'.*'linear', 'rbf'"),
        ({"backend": "cuda"}, r"backend 'cuda'.*'auto', 'torch', 'triton', 'reference'"),
        ({"unbiased": "yes"}, r"unbiased"),
        ({"kernel": "rbf", "threshold": 0.0}, r"threshold"),
        ({"kernel": "rbf", "threshold": float("nan")}, r"threshold"),
        ({"kernel": "rbf", "sigma": -1.0}, r"sigma"),
        ({"kernel": "rbf", "sigma": (1.0, 2.0, 3.0)}, r"sigma"),
        ({"kernel": "linear", "sigma": 1.0}, r"sigma"),
    ],
    ids=["kernel", "backend", "unbiased", "threshold0", "thresholdnan", "sigma-neg", "sigma-3", "sigma-linear"],
)
def test_bad_options_name_the_option(fn, kwargs, pattern):
    x, y = _xy()
    with pytest.raises((ValueError, TypeError), match=pattern):
        fn(x, y, **kwargs)


def test_triton_backend_where_it_cannot_run():
    # Meta tensors: Triton can run on neither, whatever is installed.
    with pytest.raises(RuntimeError, match="backend='triton'"):
        _dispatch.resolve_backend("triton", torch.device("meta"), _dispatch.FEATURE_KERNEL)
    with pytest.raises(ValueError, match="backend='triton'"):
        _dispatch.resolve_backend("triton", torch.device("meta"), None)


def test_auto_on_cpu_uses_torch_path():
    assert _dispatch.resolve_backend("auto", torch.device("cpu"), _dispatch.FEATURE_KERNEL) == "torch"
