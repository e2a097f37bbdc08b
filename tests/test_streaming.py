"""`MinibatchCKA` and `StreamingCKA` against the float64 reference (conventions §4, §7, §8): values,
resume, merge, two-process sync over gloo, large offsets, determinism and every error case."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vitsim
from vitsim import reference
from _data import related_pair, to_numpy

# conventions §8: absolute CKA error against the float64 reference on the same rounded inputs. The CPU
# torch path multiplies float32 at full precision (half inputs upcast to float32).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}


def _network(n, dims, dtype=torch.float64, seed=0, offset=0.0, shape=None):
    """Seeded 'layers' of odd widths, each a noisy nonlinear map of a common input."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    out = []
    for d in dims:
        w = torch.randn(6, d, generator=g, dtype=torch.float64)
        out.append(torch.tanh(base @ w) + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64))
    out = [(t + offset).to(dtype) for t in out]
    if shape is not None:  # view the first layer as a token map (n, T, C)
        out[0] = out[0].reshape(n, *shape)
    return out


def _batches(layers, size):
    n = layers[0].shape[0]
    return [[t[i:i + size] for t in layers] for i in range(0, n, size)]


def _np(t):
    return np.asarray(t, dtype=np.float64) if isinstance(t, np.ndarray) else to_numpy(t)


def _want_minibatch(xb, yb, **kw):
    """Reference minibatch CKA for every pair of layers, from per-batch lists."""
    nx, ny = len(xb[0]), len(yb[0])
    return np.array([[reference.minibatch_cka([_np(b[i]) for b in xb],
                                              [_np(b[j]) for b in yb], **kw)
                      for j in range(ny)] for i in range(nx)])


# --- MinibatchCKA: values ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_matches_reference(kernel, unbiased, dtype):
    xs = _network(83, (5, 120, 2), dtype, seed=1, shape=(5, 1))
    ys = _network(83, (7, 33), dtype, seed=2)
    xb, yb = _batches(xs, 20), _batches(ys, 20)  # batches of 20, 20, 20, 20, 3 ... drop the last
    xb, yb = xb[:-1], yb[:-1]
    m = vitsim.MinibatchCKA(3, 2, kernel=kernel, unbiased=unbiased)
    for bx, by in zip(xb, yb):
        m.update(bx, by)
    got = m.compute()
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    want = _want_minibatch(xb, yb, kernel=kernel, unbiased=unbiased)
    assert np.abs(got.numpy() - want).max() <= TOL[dtype]
    assert m.num_batches == 4 and m.num_examples == 80


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_self_mode_numpy_batches(kernel):
    xs = [to_numpy(t) for t in _network(60, (4, 90, 3), seed=3)]
    batches = [[t[i:i + 13] for t in xs] for i in range(0, 52, 13)]
    m = vitsim.MinibatchCKA(3, kernel=kernel)
    for b in batches:
        m.update(b)
    got = m.compute()
    assert got.shape == (3, 3) and torch.equal(got, got.T)
    want = _want_minibatch(batches, batches, kernel=kernel)
    assert np.abs(got.numpy() - want).max() <= 1e-10  # float64, conventions §8


def test_minibatch_large_common_offset_float32():
    # 1e4 offset in float32: each batch's Gram is centred before the products (conventions §3).
    xs = _network(64, (9, 150), torch.float32, seed=4, offset=1e4)
    ys = _network(64, (4,), torch.float32, seed=5, offset=1e4)
    xb, yb = _batches(xs, 16), _batches(ys, 16)
    m = vitsim.MinibatchCKA(2, 1)
    for bx, by in zip(xb, yb):
        m.update(bx, by)
    want = _want_minibatch(xb, yb)
    assert np.abs(m.compute().numpy() - want).max() <= 1e-5  # float32, conventions §8


def _run(batches_x, batches_y, cls_args=(2, 3)):
    m = vitsim.MinibatchCKA(*cls_args)
    for bx, by in zip(batches_x, batches_y):
        m.update(bx, by)
    return m


def test_minibatch_same_bits_resume_and_merge(tmp_path):
    xs = _network(70, (5, 40), torch.float32, seed=6)
    ys = _network(70, (3, 11, 60), torch.float32, seed=7)
    xb, yb = _batches(xs, 10), _batches(ys, 10)
    full = _run(xb, yb)
    assert torch.equal(full.compute(), _run(xb, yb).compute())  # same bits on repeat
    # stop after 3 batches, save, load into a fresh object, go on: the same bits
    first = _run(xb[:3], yb[:3])
    torch.save(first.state_dict(), tmp_path / "cka.pt")
    resumed = vitsim.MinibatchCKA(2, 3)
    resumed.load_state_dict(torch.load(tmp_path / "cka.pt"))
    for bx, by in zip(xb[3:], yb[3:]):
        resumed.update(bx, by)
    assert torch.equal(resumed.state_dict()["sums"], full.state_dict()["sums"])
    assert torch.equal(resumed.compute(), full.compute())
    # merge of two halves: the same sums, added in another order
    merged = _run(xb[:4], yb[:4]).merge(_run(xb[4:], yb[4:]))
    assert torch.allclose(merged.compute(), full.compute(), atol=1e-12, rtol=0)
    assert merged.num_batches == full.num_batches == 7
    full.reset()
    with pytest.raises(ValueError, match="before any update"):
        full.compute()


# --- MinibatchCKA: errors leave the state as it was ---------------------------------------


def test_minibatch_errors_name_layer_and_keep_state():
    xs = _network(24, (5, 40), torch.float32, seed=8)
    ys = _network(24, (3, 11, 6), torch.float32, seed=9)
    m = vitsim.MinibatchCKA(2, 3)
    m.update([t[:12] for t in xs], [t[:12] for t in ys])
    before = m.state_dict()["sums"].clone()
    bx, by = [t[12:] for t in xs], [t[12:] for t in ys]
    cases = [
        ((bx + bx[:1], by), r"xs has 3 layers, expected num_x=2"),
        ((bx, by[:2]), r"ys has 2 layers, expected num_y=3"),
        ((bx, [by[0], by[1][:11], by[2]]), r"ys\[1\].*same number of examples"),
        (([bx[0], bx[1][:5]], by), r"xs\[1\].*same number of examples"),
        (([t[:3] for t in bx], [t[:3] for t in by]), r"xs\[0\].*unbiased.*n >= 4"),
        ((bx, None), r"ys is missing"),
        ((bx, [by[0], by[1], by[2].to(torch.int32)]), r"ys\[2\].*int32"),
    ]
    for args, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            m.update(*args)
    for bad in (float("nan"), float("inf")):
        by_bad = [t.clone() for t in by]
        by_bad[2][4, 1] = bad
        with pytest.raises(ValueError, match=r"ys\[2\] contains (NaN|Inf)"):
            m.update(bx, by_bad)
        bx_bad = [t.clone() for t in bx]
        bx_bad[1][0, 0] = bad
        with pytest.raises(ValueError, match=r"xs\[1\] contains (NaN|Inf)"):
            m.update(bx_bad, by)
    assert torch.equal(m.state_dict()["sums"], before)
    selfm = vitsim.MinibatchCKA(2)
    with pytest.raises(ValueError, match=r"ys must be None"):
        selfm.update(bx, by)
    with pytest.raises(ValueError, match=r"num_y=3"):
        selfm.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match=r"kernel"):
        vitsim.MinibatchCKA(2, 3, kernel="rbf").merge(m)
    with pytest.raises(ValueError, match=r"num_x must be a positive int"):
        vitsim.MinibatchCKA(0)
    with pytest.raises(ValueError, match=r"kernel.*'linear', 'rbf'"):
        vitsim.MinibatchCKA(2, kernel="cosine")


def test_minibatch_constant_layer_warns_with_its_name():
    xs = _network(32, (5, 7), seed=10)
    ys = [torch.full((32, 4), 3.0, dtype=torch.float64)]
    m = vitsim.MinibatchCKA(2, 1)
    for bx, by in zip(_batches(xs, 8), _batches(ys, 8)):
        m.update(bx, by)
    with pytest.warns(RuntimeWarning, match=r"ys\[0\]"):
        got = m.compute()
    assert torch.isnan(got).all()


# --- MinibatchCKA: batch weighting (conventions §4) ----------------------------------------


def _u_centre(gram):
    """The official efficient_CKA.py's U-centring of one Gram matrix (float64 NumPy)."""
    n = gram.shape[0]
    gram = gram.copy()
    np.fill_diagonal(gram, 0.0)
    means = gram.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0.0)
    return gram


def _official_minibatch_cka(x_batches, y_batches):
    """efficient_CKA.py's MinibatchCKA for one pair of layers: un-normalised inner products of
    U-centred linear Grams summed over batches (each batch weighted by n_b(n_b − 3))."""
    acc = np.zeros(3)
    for xb, yb in zip(x_batches, y_batches):
        xb, yb = (_np(t).reshape(len(t), -1) for t in (xb, yb))
        gx, gy = _u_centre(xb @ xb.T), _u_centre(yb @ yb.T)
        acc += [(gx * gy).sum(), (gx * gx).sum(), (gy * gy).sum()]
    return acc[0] / np.sqrt(acc[1] * acc[2])


def _accumulate(xb, yb, **kw):
    m = vitsim.MinibatchCKA(len(xb[0]), len(yb[0]), **kw)
    for bx, by in zip(xb, yb):
        m.update(bx, by)
    return m


def test_minibatch_weighting_examples_equals_official_code():
    xs = _network(86, (5, 120), seed=20)   # batches of 20, 20, 20, 20 and a final 6
    ys = _network(86, (7,), seed=21)
    xb, yb = _batches(xs, 20), _batches(ys, 20)
    got = _accumulate(xb, yb, weighting="examples").compute().numpy()
    for i in range(2):
        official = _official_minibatch_cka([b[i] for b in xb], [b[0] for b in yb])
        assert abs(got[i, 0] - official) <= 1e-10  # float64, conventions §8
    want = _want_minibatch(xb, yb, weighting="examples")
    assert np.abs(got - want).max() <= 1e-10  # float64, conventions §8
    equal = _accumulate(xb, yb).compute().numpy()
    assert np.abs(equal - _want_minibatch(xb, yb)).max() <= 1e-10  # float64, conventions §8
    assert np.abs(equal - got).max() > 1e-4  # the partial batch makes the two differ


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_weightings_against_reference(kernel, unbiased):
    xs = _network(53, (4, 9), torch.float32, seed=22)
    ys = _network(53, (6,), torch.float32, seed=23)
    xb, yb = _batches(xs, 12), _batches(ys, 12)   # 12, 12, 12, 12, 5
    for weighting in ("equal", "examples"):
        got = _accumulate(xb, yb, kernel=kernel, unbiased=unbiased, weighting=weighting)
        want = _want_minibatch(xb, yb, kernel=kernel, unbiased=unbiased, weighting=weighting)
        assert np.abs(got.compute().numpy() - want).max() <= 1e-5  # float32, conventions §8
    # batches of one size: w_b is a constant and the two weightings give one CKA
    even = [_accumulate(xb[:4], yb[:4], kernel=kernel, unbiased=unbiased, weighting=w).compute()
            for w in ("equal", "examples")]
    assert torch.allclose(even[0], even[1], rtol=0, atol=1e-12)


def test_minibatch_weighting_is_validated_saved_and_merged_only_alike(tmp_path):
    with pytest.raises(ValueError, match=r"weighting 'rows'.*'equal', 'examples'"):
        vitsim.MinibatchCKA(2, weighting="rows")
    with pytest.raises(ValueError, match=r"weighting 'rows'.*'equal', 'examples'"):
        reference.minibatch_cka([np.ones((5, 2))], [np.ones((5, 2))], weighting="rows")
    xs = _network(30, (3, 8), seed=24)
    xb = _batches(xs, 10)
    m = _accumulate(xb, xb, weighting="examples")
    state = m.state_dict()
    assert state["weighting"] == "examples"
    torch.save(state, tmp_path / "m.pt")
    resumed = vitsim.MinibatchCKA(2, 2, weighting="examples")
    resumed.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(resumed.compute(), m.compute())
    with pytest.raises(ValueError, match=r"weighting='examples'.*weighting='equal'"):
        vitsim.MinibatchCKA(2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"other has weighting='equal'.*weighting='examples'"):
        m.merge(_accumulate(xb, xb))
    # a state saved before the option existed weighted batches equally
    old = _accumulate(xb, xb).state_dict()
    del old["weighting"], old["widths_x"], old["widths_y"]
    fresh = vitsim.MinibatchCKA(2, 2)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.compute(), _accumulate(xb, xb).compute())
    with pytest.raises(ValueError, match=r"state has weighting='equal'"):
        vitsim.MinibatchCKA(2, 2, weighting="examples").load_state_dict(old)


# --- StreamingCKA --------------------------------------------------------------------------


def _stream(xs, ys, sizes, unbiased=False):
    s = vitsim.StreamingCKA(unbiased=unbiased)
    start = 0
    for size in sizes:
        s.update(xs[start:start + size], ys[start:start + size])
        start += size
    assert start == xs.shape[0]
    return s


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
@pytest.mark.parametrize("n,d1,d2,sizes", [
    (5, 1, 3, (1, 4)),
    (57, 17, 40, (20, 1, 30, 6)),
    (301, 33, 9, (100, 100, 101)),
], ids=str)
def test_streaming_equals_cka_of_concatenation(n, d1, d2, sizes, unbiased, dtype):
    x, y = related_pair(n, d1, d2, dtype, seed=n)
    got = _stream(x, y, sizes, unbiased).compute()
    assert got.dtype == torch.float64 and got.shape == ()
    want = reference.cka(to_numpy(x), to_numpy(y), unbiased=unbiased)
    assert abs(got.item() - want) <= TOL[dtype]


def test_streaming_multidimensional_numpy_inputs():
    g = np.random.default_rng(1)
    x = g.normal(size=(40, 3, 2, 2))
    y = np.tanh(x.reshape(40, -1)[:, :5]) + 0.2 * g.normal(size=(40, 5))
    s = vitsim.StreamingCKA(unbiased=True)
    for i in range(0, 40, 15):
        s.update(x[i:i + 15], y[i:i + 15])
    want = reference.cka(x, y, unbiased=True)
    assert abs(s.compute().item() - want) <= 1e-10  # float64, conventions §8


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_streaming_large_common_offset_float32(unbiased):
    x, y = related_pair(200, 30, 12, torch.float32, seed=2, offset=1e4)
    got = _stream(x, y, (64, 64, 72), unbiased).compute()
    want = reference.cka(to_numpy(x), to_numpy(y), unbiased=unbiased)
    assert abs(got.item() - want) <= 1e-5  # float32, conventions §8


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_streaming_same_bits_resume_and_merge(unbiased, tmp_path):
    x, y = related_pair(150, 21, 8, torch.float32, seed=3, offset=3.0)
    sizes = (30, 30, 30, 30, 30)
    full = _stream(x, y, sizes, unbiased)
    assert torch.equal(full.compute(), _stream(x, y, sizes, unbiased).compute())
    first = _stream(x[:60], y[:60], (30, 30), unbiased)
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = vitsim.StreamingCKA(unbiased=unbiased)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt"))
    for i in range(60, 150, 30):
        resumed.update(x[i:i + 30], y[i:i + 30])
    assert torch.equal(resumed.state_dict()["sums"], full.state_dict()["sums"])
    assert torch.equal(resumed.compute(), full.compute())
    # The halves have different reference shifts (their own first batches): merge rebases.
    merged = _stream(x[:70], y[:70], (70,), unbiased)
    merged.merge(_stream(x[70:], y[70:], (80,), unbiased))
    want = reference.cka(to_numpy(x), to_numpy(y), unbiased=unbiased)
    assert abs(merged.compute().item() - want) <= 1e-5  # float32, conventions §8
    assert merged.num_examples == 150


def test_streaming_errors_and_state_kept():
    x, y = related_pair(40, 6, 4, torch.float32, seed=4)
    s = vitsim.StreamingCKA(unbiased=True)
    s.update(x[:20], y[:20])
    before = s.state_dict()["sums"].clone()
    for bad in (float("nan"), float("inf")):
        yb = y[20:].clone()
        yb[3, 1] = bad
        with pytest.raises(ValueError, match=r"y contains (NaN|Inf)"):
            s.update(x[20:], yb)
    with pytest.raises(ValueError, match=r"x.*same number of examples"):
        s.update(x[20:], y[21:])
    with pytest.raises(ValueError, match=r"x has 5 and y 4 features"):
        s.update(x[20:, :5], y[20:])
    with pytest.raises(TypeError, match=r"y.*int64"):
        s.update(x[20:], y[20:].to(torch.int64))
    assert torch.equal(s.state_dict()["sums"], before)
    small = vitsim.StreamingCKA(unbiased=True)
    small.update(x[:3], y[:3])
    with pytest.raises(ValueError, match=r"unbiased.*>= 4"):
        small.compute()
    with pytest.raises(ValueError, match=r"before any update"):
        vitsim.StreamingCKA().compute()


def test_streaming_refuses_huge_state_and_points_to_minibatch():
    s = vitsim.StreamingCKA(max_state_bytes=1 << 20)
    x = torch.zeros(4, 300)
    with pytest.raises(ValueError, match=r"max_state_bytes.*MinibatchCKA"):
        s.update(x, x)
    assert s.num_examples == 0
    vitsim.StreamingCKA(max_state_bytes=1 << 24).update(x, x)  # raising the limit lets it run


def test_streaming_constant_input_is_nan_with_warning():
    x = torch.ones(30, 4, dtype=torch.float64)
    y = torch.randn(30, 3, dtype=torch.float64)
    s = _stream(x, y, (10, 20))
    with pytest.warns(RuntimeWarning, match="x"):
        assert torch.isnan(s.compute())


# --- two processes, gloo: sync() equals one process over all batches ----------------------


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        xs = _network(96, (5, 30), torch.float32, seed=11)
        ys = _network(96, (4, 9, 12), torch.float32, seed=12)
        xb, yb = _batches(xs, 12), _batches(ys, 12)
        m = vitsim.MinibatchCKA(2, 3)
        for bx, by in list(zip(xb, yb))[rank::world]:   # data-parallel: every other batch
            m.update(bx, by)
        m.sync()
        x, y = related_pair(96, 13, 7, torch.float64, seed=13, offset=2.0)
        s = vitsim.StreamingCKA(unbiased=True)
        for i in range(rank * 16, 96, 16 * world):
            s.update(x[i:i + 16], y[i:i + 16])
        s.sync()
        lonely = vitsim.StreamingCKA()   # only rank 0 sees data
        if rank == 0:
            lonely.update(x, y)
        lonely.sync()
        torch.save({"mb": m.compute(), "batches": m.num_batches, "stream": s.compute(),
                    "lonely": lonely.compute()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_sync_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    xs = _network(96, (5, 30), torch.float32, seed=11)
    ys = _network(96, (4, 9, 12), torch.float32, seed=12)
    single = _run(_batches(xs, 12), _batches(ys, 12))
    x, y = related_pair(96, 13, 7, torch.float64, seed=13, offset=2.0)
    stream = _stream(x, y, (16,) * 6, unbiased=True).compute()
    lonely = vitsim.StreamingCKA()
    lonely.update(x, y)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["batches"] == 8
        # the same float64 sums added in another order
        assert torch.allclose(got["mb"], single.compute(), atol=1e-12, rtol=0)
        assert abs(got["stream"].item() - stream.item()) <= 1e-10
        assert abs(got["lonely"].item() - lonely.compute().item()) <= 1e-10


def test_w5_workload_smoke():
    pytest.importorskip("timm")
    from vitsim.bench.streaming_workloads import workloads

    (w5,) = workloads(torch.device("cpu"), smoke=True)
    assert w5.suite == "streaming" and w5.baseline is not None
    inputs = w5.setup(torch.device("cpu"))
    assert len(inputs["feats"]["vit"]) == 12 and len(inputs["feats"]["cnn"]) == 8
    w5.run(inputs)
    w5.baseline(inputs)
    got = inputs["metric"].compute()
    assert got.shape == (12, 8) and bool(torch.isfinite(got).all())
