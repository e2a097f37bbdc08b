"""Seeded test inputs shared by the test modules."""

import numpy as np
import torch


def related_pair(n, d1, d2, dtype=torch.float32, seed=0, device="cpu", offset=0.0):
    """`x` `(n, d1)` random, `y` `(n, d2)` a random linear map of x plus noise (CKA well inside (0, 1)).

    Generated in float64 then rounded to `dtype`; the reference must be computed from the
    rounded values (`to_numpy`).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    w = torch.randn(d1, d2, generator=g, dtype=torch.float64) / max(d1, 1) ** 0.5
    y = torch.tanh(x @ w) + 0.5 * torch.randn(n, d2, generator=g, dtype=torch.float64)
    return (x + offset).to(dtype).to(device), (y + offset).to(dtype).to(device)


def to_numpy(t):
    """float64 NumPy copy of a tensor (what the reference sees)."""
    return t.detach().to(torch.float64).cpu().numpy()


def rng(seed=0):
    return np.random.default_rng(seed)
