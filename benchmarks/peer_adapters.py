"""One short adapter per CKA package on PyPI, each called through its documented entry point.

Used by `benchmarks/peers.py`; the packages are listed in `benchmarks/requirements-peers.txt`
and are never dependencies of vitsim. Every adapter has two steps:

- `prepare(x, y)`: turns two `(n, d)` torch tensors into what the package is fed (NumPy
  arrays, a DataLoader's tensors, ...). Not timed: it is the caller's data, not the package's work.
- `call(prepared, kernel, unbiased)`: everything a user of the package runs to get one CKA value
  (building the hook objects and DataLoaders included), returned as a Python float.

A package that only compares models through forward hooks is called the way its README shows:
the two activation matrices become the outputs of a trivial model whose only layer is an
`nn.Identity`, fed by a `DataLoader` holding the data as one batch (so the package's minibatch
CKA equals the full-data estimator). Packages are imported inside the adapters, so this module
imports without any of them installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn


class NotExpressible(Exception):
    """The input cannot be handed to this package at all (e.g. one DataLoader, two n's)."""


@dataclass
class Peer:
    """One row of the comparison: a package and the entry point it is called through."""

    name: str
    dist: str                      # distribution name on PyPI (for the version column)
    entry: str                     # the documented entry point used
    style: str                     # "functional" or "hooks"
    kernels: tuple[str, ...]
    estimators: tuple[str, ...]    # subset of ("biased", "unbiased")
    prepare: Callable[[torch.Tensor, torch.Tensor], Any]
    call: Callable[[Any, str, bool], float]
    notes: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    extra: dict = field(default_factory=dict)

    def supports(self, kernel: str, unbiased: bool) -> bool:
        est = "unbiased" if unbiased else "biased"
        return kernel in self.kernels and est in self.estimators


# --- trivial models for the hook-based packages --------------------------------------------


class Tap(nn.Module):
    """`forward(x) = x` through a named `nn.Identity` the hooks attach to."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Identity()
        # Some packages look up the device through the parameters.
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        return self.layer(x)


class SliceTap(Tap):
    """`forward(z) = z[:, start:stop]`: picks x or y out of one concatenated batch."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x):
        return self.layer(x[:, self.start:self.stop])


class PairTap(Tap):
    """`forward(x, y)` returning x (which=0) or y (which=1): ckatorch calls both models with
    the same keyword batch built from the forward signature."""

    def __init__(self, which: int):
        super().__init__()
        self.which = which

    def forward(self, x, y):
        return self.layer(x if self.which == 0 else y)


def _device(t: torch.Tensor) -> str:
    return str(t.device)


def _one_batch(*tensors: torch.Tensor):
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(*tensors), batch_size=max(1, len(tensors[0])))


def _concat(x: torch.Tensor, y: torch.Tensor):
    """One DataLoader feeds both models: hand them `[x | y]` and let each model slice."""
    if x.shape[0] != y.shape[0]:
        raise NotExpressible("one DataLoader feeds both models: x and y cannot differ in n")
    if x.ndim != 2 or y.ndim != 2:
        raise NotExpressible("inputs must be (n, d) to be concatenated into one batch")
    return torch.cat([x, y], dim=1), x.shape[1]


# --- torch-cka (PyTorch-Model-Compare): hooks, unbiased HSIC, float32 Gram matrices ------------


def _torch_cka(prep, kernel, unbiased):
    from torch_cka import CKA

    x, y = prep
    cka = CKA(Tap(), Tap(), model1_name="x", model2_name="y", model1_layers=["layer"],
              model2_layers=["layer"], device=_device(x))
    cka.compare(_one_batch(x), _one_batch(y))
    return float(cka.export()["CKA"][0, 0])


# --- ckatorch: functional cka_base (float64 Gram space) and the hook-based CKA class ----------


def _ckatorch_base(prep, kernel, unbiased):
    from ckatorch import cka_base

    x, y = prep
    return float(cka_base(x, y, kernel=kernel, unbiased=unbiased, threshold=1.0))


def _ckatorch_prepare_hooks(x, y):
    # The README's unit of data is one (tokens, features) matrix per dataset item, its Gram
    # matrix taken over the rows: one item holding the whole (n, d) activation set.
    return x.unsqueeze(0), y.unsqueeze(0)


def _ckatorch_hooks(prep, kernel, unbiased):
    from ckatorch import CKA

    x, y = prep
    cka = CKA(PairTap(0), PairTap(1), layers=["layer"], first_name="x", second_name="y",
              device=_device(x))
    matrix = cka(_one_batch(x, y), epochs=1)
    return float(matrix[0, 0])


# --- cka-pytorch: hooks, unbiased HSIC on float32 Gram matrices, +1e-4 in the denominator ------


def _cka_pytorch_prepare(x, y):
    z, d1 = _concat(x, y)
    return z, d1, x.shape[1] + y.shape[1], torch.zeros(len(z))


def _cka_pytorch(prep, kernel, unbiased):
    from cka_pytorch.cka import CKACalculator

    z, d1, d, labels = prep
    calc = CKACalculator(SliceTap(0, d1), SliceTap(d1, d), model1_layers=["layer"],
                         model2_layers=["layer"], device=z.device, verbose=False)
    matrix = calc.calculate_cka_matrix(_one_batch(z, labels), num_epochs=1)
    return float(matrix[0, 0])


# --- pytorch-cka: cka_from_features (functional) and compute_cka (hooks) ------------------------


def _pytorch_cka_features(prep, kernel, unbiased):
    from cka import cka_from_features

    x, y = prep
    return float(cka_from_features(x, y)[0, 0])


def _pytorch_cka_prepare_hooks(x, y):
    z, d1 = _concat(x, y)
    return z, d1, x.shape[1] + y.shape[1]


def _pytorch_cka_hooks(prep, kernel, unbiased):
    from cka import compute_cka

    z, d1, d = prep
    matrices = compute_cka(SliceTap(0, d1), SliceTap(d1, d), _one_batch(z), layers=["layer"],
                           device=z.device, progress=False)
    return float(matrices[0][0, 0])


# --- ultimate-anatome (the maintained fork of anatome): SimilarityHook with 'lincka' -----------


def _anatome(prep, kernel, unbiased):
    from anatome.similarity import SimilarityHook, linear_cka_distance

    x, y = prep
    metric = partial(linear_cka_distance, reduce_bias=True) if unbiased else "lincka"
    m1, m2 = Tap(), Tap()
    h1 = SimilarityHook(m1, "layer", cca_distance=metric)
    h2 = SimilarityHook(m2, "layer", cca_distance=metric)
    with torch.no_grad():
        m1(x)
        m2(y)
    return float(h1.distance(h2, metric_as_sim_or_dist="sim"))


# --- NumPy packages -------------------------------------------------------------------------


def _numpy(x, y):
    return x.detach().cpu().numpy(), y.detach().cpu().numpy()


def _repsim(prep, kernel, unbiased):
    import repsim

    x, y = prep
    return float(repsim.cka([x, y], kernel_type=kernel,
                            estimator="song" if unbiased else "gretton")[0, 1])


def _cka_analyzer(prep, kernel, unbiased):
    from cka_analyzer.compute import linear_cka

    x, y = prep
    return float(linear_cka(x, y))


def _deep_reps(prep, kernel, unbiased):
    from deep_reps import centered_kernel_alignment

    x, y = prep
    return float(centered_kernel_alignment(x, y))


def _vitsim(prep, kernel, unbiased):
    import vitsim

    x, y = prep
    return float(vitsim.cka(x, y, kernel=kernel, unbiased=unbiased))


def _same(x, y):
    return x, y


BOTH = ("biased", "unbiased")

PEERS: list[Peer] = [
    Peer("vitsim", "vitsim", "vitsim.cka(x, y)", "functional", ("linear", "rbf"), BOTH,
         _same, _vitsim),
    Peer("torch-cka", "torch-cka", "torch_cka.CKA(...).compare(dl1, dl2)", "hooks",
         ("linear",), ("unbiased",), _same, _torch_cka,
         "PyTorch-Model-Compare; unbiased HSIC only, float32 uncentred Gram matrices"),
    Peer("ckatorch (cka_base)", "ckatorch", "ckatorch.cka_base(x, y)", "functional",
         ("linear", "rbf"), BOTH, _same, _ckatorch_base,
         "casts to float64, n×n Gram matrices; RBF median via torch.median (lower median)"),
    Peer("ckatorch (CKA hooks)", "ckatorch", "ckatorch.CKA(...)(dataloader, epochs=1)", "hooks",
         ("linear",), ("unbiased",), _ckatorch_prepare_hooks, _ckatorch_hooks,
         "minibatch CKA (Nguyen et al.) in float64; one dataset item = the (n, d) matrix"),
    Peer("cka-pytorch", "cka-pytorch", "CKACalculator(...).calculate_cka_matrix(dl, num_epochs=1)",
         "hooks", ("linear",), ("unbiased",), _cka_pytorch_prepare, _cka_pytorch,
         "float32 Gram matrices; adds 1e-4 under the square root of the denominator"),
    Peer("pytorch-cka (features)", "pytorch-cka", "cka.cka_from_features(x, y)", "functional",
         ("linear",), ("unbiased",), _same, _pytorch_cka_features,
         "float32 uncentred Gram matrices; result clamped to [0, 1]"),
    Peer("pytorch-cka (hooks)", "pytorch-cka", "cka.compute_cka(m1, m2, dl, layers=...)", "hooks",
         ("linear",), ("unbiased",), _pytorch_cka_prepare_hooks, _pytorch_cka_hooks,
         "same estimator as cka_from_features, through forward hooks"),
    Peer("ultimate-anatome", "ultimate-anatome", "anatome.SimilarityHook(m, 'layer', 'lincka')",
         "hooks", ("linear",), BOTH, _same, _anatome,
         "float32 feature space (XᵀY); its reduce_bias=True self terms mix x and y row norms"),
    Peer("repsim", "repsim", "repsim.cka([x, y], kernel, estimator)", "functional",
         ("linear", "rbf"), BOTH, _numpy, _repsim,
         "C++/Eigen, float64, n×n; 'song' numerator over 'gretton' (biased) self terms; "
         "RBF median over the upper triangle", devices=("cpu",)),
    Peer("cka-analyzer", "cka-analyzer", "cka_analyzer.compute.linear_cka(X, Y)", "functional",
         ("linear",), ("biased",), _numpy, _cka_analyzer,
         "NumPy; centres K with dense n×n products", devices=("cpu",)),
    Peer("deep-reps", "deep-reps", "deep_reps.centered_kernel_alignment(R, R')", "functional",
         ("linear",), ("biased",), _same, _deep_reps,
         "Gram matrix built entry by entry in a Python double loop"),
]

BY_NAME = {p.name: p for p in PEERS}
