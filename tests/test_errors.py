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


# --- NumPy layouts, n = 0 and widths at every entry point that takes arrays (conventions §1, §7) ---


def _np_pair(n=12, d1=5, d2=3):
    g = np.random.default_rng(1)
    x = g.normal(size=(n, d1))
    return x, np.tanh(x[:, :d2]) + 0.3 * g.normal(size=(n, d2))


def _minibatch(x, y):
    m = vitsim.MinibatchCKA(1, 1)
    m.update([x], [y])
    return m.compute()


def _streaming(x, y):
    s = vitsim.StreamingCKA()
    s.update(x, y)
    return s.compute()


def _attention(a, _):
    return vitsim.attention_distance(a, grid=(2, 3))


def _attention_qk(q, k):
    return vitsim.attention_distance_qk(q, k, grid=(2, 3))


def _ratio(z, fz):
    return vitsim.ratio_of_norms(z, fz)["spatial"]


PAIR_ENTRY_POINTS = {
    "cka": vitsim.cka,
    "hsic": vitsim.hsic,
    "cka_matrix": lambda x, y: vitsim.cka_matrix([x], [y]),
    "MinibatchCKA": _minibatch,
    "StreamingCKA": _streaming,
    "ratio_of_norms": _ratio,
    "ratio_of_norms_maps": vitsim.ratio_of_norms_maps,
    "attention_distance": _attention,
    "attention_distance_qk": _attention_qk,
}


def _inputs(entry):
    """A native float64 pair of the shapes `entry` takes."""
    g = np.random.default_rng(2)
    if entry == "attention_distance":
        logits = g.normal(size=(2, 3, 7, 7))
        a = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        return a, None
    if entry == "attention_distance_qk":
        return g.normal(size=(2, 3, 7, 4)), g.normal(size=(2, 3, 7, 4))
    if entry in ("ratio_of_norms", "ratio_of_norms_maps"):
        return g.normal(size=(6, 5, 4)), g.normal(size=(6, 5, 4))
    return _np_pair()


def _same(got, want):
    return np.array_equal(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64))


@pytest.mark.parametrize("entry", list(PAIR_ENTRY_POINTS))
@pytest.mark.parametrize("order", [">f8", ">f4", ">f2"])
def test_big_endian_arrays_are_accepted(entry, order):
    fn = PAIR_ENTRY_POINTS[entry]
    a, b = (None if t is None else t.astype(order.replace(">", "<")) for t in _inputs(entry))
    big = [None if t is None else t.astype(order) for t in (a, b)]
    kept = [None if t is None else t.copy() for t in big]
    assert _same(fn(*big), fn(a, b))  # the same values, the same numbers
    for t, k in zip(big, kept):
        assert t is None or (t.dtype.byteorder == ">" and np.array_equal(t, k))  # caller's data kept


@pytest.mark.parametrize("entry", list(PAIR_ENTRY_POINTS))
def test_negative_strides_are_accepted(entry):
    fn = PAIR_ENTRY_POINTS[entry]
    a, b = _inputs(entry)
    flipped = [None if t is None else t[::-1, ..., ::-1] for t in (a, b)]
    if entry.startswith("attention"):  # flip only the batch: the token order is meaningful
        flipped = [None if t is None else t[::-1] for t in (a, b)]
    want = fn(*[None if t is None else t.copy() for t in flipped])
    got = fn(*flipped)
    assert np.allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0,
                       atol=1e-12)  # float64: the same values (summed in another order at most)


def test_native_arrays_are_viewed_and_only_unviewable_ones_copied():
    from vitsim._validate import as_tensor

    x = np.ones((6, 4), dtype=np.float32)[:, ::2]  # positive strides: a view
    assert as_tensor("x", x).data_ptr() == x.ctypes.data
    x.flags.writeable = False  # read-only is fine too: vitsim never writes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_tensor("x", x).data_ptr() == x.ctypes.data
    big = np.arange(12, dtype=">f8").reshape(3, 4)
    t = as_tensor("x", big)
    assert t.dtype == torch.float64 and torch.equal(t, torch.arange(12.0, dtype=torch.float64).reshape(3, 4))
    rev = np.arange(12, dtype=np.float64).reshape(3, 4)[::-1]
    assert torch.equal(as_tensor("x", rev), torch.from_numpy(rev.copy()))


@pytest.mark.parametrize("fn", FNS + [lambda x, y, **kw: vitsim.cka_matrix([x], [y], **kw)],
                         ids=["cka", "hsic", "cka_matrix"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("numpy_in", [False, True], ids=["torch", "numpy"])
def test_zero_examples_names_n_and_estimator(fn, unbiased, numpy_in):
    x, y = _xy(0)
    if numpy_in:
        x, y = x.numpy(), y.numpy()
    est = "unbiased" if unbiased else "biased"
    with pytest.raises(ValueError, match=rf"{est} estimator.*n=0"):
        fn(x, y, unbiased=unbiased)


def test_zero_examples_streaming_and_minibatch():
    x, y = _xy(0)
    with pytest.raises(ValueError, match=r"^xs\[0\].*unbiased estimator.*n=0"):
        vitsim.MinibatchCKA(1, 1).update([x], [y])
    with pytest.raises(ValueError, match=r"^x and y have no examples \(n=0\).*biased estimator"):
        vitsim.StreamingCKA().update(x, y)
    with pytest.raises(ValueError, match=r"^attn is empty"):
        vitsim.attention_distance(np.zeros((0, 2, 5, 5)))
    with pytest.raises(ValueError, match=r"^z and fz have no examples"):
        vitsim.ratio_of_norms(np.zeros((0, 5, 3)), np.zeros((0, 5, 3)))


@pytest.mark.parametrize("self_mode", [False, True], ids=["pair", "self"])
def test_minibatch_width_change_names_layer_and_both_widths(self_mode):
    x, y = _xy(16, 5, 4)
    m = vitsim.MinibatchCKA(2) if self_mode else vitsim.MinibatchCKA(2, 1)
    ys = None if self_mode else [y[:8]]
    m.update([x[:8], y[:8]], ys)
    before = m.state_dict()
    ys = None if self_mode else [y[8:]]
    with pytest.raises(ValueError, match=r"^xs\[1\] has 3 features .* but 4 in earlier"):
        m.update([x[8:], y[8:, :3]], ys)
    assert torch.equal(m.state_dict()["sums"], before["sums"])
    if not self_mode:
        with pytest.raises(ValueError, match=r"^ys\[0\] has 20 features .* but 4 in earlier"):
            m.update([x[8:], y[8:]], [torch.randn(8, 4, 5)])
        assert torch.equal(m.state_dict()["sums"], before["sums"])
    # resumed from a state, the widths still hold; other widths refuse to merge
    resumed = vitsim.MinibatchCKA(2) if self_mode else vitsim.MinibatchCKA(2, 1)
    resumed.load_state_dict(before)
    with pytest.raises(ValueError, match=r"^xs\[0\] has 2 features .* but 5 in earlier"):
        resumed.update([x[8:, :2], y[8:]], ys)
    other = vitsim.MinibatchCKA(2) if self_mode else vitsim.MinibatchCKA(2, 1)
    other.update([x[8:, :2], y[8:]], ys)
    with pytest.raises(ValueError, match=r"other has xs widths \[2, 4\].*\[5, 4\]"):
        m.merge(other)
    m.update([x[8:], y[8:]], ys)  # the right widths still go in
    assert m.num_batches == 2
