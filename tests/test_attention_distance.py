"""Attention distance (conventions §5, §7): closed forms, every path against the float64 reference,
q/k against the softmax of q kᵀ, and the error table."""

import math

import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICES

import vitsim
from vitsim import reference

# conventions §8, relative to the float64 reference computed from the same rounded inputs: float64
# paths 1e-10; float32 1e-5; float16/bfloat16 inputs (accumulated in float32) 1e-3.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# reduction="none" returns float32: its rounding (6e-8 relative) bounds the float64 paths.
TOL_NONE = {dtype: max(tol, 1e-6) for dtype, tol in TOL.items()}

# (B, H, P, grid): odd N, non-square grids, P in 0, 1, 5. Small: the interpreter runs them.
CASES = [
    pytest.param(2, 3, 0, (3, 5), id="N15-P0-3x5"),
    pytest.param(1, 2, 1, (4, 4), id="N17-P1-4x4"),
    pytest.param(3, 1, 5, (2, 7), id="N19-P5-2x7"),
]


def random_maps(b, h, p, grid, dtype=torch.float64, seed=0, temperature=2.0):
    """Softmaxed random logits `(B, H, N, N)`, made in float64 then rounded to `dtype`."""
    n = p + grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    logits = temperature * torch.randn(b, h, n, n, generator=g, dtype=torch.float64)
    return torch.softmax(logits, dim=-1).to(dtype)


def random_qk(b, h, p, grid, d, dtype=torch.float64, seed=0):
    n = p + grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = 1.5 * torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype)


def to_np(t):
    return t.detach().to(torch.float64).cpu().numpy()


def close(got, want, tol, patch_size=16):
    """Relative agreement, with an absolute floor of `tol` pixels-per-patch for values near 0."""
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * patch_size)


def mean_distance_by_hand(grid, p, patch_size, weights):
    """Per-head mean distance from the definition: `weights(q, k)` over spatial positions."""
    gh, gw = grid
    pos = [(r * patch_size, c * patch_size) for r in range(gh) for c in range(gw)]
    total = 0.0
    for iq, (rq, cq) in enumerate(pos):
        total += sum(weights(iq, ik) * math.hypot(rq - rk, cq - ck) for ik, (rk, ck) in enumerate(pos))
    return total / len(pos)


# --- closed forms -------------------------------------------------------------------------


def test_uniform_14x14_closed_form():
    n = 197
    want = mean_distance_by_hand((14, 14), 1, 16, lambda q, k: 1.0 / n)
    attn = torch.full((2, 3, n, n), 1.0 / n, dtype=torch.float64)
    for backend in ("torch", "reference"):
        got = vitsim.attention_distance(attn, backend=backend)
        assert got.shape == (3,) and got.dtype == torch.float64
        close(got, np.full(3, want), 1e-10)
    # q = k = 0: every score ties, the softmax is uniform over all 197 keys.
    zeros = torch.zeros(2, 3, n, 8, dtype=torch.float64)
    close(vitsim.attention_distance_qk(zeros, zeros, backend="torch"), np.full(3, want), 1e-10)
    assert round(float(got[0]), 2) == 115.90


def test_self_attention_is_zero():
    b, h, p, grid = 2, 2, 1, (3, 4)
    n = p + grid[0] * grid[1]
    attn = torch.eye(n, dtype=torch.float32).expand(b, h, n, n)
    for backend in ("torch", "reference"):
        got = vitsim.attention_distance(attn, grid=grid, backend=backend)
        assert torch.equal(got, torch.zeros(h, dtype=torch.float64))
    # Orthogonal one-hot q = k: exp(-400) underflows, the softmax is exactly the identity.
    q = 20.0 * torch.eye(n, 16, dtype=torch.float32).expand(b, h, n, 16)
    got = vitsim.attention_distance_qk(q, q, scale=1.0, grid=grid, backend="torch")
    assert torch.equal(got, torch.zeros(h, dtype=torch.float64))


def test_all_attention_on_one_corner():
    b, h, p, grid, patch = 2, 3, 1, (5, 7), 14
    n = p + grid[0] * grid[1]
    attn = torch.zeros(b, h, n, n, dtype=torch.float32)
    corner = p + grid[0] * grid[1] - 1  # bottom-right patch
    attn[..., corner] = 1.0
    want = mean_distance_by_hand(grid, p, patch, lambda q, k: float(k == corner - p))
    for backend in ("torch", "reference"):
        got = vitsim.attention_distance(attn, patch_size=patch, grid=grid, backend=backend)
        close(got, np.full(h, want), TOL[torch.float32], patch)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_closed_forms(kernel_device):
    n = 197
    want = mean_distance_by_hand((14, 14), 1, 16, lambda q, k: 1.0 / n)
    attn = torch.full((1, 2, n, n), 1.0 / n, dtype=torch.float32, device=kernel_device)
    got = vitsim.attention_distance(attn, backend="triton")
    assert got.device.type == kernel_device.type
    close(got, np.full(2, want), TOL[torch.float32])
    assert round(float(got[0]), 2) == 115.90
    zeros = torch.zeros(1, 2, n, 16, dtype=torch.bfloat16, device=kernel_device)
    close(vitsim.attention_distance_qk(zeros, zeros, backend="triton"), np.full(2, want),
          TOL[torch.bfloat16])
    eye = torch.eye(17, dtype=torch.float32, device=kernel_device).expand(1, 2, 17, 17)
    assert torch.equal(vitsim.attention_distance(eye, backend="triton").cpu(), torch.zeros(2, dtype=torch.float64))


# --- every path against the reference ----------------------------------------------------


@pytest.mark.parametrize("b,h,p,grid", CASES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_maps_match_reference(b, h, p, grid, dtype, backend):
    attn = random_maps(b, h, p, grid, dtype, seed=1)
    want = reference.attention_distance(to_np(attn), 16, grid, p)
    got = vitsim.attention_distance(attn, grid=grid, num_prefix_tokens=p, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (h,)
    close(got, want, TOL[dtype])
    per_query = vitsim.attention_distance(attn, grid=grid, num_prefix_tokens=p, reduction="none",
                                          backend=backend)
    assert per_query.dtype == torch.float32 and per_query.shape == (b, h, grid[0] * grid[1])
    close(per_query, reference.attention_distance(to_np(attn), 16, grid, p, "none"), TOL_NONE[dtype])


@pytest.mark.parametrize("b,h,p,grid", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_maps_kernel_matches_reference(b, h, p, grid, dtype, kernel_device, monkeypatch):
    from vitsim.kernels import _launch

    # NaN-filled outputs: an entry the kernel never wrote fails the comparison.
    monkeypatch.setattr(_launch, "POISON_SCRATCH", True)
    attn = random_maps(b, h, p, grid, dtype, seed=2).to(kernel_device)
    want = reference.attention_distance(to_np(attn), 16, grid, p, "none")
    got = vitsim.attention_distance(attn, grid=grid, num_prefix_tokens=p, reduction="none", backend="triton")
    close(got, want, TOL_NONE[dtype])
    mean = vitsim.attention_distance(attn, grid=grid, num_prefix_tokens=p, backend="triton")
    close(mean, want.mean(axis=(0, 2)), TOL[dtype])


@pytest.mark.parametrize("b,h,p,grid", CASES)
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_qk_matches_reference(b, h, p, grid, dtype, backend):
    q, k = random_qk(b, h, p, grid, 12, dtype, seed=3)
    want = reference.attention_distance_qk(to_np(q), to_np(k), None, 16, grid, p)
    got = vitsim.attention_distance_qk(q, k, grid=grid, num_prefix_tokens=p, backend=backend)
    close(got, want, TOL[dtype])


@pytest.mark.parametrize("b,h,p,grid", CASES)
@pytest.mark.parametrize("d", [8, 20], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_qk_kernel_matches_reference(b, h, p, grid, d, dtype, kernel_device, monkeypatch):
    from vitsim.kernels import _launch

    monkeypatch.setattr(_launch, "POISON_SCRATCH", True)
    q, k = random_qk(b, h, p, grid, d, dtype, seed=4)
    q, k = q.to(kernel_device), k.to(kernel_device)
    want = reference.attention_distance_qk(to_np(q), to_np(k), 0.3, 16, grid, p, "none")
    got = vitsim.attention_distance_qk(q, k, scale=0.3, grid=grid, num_prefix_tokens=p, reduction="none",
                                       backend="triton")
    close(got, want, TOL_NONE[dtype])


@pytest.mark.parametrize("b,h,p,grid", CASES[:2])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.gpu)])
def test_qk_equals_distance_of_softmax(b, h, p, grid, backend):
    device = "cuda" if backend == "triton" else "cpu"
    q, k = random_qk(b, h, p, grid, 16, torch.float32, seed=5)
    q, k = q.to(device), k.to(device)
    attn = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 16**-0.5, dim=-1).float()
    want = vitsim.attention_distance(attn, grid=grid, num_prefix_tokens=p, patch_size=8, backend=backend)
    got = vitsim.attention_distance_qk(q, k, grid=grid, num_prefix_tokens=p, patch_size=8, backend=backend)
    close(got, want.cpu().numpy(), TOL[torch.float32], 8)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_qk_kernel_equals_distance_of_softmax(kernel_device):
    b, h, p, grid = 1, 2, 1, (3, 5)
    q, k = random_qk(b, h, p, grid, 16, torch.float32, seed=6)
    q, k = q.to(kernel_device), k.to(kernel_device)
    attn = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * 0.25, dim=-1).float()
    want = vitsim.attention_distance(attn, grid=grid, backend="triton")
    got = vitsim.attention_distance_qk(q, k, grid=grid, backend="triton")
    close(got, want.cpu().numpy(), TOL[torch.float32])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernels_deterministic_and_stride_aware(kernel_device):
    b, h, p, grid = 2, 2, 1, (3, 3)
    attn = random_maps(b, h, p, grid, torch.float32, seed=7).to(kernel_device)
    first = vitsim.attention_distance(attn, grid=grid, reduction="none", backend="triton")
    assert torch.equal(first, vitsim.attention_distance(attn, grid=grid, reduction="none", backend="triton"))
    # A heads-first view (B and H strides swapped) is read through its strides.
    swapped = attn.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(first, vitsim.attention_distance(swapped, grid=grid, reduction="none", backend="triton"))
    q, k = random_qk(b, h, p, grid, 16, torch.float32, seed=8)
    q, k = q.to(kernel_device), k.to(kernel_device)
    once = vitsim.attention_distance_qk(q, k, grid=grid, backend="triton")
    assert torch.equal(once, vitsim.attention_distance_qk(q, k, grid=grid, backend="triton"))
    # (B, N, H, D) memory, as a ViT's qkv projection lays it out, viewed as (B, H, N, D).
    q_bnhd, k_bnhd = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    close(vitsim.attention_distance_qk(q_bnhd, k_bnhd, grid=grid, backend="triton"), once.cpu().numpy(), 1e-6)


def test_numpy_in_numpy_out_and_strided_torch_path():
    b, h, p, grid = 2, 3, 5, (3, 4)
    attn = random_maps(b, h, p, grid, torch.float32, seed=9)
    got = vitsim.attention_distance(attn.numpy(), grid=grid, num_prefix_tokens=p)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (h,)
    none = vitsim.attention_distance(attn.numpy(), grid=grid, num_prefix_tokens=p, reduction="none")
    assert isinstance(none, np.ndarray) and none.dtype == np.float32
    swapped = attn.transpose(0, 1).contiguous().transpose(0, 1)
    close(vitsim.attention_distance(swapped, grid=grid, num_prefix_tokens=p, backend="torch"), got, 1e-6)
    q, k = random_qk(b, h, p, grid, 8, torch.float64, seed=10)
    got = vitsim.attention_distance_qk(q.numpy(), k.numpy(), grid=grid, num_prefix_tokens=p)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    close(got, reference.attention_distance_qk(q.numpy(), k.numpy(), None, 16, grid, p), TOL[torch.float64])


def test_torch_path_chunks(monkeypatch):
    # Tiny chunks: the maps and rows loops take many steps and must still agree.
    from vitsim import torch_attention

    monkeypatch.setattr(torch_attention, "CHUNK_BYTES", 256)
    b, h, p, grid = 2, 3, 1, (4, 5)
    attn = random_maps(b, h, p, grid, torch.float64, seed=11)
    close(vitsim.attention_distance(attn, grid=grid, backend="torch"),
          reference.attention_distance(to_np(attn), 16, grid, p), TOL[torch.float64])
    q, k = random_qk(b, h, p, grid, 8, torch.float64, seed=12)
    close(vitsim.attention_distance_qk(q, k, grid=grid, backend="torch"),
          reference.attention_distance_qk(to_np(q), to_np(k), None, 16, grid, p), TOL[torch.float64])


@pytest.mark.gpu
def test_qk_kernel_memory_is_linear_in_n():
    b, h, n, d = 1, 4, 1025, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vitsim.attention_distance_qk(q, k, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    vitsim.attention_distance_qk(q, k, backend="triton")
    torch.cuda.synchronize()
    # One N×N float32 map alone would be 4 MiB; O(B·H·N) buffers are a few KiB.
    assert torch.cuda.max_memory_allocated() - before < 64 * b * h * n + (1 << 16)


# --- errors (conventions §7) ---------------------------------------------------------------------


def test_token_count_must_match_grid():
    attn = random_maps(1, 2, 1, (3, 4))  # N = 13
    with pytest.raises(ValueError, match=r"N=13.*P=1.*grid=\(3, 3\)"):
        vitsim.attention_distance(attn, grid=(3, 3))
    with pytest.raises(ValueError, match=r"N=13.*P=1.*grid"):
        vitsim.attention_distance(attn)  # 12 spatial tokens: no square grid
    with pytest.raises(ValueError, match=r"N=13.*P=2.*grid"):
        vitsim.attention_distance_qk(torch.zeros(1, 1, 13, 4), torch.zeros(1, 1, 13, 4), num_prefix_tokens=2,
                                     grid=(3, 4))
    with pytest.raises(ValueError, match="grid"):
        vitsim.attention_distance(attn, grid=(0, 12))
    with pytest.raises(ValueError, match="grid"):
        vitsim.attention_distance(attn, grid=(12,))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        vitsim.attention_distance(attn, num_prefix_tokens=-1, grid=(2, 7))
    with pytest.raises(TypeError, match="num_prefix_tokens"):
        vitsim.attention_distance(attn, num_prefix_tokens=1.0, grid=(3, 4))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_rows_must_sum_to_one(backend):
    attn = random_maps(1, 2, 1, (3, 3), torch.float32)
    logits = torch.log(attn)
    with pytest.raises(ValueError, match="rows of attn must sum to 1"):
        vitsim.attention_distance(logits.exp() * 1.01, backend=backend)
    with pytest.raises(ValueError, match="check=False"):
        vitsim.attention_distance(attn.transpose(-1, -2), backend=backend)
    # Unnormalised weights are the user's call with check=False: the plain weighted sum.
    scaled = vitsim.attention_distance(attn * 2, check=False, backend=backend)
    close(scaled, 2 * reference.attention_distance(to_np(attn), 16, (3, 3), 1), 1e-5)
    # bfloat16 rounding of a proper softmax passes the check.
    vitsim.attention_distance(random_maps(2, 2, 1, (7, 7), torch.bfloat16), backend=backend)


# The interpreter's NumPy warns about the NaN it is made to produce.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_kernel_checks_rows_and_finiteness(kernel_device):
    attn = random_maps(1, 1, 1, (3, 3), torch.float32).to(kernel_device)
    with pytest.raises(ValueError, match="rows of attn must sum to 1"):
        vitsim.attention_distance(attn * 0.9, backend="triton")
    bad = attn.clone()
    bad[0, 0, 4, 2] = float("nan")
    with pytest.raises(ValueError, match="attn contains NaN"):
        vitsim.attention_distance(bad, backend="triton", check=False)
    q = torch.zeros(1, 1, 10, 16, device=kernel_device)
    q[0, 0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="q contains Inf"):
        vitsim.attention_distance_qk(q, torch.ones_like(q), backend="triton")


@pytest.mark.parametrize("check", [True, False])
def test_nan_and_inf_are_named(check):
    attn = random_maps(1, 2, 0, (3, 3), torch.float32)
    attn[0, 1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="attn contains NaN"):
        vitsim.attention_distance(attn, num_prefix_tokens=0, check=check)
    attn[0, 1, 2, 5] = float("inf")
    with pytest.raises(ValueError, match="attn contains Inf"):
        vitsim.attention_distance(attn, num_prefix_tokens=0, check=check)
    q, k = random_qk(1, 2, 1, (3, 3), 4, torch.float32)
    k[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="k contains NaN"):
        vitsim.attention_distance_qk(q, k)
    q[0, 1, 3, 2] = float("inf")
    with pytest.raises(ValueError, match="q contains Inf"):
        vitsim.attention_distance_qk(q, k)


def test_bad_types_and_dtypes_name_the_argument():
    good = random_maps(1, 1, 1, (2, 2), torch.float32)
    with pytest.raises(TypeError, match="attn"):
        vitsim.attention_distance(good.to(torch.int32))
    with pytest.raises(TypeError, match="attn"):
        vitsim.attention_distance(good.numpy().astype(np.int64))
    with pytest.raises(TypeError, match="attn"):
        vitsim.attention_distance(good.tolist())
    with pytest.raises(TypeError, match="q"):
        vitsim.attention_distance_qk(torch.ones(1, 1, 5, 4, dtype=torch.int64), torch.ones(1, 1, 5, 4))
    with pytest.raises(TypeError, match="k"):
        vitsim.attention_distance_qk(torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="scale"):
        vitsim.attention_distance_qk(torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 4), scale="0.5")
    with pytest.raises(ValueError, match="scale"):
        vitsim.attention_distance_qk(torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 4), scale=float("inf"))


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"attn must have shape \(B, H, N, N\)"):
        vitsim.attention_distance(torch.full((5, 5), 0.2))
    with pytest.raises(ValueError, match=r"attn must have shape \(B, H, N, N\)"):
        vitsim.attention_distance(torch.full((1, 1, 5, 4), 0.25))
    with pytest.raises(ValueError, match="attn is empty"):
        vitsim.attention_distance(torch.full((0, 1, 5, 5), 0.2))
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, N, D\)"):
        vitsim.attention_distance_qk(torch.ones(5, 4), torch.ones(5, 4))
    with pytest.raises(ValueError, match=r"q.shape=\(1, 1, 5, 4\), k.shape=\(1, 1, 5, 8\)"):
        vitsim.attention_distance_qk(torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 8))


def test_unknown_names_and_bad_patch_size():
    attn = random_maps(1, 1, 1, (2, 2), torch.float32)
    with pytest.raises(ValueError, match="'mean', 'none'"):
        vitsim.attention_distance(attn, reduction="sum")
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton', 'reference'"):
        vitsim.attention_distance(attn, backend="cuda")
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton', 'reference'"):
        vitsim.attention_distance_qk(torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 4), backend="flash")
    for bad in (0, -16, float("nan")):
        with pytest.raises(ValueError, match="patch_size"):
            vitsim.attention_distance(attn, patch_size=bad)
