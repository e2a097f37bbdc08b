"""Shared test set-up: markers, device parametrisation, the Triton interpreter on CPU-only machines.

Without CUDA, TRITON_INTERPRET=1 is set before anything imports triton, so the same kernel
test bodies run on CPU tensors under the interpreter (CI). With CUDA, kernels compile for real
and the `gpu`-marked parameters run (`pytest -m gpu`).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Use as `@pytest.mark.parametrize("device", KERNEL_DEVICES)` in kernel tests: the CPU
# parameter runs under the interpreter (CI), the CUDA one compiled (`pytest -m gpu`).
KERNEL_DEVICES = [
    pytest.param("cpu", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device(device):
    """The `device` parameter, skipped where Triton cannot run on it in this process."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and not INTERPRETER:
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    return torch.device(device)
