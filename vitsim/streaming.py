"""Stateful CKA over many batches (conventions §4): the exact `StreamingCKA`, and
`MinibatchCKA` (from `vitsim.minibatch`, re-exported here).

`StreamingCKA` keeps plain float64 sums as its whole state, so `merge` and `sync` are additions
(after a shift to a common reference), `state_dict()` round-trips exactly and a resumed run
gives the same bits as an uninterrupted one. Every update computes the whole batch's sums and
checks them before adding them, so a bad batch raises and leaves the state exactly as it was.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._stats import GramStats, cka_from_hsic, self_term_floor
from ._validate import (as_matrix, as_tensor, check_bool, check_finite_result, check_n, check_pair,
                        min_examples)
from .cka_matrix import centred_rows, rows_per_chunk
from .minibatch import MinibatchCKA, collective_device, distributed
from . import torch_path

__all__ = ["MinibatchCKA", "StreamingCKA"]


def _fields(d1: int, d2: int) -> list[tuple[str, tuple[int, ...]]]:
    """The sums of shifted rows s = x − r_x, t = y − r_y, with p = ‖s‖², q = ‖t‖²."""
    return [
        ("n", ()), ("sx", (d1,)), ("sy", (d2,)),          # n, Σs, Σt
        ("sxy", (d1, d2)), ("sxx", (d1, d1)), ("syy", (d2, d2)),  # Σstᵀ, Σssᵀ, Σttᵀ
        ("px", (d1,)), ("qx", (d1,)), ("py", (d2,)), ("qy", (d2,)),  # Σps, Σqs, Σpt, Σqt
        ("pp", ()), ("qq", ()), ("pq", ()),               # Σp², Σq², Σpq
    ]


def _state_numel(d1: int, d2: int) -> int:
    total = 0
    for _, shape in _fields(d1, d2):
        size = 1
        for s in shape:
            size *= s
        total += size
    return total


def _unflatten(flat: torch.Tensor, d1: int, d2: int) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape in _fields(d1, d2):
        size = 1
        for s in shape:
            size *= s
        out[name] = flat[start:start + size].view(shape)
        start += size
    return out


def shift_sums(v: dict[str, torch.Tensor], alpha: torch.Tensor, beta: torch.Tensor):
    """The same sums for rows shifted by `(alpha, beta)`: s → s + α, t → t + β (new tensors).

    With P = tr Σssᵀ, c = ‖α‖², e = ‖β‖² (old sums on the right):
    Σs' = Σs + nα;  Σs't'ᵀ = Σstᵀ + (Σs)βᵀ + α(Σt)ᵀ + nαβᵀ;  Σp's' = Σps + Pα + 2(Σssᵀ)α
    + 2(α·Σs)α + cΣs + ncα;  Σp't' = Σpt + Pβ + 2(Σstᵀ)ᵀα + 2(α·Σs)β + cΣt + ncβ;
    Σp'² = Σp² + 4α·Σps + 4αᵀ(Σssᵀ)α + 2cP + 4cα·Σs + nc²;  Σp'q' = Σpq + 2β·Σpt + 2α·Σqs
    + 4αᵀ(Σstᵀ)β + eP + cQ + 2eα·Σs + 2cβ·Σt + nce; and symmetrically for t.
    Shifting by minus the mean gives the centred sums (`a_i = ‖x_i − μ‖²`, conventions §3).
    """
    n = v["n"]
    sx, sy, sxy, sxx, syy = v["sx"], v["sy"], v["sxy"], v["sxx"], v["syy"]
    big_p, big_q = torch.trace(sxx), torch.trace(syy)
    c, e = alpha @ alpha, beta @ beta
    a_sx, b_sy = alpha @ sx, beta @ sy
    sxx_a, syy_b = sxx @ alpha, syy @ beta
    sxy_b, sxyt_a = sxy @ beta, sxy.T @ alpha
    return {
        "n": n.clone(),
        "sx": sx + n * alpha,
        "sy": sy + n * beta,
        "sxy": sxy + torch.outer(sx, beta) + torch.outer(alpha, sy + n * beta),
        "sxx": sxx + torch.outer(sx, alpha) + torch.outer(alpha, sx + n * alpha),
        "syy": syy + torch.outer(sy, beta) + torch.outer(beta, sy + n * beta),
        "px": v["px"] + big_p * alpha + 2 * sxx_a + 2 * a_sx * alpha + c * sx + n * c * alpha,
        "qy": v["qy"] + big_q * beta + 2 * syy_b + 2 * b_sy * beta + e * sy + n * e * beta,
        "py": v["py"] + big_p * beta + 2 * sxyt_a + 2 * a_sx * beta + c * sy + n * c * beta,
        "qx": v["qx"] + big_q * alpha + 2 * sxy_b + 2 * b_sy * alpha + e * sx + n * e * alpha,
        "pp": v["pp"] + 4 * (alpha @ v["px"]) + 4 * (alpha @ sxx_a) + 2 * c * big_p
        + 4 * c * a_sx + n * c * c,
        "qq": v["qq"] + 4 * (beta @ v["qy"]) + 4 * (beta @ syy_b) + 2 * e * big_q
        + 4 * e * b_sy + n * e * e,
        "pq": v["pq"] + 2 * (beta @ v["py"]) + 2 * (alpha @ v["qx"]) + 4 * (alpha @ sxy_b)
        + e * big_p + c * big_q + 2 * e * a_sx + 2 * c * b_sy + n * c * e,
    }


def _flatten(v: dict[str, torch.Tensor], d1: int, d2: int) -> torch.Tensor:
    return torch.cat([v[name].reshape(-1) for name, _ in _fields(d1, d2)])


def _hsic_centred(cross, sum_ab, sum_a, sum_b, n: int, unbiased: bool):
    """conventions §3's feature-space estimators from centred sums: `cross = ‖XcᵀYc‖²`, `Σa_ib_i`,
    `Σa_i`, `Σb_i`."""
    if not unbiased:
        return cross / (n - 1) ** 2
    value = cross - sum_ab + sum_a * sum_b / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * sum_ab
    return value / (n * (n - 3))


class StreamingCKA:
    """Exact linear CKA over every example seen, fed batch by batch (conventions §4).

    Accumulates, in float64, sums of the rows shifted by a fixed reference (the first batch's
    column means): n, Σs, Σt, Σstᵀ, Σssᵀ, Σttᵀ and the row-norm terms the unbiased estimator
    needs (Σp s, Σq s, Σp t, Σq t, Σp², Σq², Σpq with p = ‖s‖², q = ‖t‖²). `compute()` shifts them
    to the mean and gives `vitsim.cka(cat(xs), cat(ys), unbiased=...)` without any batch
    dependence. Products run in float32 (float64 for float64 inputs) and are summed in float64.

    Args:
        unbiased: the unbiased HSIC estimator (needs ≥ 4 examples in total, any batch size).
        max_state_bytes: refuse (ValueError) when the state plus one batch's sums,
            `2 · 8 · (d1·d2 + d1² + d2² + 3(d1 + d2) + 4)` bytes, would exceed this. Default 2 GiB.

    Example:
        >>> s = vitsim.StreamingCKA()
        >>> for xb, yb in batches:
        ...     s.update(xb, yb)
        >>> s.compute()                           # 0-d float64 tensor
    """

    def __init__(self, *, unbiased: bool = False, max_state_bytes: int = 2 << 30):
        self.unbiased = check_bool("unbiased", unbiased)
        if (isinstance(max_state_bytes, bool) or not isinstance(max_state_bytes, int)
                or max_state_bytes < 1):
            raise ValueError(f"max_state_bytes must be a positive int, got {max_state_bytes!r}")
        self.max_state_bytes = max_state_bytes
        self.reset()

    def reset(self) -> None:
        """Forget every example (the next update sets the reference and device again)."""
        self._sums: torch.Tensor | None = None
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dims: tuple[int, int] | None = None
        self._bound = False

    @property
    def num_examples(self) -> int:
        return 0 if self._sums is None else int(self._sums[0].item())

    def _check_dims(self, d1: int, d2: int) -> None:
        need = 2 * 8 * _state_numel(d1, d2)
        if need > self.max_state_bytes:
            raise ValueError(
                f"StreamingCKA needs {need / 2**30:.2f} GiB for d1={d1}, d2={d2} (O(d1·d2) sums "
                f"plus one batch's), above max_state_bytes={self.max_state_bytes}; raise "
                "max_state_bytes, or use vitsim.MinibatchCKA (memory O(batch²) per layer)"
            )

    def _batch_sums(self, x, y, rx, ry) -> torch.Tensor:
        d1, d2 = x.shape[1], y.shape[1]
        dtype = torch_path.compute_dtype(x, y)
        flat = torch.zeros(_state_numel(d1, d2), dtype=torch.float64, device=x.device)
        v = _unflatten(flat, d1, d2)
        v["n"].fill_(x.shape[0])
        step = rows_per_chunk(max(d1, d2))
        for start in range(0, x.shape[0], step):
            s, s64 = centred_rows(x[start:start + step], rx, dtype)
            t, t64 = centred_rows(y[start:start + step], ry, dtype)
            p, q = s64.square().sum(dim=1), t64.square().sum(dim=1)
            v["sx"] += s64.sum(dim=0)
            v["sy"] += t64.sum(dim=0)
            v["sxy"] += s.T @ t
            v["sxx"] += s.T @ s
            v["syy"] += t.T @ t
            v["px"] += p @ s64
            v["qx"] += q @ s64
            v["py"] += p @ t64
            v["qy"] += q @ t64
            v["pp"] += p @ p
            v["qq"] += q @ q
            v["pq"] += p @ q
        return flat

    def update(self, x, y) -> None:
        """Add a batch: `x` `(b, ...)` and `y` `(b, ...)`, the same b ≥ 1 examples (torch or NumPy,
        float16/bfloat16/float32/float64). Errors leave the state unchanged."""
        xt, yt = as_tensor("x", x).detach(), as_tensor("y", y).detach()
        x2, y2 = as_matrix("x", xt), as_matrix("y", yt)
        check_pair(xt, yt)
        if x2.shape[0] == 0:
            est = "unbiased" if self.unbiased else "biased"
            raise ValueError(f"x and y have no examples (n=0): every batch needs n >= 1 (the {est} "
                             f"estimator needs n >= {min_examples(self.unbiased)} in total)")
        d1, d2 = x2.shape[1], y2.shape[1]
        if self._dims is not None and (d1, d2) != self._dims:
            raise ValueError(f"x has {d1} and y {d2} features, but earlier batches had "
                             f"{self._dims[0]} and {self._dims[1]}")
        if self._sums is not None and self._bound and self._sums.device != x2.device:
            raise ValueError(f"x is on {x2.device} but the accumulated sums are on "
                             f"{self._sums.device}; pass every batch on the same device")
        if self._ref is None:
            self._check_dims(d1, d2)
            ref = (torch_path.column_mean(x2), torch_path.column_mean(y2))
        else:
            ref = tuple(r.to(x2.device) for r in self._ref)
        batch = self._batch_sums(x2, y2, *ref)
        check_finite_result(batch, {"x": x2, "y": y2}, "the sums overflowed: rescale x and y")
        if self._sums is None:
            self._sums = torch.zeros_like(batch)
            self._dims = (d1, d2)
        elif not self._bound:
            self._sums = self._sums.to(x2.device)
        self._ref = ref
        self._bound = True
        self._sums += batch

    def _centred(self):
        d1, d2 = self._dims
        v = _unflatten(self._sums, d1, d2)
        n = v["n"]
        return shift_sums(v, -v["sx"] / n, -v["sy"] / n)

    def compute(self) -> torch.Tensor:
        """CKA over all examples seen: 0-d float64 tensor on the state's device (NaN with a
        RuntimeWarning when x or y is constant)."""
        if self._sums is None:
            raise ValueError("compute() called before any update")
        n = self.num_examples
        check_n(n, self.unbiased, "the number of examples seen")
        c = self._centred()
        sum_a, sum_b = torch.trace(c["sxx"]), torch.trace(c["syy"])
        self_x, self_y = c["sxx"].square().sum(), c["syy"].square().sum()
        hxy = _hsic_centred(c["sxy"].square().sum(), c["pq"], sum_a, sum_b, n, self.unbiased)
        hxx = _hsic_centred(self_x, c["pp"], sum_a, sum_a, n, self.unbiased)
        hyy = _hsic_centred(self_y, c["qq"], sum_b, sum_b, n, self.unbiased)
        empty = self._sums[:0]
        floor_x = self_term_floor(GramStats(n, None, empty, self_x))
        floor_y = self_term_floor(GramStats(n, None, empty, self_y))
        return cka_from_hsic(hxy, hxx, hyy, floor_x, floor_y)

    def state_dict(self) -> dict:
        """Plain sums, the reference shift and the sizes (copies)."""
        return {
            "format": "vitsim.StreamingCKA/1",
            "dims": self._dims,
            "sums": None if self._sums is None else self._sums.clone(),
            "ref_x": None if self._ref is None else self._ref[0].clone(),
            "ref_y": None if self._ref is None else self._ref[1].clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output exactly (the estimator stays this object's own)."""
        if state.get("format") != "vitsim.StreamingCKA/1":
            raise ValueError("state is not a StreamingCKA state_dict")
        if state["sums"] is None:
            self.reset()
            return
        d1, d2 = state["dims"]
        self._check_dims(d1, d2)
        sums = state["sums"]
        if sums.dtype != torch.float64 or sums.shape != (_state_numel(d1, d2),):
            raise ValueError(
                f"state['sums'] must be a float64 tensor of {_state_numel(d1, d2)} numbers")
        self._sums = sums.clone()
        self._ref = (state["ref_x"].clone(), state["ref_y"].clone())
        self._dims = (d1, d2)
        self._bound = False

    def _rebased(self, ref) -> torch.Tensor:
        """This state's flat sums re-expressed relative to the reference `ref`."""
        d1, d2 = self._dims
        v = _unflatten(self._sums, d1, d2)
        return _flatten(shift_sums(v, self._ref[0] - ref[0], self._ref[1] - ref[1]), d1, d2)

    def merge(self, other: "StreamingCKA") -> "StreamingCKA":
        """Add another accumulator's examples to this one (re-expressed on this reference)."""
        if not isinstance(other, StreamingCKA):
            raise TypeError(f"other must be a StreamingCKA, got {type(other).__name__}")
        if other._sums is None:
            return self
        if self._sums is None:
            self.load_state_dict(other.state_dict())
            self._bound = other._bound
            return self
        if other._dims != self._dims:
            raise ValueError(f"other has d1, d2 = {other._dims}, this StreamingCKA {self._dims}")
        device = self._sums.device
        ref = tuple(r.to(other._sums.device) for r in self._ref)
        self._sums += other._rebased(ref).to(device)
        return self

    def sync(self) -> "StreamingCKA":
        """Sum the accumulators of every process (`torch.distributed`), once, before `compute()`.

        Three collectives: the sizes (a process without data learns them), a common reference
        (the example-weighted mean of the processes' references), then one all_reduce of the
        flat sums, each process's sums first re-expressed on that reference. A no-op when
        torch.distributed is not initialised.
        """
        if not distributed():
            return self
        device = collective_device(self._sums)
        dims = torch.tensor(self._dims or (0, 0), dtype=torch.float64, device=device)
        dist.all_reduce(dims, op=dist.ReduceOp.MAX)
        d1, d2 = int(dims[0].item()), int(dims[1].item())
        if d1 == 0:
            return self
        if self._sums is None:
            self._sums = torch.zeros(_state_numel(d1, d2), dtype=torch.float64, device=device)
            self._ref = (torch.zeros(d1, dtype=torch.float64, device=device),
                         torch.zeros(d2, dtype=torch.float64, device=device))
            self._dims = (d1, d2)
        elif self._dims != (d1, d2):
            raise ValueError(f"this process has d1, d2 = {self._dims}, another ({d1}, {d2})")
        n = self._sums[0]
        weighted = torch.cat([n * self._ref[0], n * self._ref[1], n.reshape(1)])
        dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
        total = weighted[-1]
        ref = (weighted[:d1] / total, weighted[d1:d1 + d2] / total)
        sums = self._rebased(ref)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        self._sums, self._ref, self._bound = sums, ref, True
        return self
