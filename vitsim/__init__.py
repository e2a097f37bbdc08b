"""vitsim: fused GPU kernels for the representation analyses of Raghu et al. (2021)."""

from . import reference
from .cka import cka, hsic

__version__ = "0.1.0"

__all__ = ["cka", "hsic", "reference", "__version__"]
