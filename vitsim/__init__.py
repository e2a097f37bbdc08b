"""vitsim: fused GPU kernels for the representation analyses of Raghu et al. (2021)."""

from ._checkout import install_kernels_finder as _install_kernels_finder

_install_kernels_finder()

from . import reference  # noqa: E402
from .attention import attention_distance, attention_distance_qk
from .cka import cka, hsic
from .capture import Capture
from .cka_matrix import cka_matrix
from .norms import RatioOfNorms, ratio_of_norms, ratio_of_norms_maps
from .streaming import MinibatchCKA, StreamingCKA

from ._version import __version__  # noqa: E402

__all__ = ["attention_distance", "attention_distance_qk", "cka", "hsic", "cka_matrix", "MinibatchCKA", "StreamingCKA",
           "Capture", "RatioOfNorms", "ratio_of_norms", "ratio_of_norms_maps", "reference", "__version__"]
