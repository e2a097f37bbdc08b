"""`MinibatchCKA`: minibatch CKA between every layer of two networks over many batches
(conventions §4).

The state is plain float64 sums (torchmetrics' update/compute split), so `merge` and `sync` are
additions, `state_dict()` round-trips exactly and a resumed run gives the same bits as an
uninterrupted one. The sums live in one flat tensor, on the device of the first update's
inputs; `sync()` sums it across processes with a single `all_reduce`.

Every update computes the whole batch's contribution and checks it before adding it, so a bad
batch (wrong layer count or width, mismatched n, NaN/Inf, too few examples) raises and leaves
the state exactly as it was.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._validate import as_tensor, check_bool, check_choice, check_finite_result
from .cka import check_options
from .cka_matrix import (
    LAYERS_OVERFLOW,
    cka_from_blocks,
    hsic_blocks,
    hsic_norm,
    layer_sequence,
    prepare_layers,
)

WEIGHTINGS = ("equal", "examples")


def positive_int(name: str, value) -> int:
    """`value` when it is an int ≥ 1, else `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def distributed() -> bool:
    """True when torch.distributed is initialised (`sync` then sums across processes)."""
    return dist.is_available() and dist.is_initialized()


def collective_device(state: torch.Tensor | None) -> torch.device:
    """Where a process with no state yet must put its zeros for a collective."""
    if state is not None:
        return state.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_widths(name: str, mats: list[torch.Tensor], known: list[int] | None) -> list[int]:
    """The layers' widths d; `ValueError` naming the layer when one differs from `known`."""
    widths = [m.shape[1] for m in mats]
    for i, (now, before) in enumerate(zip(widths, known or widths)):
        if now != before:
            raise ValueError(f"{name}[{i}] has {now} features per example in this batch but "
                             f"{before} in earlier batches; a layer's width cannot change")
    return widths


class MinibatchCKA:
    """Minibatch CKA between every layer of one network and every layer of another (conventions §4).

    `CKA_mb[i, j] = Σ_b w_b HSIC(K_b^i, L_b^j) / sqrt(Σ_b w_b HSIC(K_b^i, K_b^i) · Σ_b w_b HSIC(L_b^j, L_b^j))`
    over the batches b given to `update` (Nguyen et al. 2021; what Raghu et al. plot). Each update
    forms every layer's Gram matrix once and gets all pairs from one matrix product (see
    `vitsim.cka_matrix`); for the linear kernel and small d it uses feature space instead.

    Args:
        num_x: number of layers passed as `xs` to every update.
        num_y: number of layers passed as `ys`, or None to compare `xs` with itself.
        kernel: "linear" or "rbf" (exact median bandwidth of each layer in each batch).
        unbiased: Song et al.'s unbiased HSIC (default, as Nguyen et al.; ≥ 4 examples a batch).
        threshold, sigma: RBF bandwidth, as `vitsim.cka`.
        weighting: the batch weights w_b. "equal" (default): every batch counts once, as in
            Nguyen et al.'s formula. "examples": w_b is the estimator's normalisation,
            `n_b(n_b − 3)` (unbiased; what the official efficient_CKA.py accumulates) or
            `(n_b − 1)²` (biased). With batches of one size the two give the same CKA; with a
            final partial batch they differ slightly (~1e-3).

    State: one float64 tensor of `num_x·num_y + 2·(num_x + num_y) + 2` sums (the weighted HSIC
    matrix, the self terms, their zero floors, the batch and example counts), on the device of
    the first update's inputs, plus every layer's width (which may not change between updates).

    Example:
        >>> m = vitsim.MinibatchCKA(len(vit_layers), len(resnet_layers))
        >>> for batch in loader:
        ...     m.update(vit_feats(batch), resnet_feats(batch))
        >>> m.sync()                              # one all_reduce (no-op if not distributed)
        >>> heatmap = m.compute()                 # (24, 16) float64 tensor
        >>> torch.save(m.state_dict(), "cka.pt")  # resume later with load_state_dict
    """

    def __init__(self, num_x: int, num_y: int | None = None, *, kernel: str = "linear",
                 unbiased: bool = True, threshold: float = 1.0, sigma=None,
                 weighting: str = "equal"):
        self.num_x = positive_int("num_x", num_x)
        self.num_y = None if num_y is None else positive_int("num_y", num_y)
        self.kernel = kernel
        self.unbiased = check_bool("unbiased", unbiased)
        self.threshold, self.sigmas = check_options(kernel, threshold, sigma)
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self._sums: torch.Tensor | None = None
        self._widths: tuple[list[int] | None, list[int] | None] = (None, None)
        # False after load_state_dict: the next update moves the sums to its inputs' device.
        self._bound = False

    # layout of the flat state: hxy | hxx | hyy | floor_x | floor_y | batches | examples
    @property
    def _cols(self) -> int:
        return self.num_x if self.num_y is None else self.num_y

    def _size(self) -> int:
        return self.num_x * self._cols + 2 * (self.num_x + self._cols) + 2

    def _views(self):
        s, x, y = self._sums, self.num_x, self._cols
        hxy = s[: x * y].view(x, y)
        rest = s[x * y:]
        hxx, hyy = rest[:x], rest[x:x + y]
        floor_x, floor_y = rest[x + y:2 * x + y], rest[2 * x + y:2 * x + 2 * y]
        return hxy, hxx, hyy, floor_x, floor_y, rest[-2:]

    @property
    def num_batches(self) -> int:
        """Number of batches accumulated (summed over processes after `sync`)."""
        return 0 if self._sums is None else int(self._sums[-2].item())

    @property
    def num_examples(self) -> int:
        """Number of examples accumulated (summed over processes after `sync`)."""
        return 0 if self._sums is None else int(self._sums[-1].item())

    def _layers(self, xs, ys):
        """Validated `(n, d)` views of one batch's layers: `(xs2, ys2 or None)`."""
        x_list = layer_sequence("xs", xs, self.num_x, "num_x")
        if self.num_y is None:
            if ys is not None:
                raise ValueError("ys must be None: this MinibatchCKA compares xs with itself "
                                 "(num_y=None); construct it with num_y to compare two networks")
            return prepare_layers("xs", x_list, self.unbiased), None
        if ys is None:
            raise ValueError(f"ys is missing: this MinibatchCKA expects num_y={self.num_y} layers")
        y_list = layer_sequence("ys", ys, self.num_y, "num_y")
        xs2 = prepare_layers("xs", x_list, self.unbiased)
        ys2 = prepare_layers("ys", y_list, self.unbiased,
                             first=("xs[0]", as_tensor("xs[0]", x_list[0])))
        return xs2, ys2

    def update(self, xs, ys=None) -> None:
        """Add one minibatch.

        Args:
            xs: list of `num_x` activation sets `(n, ...)` of the same n examples (torch or NumPy,
                float16/bfloat16/float32/float64, one device); n ≥ 4 for the unbiased estimator.
                Each layer keeps its width d (trailing axes flattened) from batch to batch.
            ys: list of `num_y` activation sets of the same examples; None when `num_y` is None.
        Raises:
            ValueError naming the argument and layer (e.g. "ys[3]") for a wrong layer count or
            width, mismatched n or device, too few examples, NaN or Inf; the state is then
            unchanged.
        """
        xs2, ys2 = self._layers(xs, ys)
        widths = (_check_widths("xs", xs2, self._widths[0]),
                  None if ys2 is None else _check_widths("ys", ys2, self._widths[1]))
        device = xs2[0].device
        if self._sums is not None and self._bound and self._sums.device != device:
            raise ValueError(f"xs[0] is on {device} but the accumulated sums are on "
                             f"{self._sums.device}; pass every batch on the same device")
        blocks = hsic_blocks(xs2, ys2, self.kernel, self.unbiased, self.threshold, self.sigmas)
        named = {f"xs[{i}]": x for i, x in enumerate(xs2)}
        named.update({f"ys[{j}]": y for j, y in enumerate(ys2 or [])})
        check_finite_result(blocks[:3], named, LAYERS_OVERFLOW)
        n = xs2[0].shape[0]
        weight = 1.0 if self.weighting == "equal" else hsic_norm(n, self.unbiased)
        counts = torch.tensor([1.0, float(n)], dtype=torch.float64, device=device)
        batch = torch.cat([weight * b.reshape(-1) for b in blocks] + [counts])
        if self._sums is None:
            self._sums = torch.zeros_like(batch)
        elif not self._bound:
            self._sums = self._sums.to(device)
        self._bound = True
        self._sums += batch
        self._widths = widths

    def compute(self) -> torch.Tensor:
        """`(num_x, num_y)` float64 tensor of minibatch CKA (num_y = num_x in self mode), on the
        state's device. NaN, with a RuntimeWarning naming the layers, where a summed self term is
        not positive."""
        if self._sums is None or self.num_batches == 0:
            raise ValueError("compute() called before any update")
        hxy, hxx, hyy, floor_x, floor_y, _ = self._views()
        yname = "xs" if self.num_y is None else "ys"
        return cka_from_blocks(hxy, hxx, hyy, floor_x, floor_y, "xs", yname)

    def reset(self) -> None:
        """Forget every batch and width (the next update picks the device again)."""
        self._sums = None
        self._widths = (None, None)
        self._bound = False

    def _config(self) -> dict:
        return {"num_x": self.num_x, "num_y": self.num_y, "kernel": self.kernel,
                "unbiased": self.unbiased, "threshold": self.threshold, "sigma": self.sigmas,
                "weighting": self.weighting}

    def _check_config(self, config: dict, what: str) -> None:
        for key, value in self._config().items():
            # states saved before `weighting` existed weighted batches equally
            theirs = config.get(key, "equal" if key == "weighting" else None)
            if theirs != value:
                raise ValueError(f"{what} has {key}={theirs!r}, this MinibatchCKA has "
                                 f"{key}={value!r}")

    def _check_same_widths(self, widths, what: str) -> None:
        for name, mine, theirs in zip(("xs", "ys"), self._widths, widths):
            if mine is not None and theirs is not None and list(mine) != list(theirs):
                raise ValueError(f"{what} has {name} widths {list(theirs)}, this MinibatchCKA "
                                 f"{list(mine)}")

    def state_dict(self) -> dict:
        """Plain sums, layer widths and settings (copies); `torch.save` it and `load_state_dict`
        to resume."""
        return {"format": "vitsim.MinibatchCKA/1", **self._config(),
                "sums": None if self._sums is None else self._sums.clone(),
                "widths_x": self._widths[0], "widths_y": self._widths[1]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output exactly (the sums move to the next update's device).
        A state saved without `weighting` (older vitsim) loads as "equal"."""
        self._check_config(state, "state")
        sums = state["sums"]
        if sums is not None and (not isinstance(sums, torch.Tensor) or sums.dtype != torch.float64
                                 or sums.shape != (self._size(),)):
            raise ValueError(f"state['sums'] must be a float64 tensor of shape ({self._size()},)")
        self._sums = None if sums is None else sums.clone()
        widths = (state.get("widths_x"), state.get("widths_y"))
        self._widths = tuple(None if w is None else list(w) for w in widths)
        self._bound = False

    def merge(self, other: "MinibatchCKA") -> "MinibatchCKA":
        """Add another accumulator's sums (same settings, weighting and layer widths) to this
        one; returns self."""
        if not isinstance(other, MinibatchCKA):
            raise TypeError(f"other must be a MinibatchCKA, got {type(other).__name__}")
        self._check_config(other._config(), "other")
        self._check_same_widths(other._widths, "other")
        if other._sums is None:
            return self
        if self._sums is None:
            self._sums = other._sums.clone()
            self._bound = other._bound
        else:
            self._sums += other._sums.to(self._sums.device)
        self._widths = tuple(mine if mine is not None else theirs
                             for mine, theirs in zip(self._widths, other._widths))
        return self

    def sync(self) -> "MinibatchCKA":
        """Sum the accumulators of every process (`torch.distributed`, one all_reduce).

        Call it on every process, once, before `compute()`: afterwards each process holds the
        global sums (calling it again would count the other processes twice). A no-op when
        torch.distributed is not initialised. With NCCL the sums must be on the GPU. Layer
        widths are not compared across processes.
        """
        if not distributed():
            return self
        if self._sums is None:
            self._sums = torch.zeros(self._size(), dtype=torch.float64,
                                     device=collective_device(None))
        dist.all_reduce(self._sums, op=dist.ReduceOp.SUM)
        return self
