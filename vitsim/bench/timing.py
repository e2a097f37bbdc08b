"""Timing one synchronising callable: warm-up outside the measurement, median of repeats.

CUDA: CUDA events around each call (and a synchronize), so asynchronous launches are counted
until the GPU finishes. CPU: `time.perf_counter`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Timing:
    """Seconds per call: `median` of `repeats` measured calls, with the fastest and slowest."""

    median: float
    min: float
    max: float
    repeats: int


def synchronize(device: torch.device) -> None:
    """Wait for all work queued on `device` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def measure(fn: Callable[[], Any], device: torch.device, *, warmup: int = 1,
            budget_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 50) -> Timing:
    """Time `fn()` on `device`.

    Args:
        fn: the call to time; it may return before the GPU finishes (events wait for it).
        device: where `fn` runs.
        warmup: untimed calls first (compilation, autotuning, caches).
        budget_s: the measured calls aim at about this much time in total...
        min_repeats, max_repeats: ...within these bounds.
    Returns:
        `Timing` in seconds.
    """
    synchronize(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    first = _once(fn, device)
    repeats = int(min(max_repeats, max(min_repeats, math.ceil(budget_s / max(first, 1e-9)))))
    times = [first] + [_once(fn, device) for _ in range(repeats - 1)]
    return Timing(statistics.median(times), min(times), max(times), len(times))
