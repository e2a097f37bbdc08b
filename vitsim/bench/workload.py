"""What one benchmark workload is: inputs, the vitsim call, the torch-path baseline, and the
numbers needed to turn a time into TFLOP/s or GB/s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Workload:
    """One row of the benchmark report.

    Attributes:
        name: short id, e.g. "W1 feature bf16".
        suite: "cka", "attention" or "streaming" (`vitsim bench --suite`).
        setup: builds the inputs on the given device; returns a dict of tensors.
        run: the measured vitsim call on those inputs.
        baseline: the torch-path call the ratio column compares against (None: no ratio).
        reference: float64 value of the result for the error column (None: not reported).
        flops: useful floating-point operations of one call (TFLOP/s column), or None.
        bytes: bytes one call must move (GB/s column), or None.
        ceiling: which measured ceiling the percentage is taken of: "matmul_bf16",
            "matmul_tf32" or "copy".
        target: the issue's target for this workload, printed beside the figures.
        info: free-form sizes and settings written into the JSON.
    """

    name: str
    suite: str
    setup: Callable[[Any], dict]
    run: Callable[[dict], Any]
    baseline: Callable[[dict], Any] | None = None
    reference: Callable[[dict], float] | None = None
    flops: float | None = None
    bytes: float | None = None
    ceiling: str = "matmul_bf16"
    target: str = ""
    info: dict = field(default_factory=dict)
