"""`vitsim.kernels` from a plain checkout, without an install.

The Triton kernels live in the repository's top-level `kernels/` folder and install as
`vitsim.kernels` (pyproject's package-dir mapping). A checkout on `PYTHONPATH` has no
`vitsim/kernels/`, so this module adds a finder for exactly that one name, pointing at the
checkout's `kernels/`. Installed copies (a wheel puts the kernels inside `vitsim/`) never use it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_KERNELS = _PACKAGE.parent / "kernels"
# a file only vitsim's kernels folder has: a top-level `kernels` of another package is not ours
_MARKER = "hsic_features.py"


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Resolves `vitsim.kernels` to the checkout's `kernels/` folder."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vitsim.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, _CHECKOUT_KERNELS / "__init__.py",
            submodule_search_locations=[str(_CHECKOUT_KERNELS)])


def install_kernels_finder() -> bool:
    """Make `import vitsim.kernels` find the checkout's kernels; True when the finder is active.

    Does nothing for an installed package (its `vitsim/kernels/` exists) or when the folder
    next to `vitsim/` is not vitsim's kernels.
    """
    if (_PACKAGE / "kernels" / "__init__.py").is_file():
        return False
    if not (_CHECKOUT_KERNELS / _MARKER).is_file() or not (_CHECKOUT_KERNELS / "__init__.py").is_file():
        return False
    if not any(isinstance(f, _CheckoutKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutKernelsFinder())
    return True
