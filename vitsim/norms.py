"""Ratio of norms across a skip connection (conventions §6, Raghu et al. 2021 Fig. 7).

For a residual sub-block `z ↦ z + f(z)`, `r = ‖z‖₂ / ‖f(z)‖₂`: per token over channels for a
transformer (`(B, N, C)` tensors), per example over all C·H·W entries for a ResNet block
(`(B, C, H, W)` maps). A large r means the sub-block mostly passes its input through.

`ratio_of_norms` / `ratio_of_norms_maps` are the functional forms; `RatioOfNorms` keeps plain
float64 sums of the ratios and integer counts, so a streamed run over many batches gives the
mean over all of them exactly, and two accumulators merge by adding their state.
"""

from __future__ import annotations

import math

import torch

from ._validate import as_tensor, raise_if_not_finite

KINDS = ("tokens", "maps")


def _check_pair(z, fz, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    zt, ft = as_tensor("z", z).detach(), as_tensor("fz", fz).detach()
    if zt.shape != ft.shape:
        raise ValueError(f"z and fz must have the same shape: z.shape={tuple(zt.shape)}, "
                         f"fz.shape={tuple(ft.shape)}")
    if zt.device != ft.device:
        raise ValueError(f"z is on {zt.device} and fz on {ft.device}; move both to the same device")
    if kind == "tokens" and zt.ndim != 3:
        raise ValueError(f"z must have shape (B, N, C) for token ratios, got {tuple(zt.shape)}")
    if kind == "maps" and zt.ndim < 2:
        raise ValueError(f"z must have shape (B, ...) (e.g. (B, C, H, W)), got {tuple(zt.shape)}")
    if zt.shape[0] == 0:
        raise ValueError("z and fz have no examples (B = 0)")
    return zt, ft


def norms(t: torch.Tensor, kind: str) -> torch.Tensor:
    """L2 norms: `(B, N)` over the channel axis of `(B, N, C)` tokens, `(B,)` over all entries of
    each example for maps. float32 (float64 for float64 input)."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    if kind == "tokens":
        return torch.linalg.vector_norm(t, dim=-1, dtype=dtype)
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=dtype)


class RatioOfNorms:
    """Streaming mean of `‖z‖ / ‖f(z)‖` for one residual sub-block.

    Args:
        kind: "tokens" for `(B, N, C)` transformer tokens, "maps" for `(B, ...)` ResNet maps.
        num_prefix_tokens: P, the tokens before the patches (class, distillation, registers);
            the spatial mean runs over tokens P..N−1. Only for "tokens".
        class_token: whether token 0 is a class token (False for models with registers but no
            class token); without one `cls` is NaN.

    State (`state_dict()`): `sums` float64 `(2,)` = (Σ class-token ratios, Σ spatial ratios) and
    `counts` int64 `(2,)`; for "maps" only the second slot is used.

    Example:
        >>> acc = vitsim.RatioOfNorms("tokens", num_prefix_tokens=1)
        >>> for z, fz in batches:            # (B, N, C) each
        ...     acc.update(z, fz)
        >>> acc.compute()
        {'cls': 3.1, 'spatial': 1.7}
    """

    def __init__(self, kind: str = "tokens", *, num_prefix_tokens: int = 1, class_token: bool = True):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid: 'tokens', 'maps'")
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        self.class_token = bool(class_token) and num_prefix_tokens >= 1
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.sums = torch.zeros(2, dtype=torch.float64)
        self.counts = torch.zeros(2, dtype=torch.int64)

    def update(self, z, fz) -> None:
        """Add one batch of `z` and `f(z)`: `(B, N, C)` ("tokens") or `(B, ...)` ("maps")."""
        zt, ft = _check_pair(z, fz, self.kind)
        if self.kind == "tokens" and zt.shape[1] <= self.num_prefix_tokens:
            raise ValueError(f"z has N={zt.shape[1]} tokens, not more than num_prefix_tokens="
                             f"{self.num_prefix_tokens}; there are no spatial tokens")
        z_norm, fz_norm = norms(zt, self.kind), norms(ft, self.kind)
        if not bool(torch.isfinite(z_norm).all() & torch.isfinite(fz_norm).all()):
            raise_if_not_finite(z=zt, fz=ft)
        self.update_norms(z_norm, fz_norm)

    def update_norms(self, z_norm: torch.Tensor, fz_norm: torch.Tensor) -> None:
        """Add precomputed norms: `(B, N)` per token ("tokens") or `(B,)` per example ("maps")."""
        ratio = z_norm.to(torch.float64) / fz_norm.to(torch.float64)
        device = ratio.device
        if self.sums.device != device:
            self.sums, self.counts = self.sums.to(device), self.counts.to(device)
        if self.kind == "tokens":
            p = self.num_prefix_tokens
            spatial = ratio[:, p:]
            part = torch.stack([ratio[:, 0].sum(), spatial.sum()])
            count = torch.tensor([ratio.shape[0], spatial.numel()], dtype=torch.int64, device=device)
        else:
            part = torch.stack([torch.zeros((), dtype=torch.float64, device=device), ratio.sum()])
            count = torch.tensor([0, ratio.numel()], dtype=torch.int64, device=device)
        self.sums = self.sums + part
        self.counts = self.counts + count

    def merge(self, other: "RatioOfNorms") -> None:
        """Add another accumulator's state (same kind and prefix tokens)."""
        if (other.kind, other.num_prefix_tokens) != (self.kind, self.num_prefix_tokens):
            raise ValueError("cannot merge RatioOfNorms accumulators of different kind or num_prefix_tokens")
        self.sums = self.sums + other.sums.to(self.sums.device)
        self.counts = self.counts + other.counts.to(self.counts.device)

    def compute(self):
        """`{"cls": float, "spatial": float}` ("tokens") or a float ("maps"); NaN before any update."""
        sums = self.sums.cpu().tolist()
        counts = self.counts.cpu().tolist()
        spatial = sums[1] / counts[1] if counts[1] else math.nan
        if self.kind == "maps":
            return spatial
        cls = sums[0] / counts[0] if counts[0] and self.class_token else math.nan
        return {"cls": cls, "spatial": spatial}

    def state_dict(self) -> dict:
        """Plain sums and counts on the CPU; `load_state_dict` restores them exactly."""
        return {"kind": self.kind, "num_prefix_tokens": self.num_prefix_tokens,
                "class_token": self.class_token,
                "sums": self.sums.cpu().clone(), "counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the kind and prefix tokens must match."""
        if (state["kind"], state["num_prefix_tokens"]) != (self.kind, self.num_prefix_tokens):
            raise ValueError(
                f"state is for kind={state['kind']!r}, num_prefix_tokens={state['num_prefix_tokens']}; "
                f"this accumulator has kind={self.kind!r}, num_prefix_tokens={self.num_prefix_tokens}"
            )
        self.sums = state["sums"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.int64).clone()


def ratio_of_norms(z, fz, *, num_prefix_tokens: int = 1, class_token: bool = True) -> dict:
    """Mean ratio `‖z‖₂ / ‖f(z)‖₂` across a transformer skip connection (conventions §6).

    Args:
        z: `(B, N, C)` the residual stream entering the sub-block (torch or NumPy, float16/
            bfloat16/float32/float64).
        fz: `(B, N, C)` the sub-block's branch output right before the add.
        num_prefix_tokens: P prefix tokens (class, distillation, registers); spatial tokens are
            P..N−1. Default 1.
        class_token: whether token 0 is a class token. Default True.
    Returns:
        `{"cls": float, "spatial": float}`: the mean over the batch of the class token's ratio
        (NaN without a class token) and the mean over the batch and all spatial tokens.
        A zero `f(z)` gives an infinite ratio.
    """
    acc = RatioOfNorms("tokens", num_prefix_tokens=num_prefix_tokens, class_token=class_token)
    acc.update(z, fz)
    return acc.compute()


def ratio_of_norms_maps(z, fz) -> float:
    """Mean over the batch of `‖z‖₂ / ‖f(z)‖₂` across a ResNet block (conventions §6).

    Args:
        z: `(B, C, H, W)` (any `(B, ...)`) shortcut tensor, after its projection if the block has one.
        fz: same shape, the residual branch right before the add.
    Returns:
        float; norms run over all entries of an example.
    """
    acc = RatioOfNorms("maps")
    acc.update(z, fz)
    return acc.compute()
