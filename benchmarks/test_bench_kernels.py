"""pytest-benchmark view of the kernel report: the very workloads `vitsim bench` runs.

    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-json=kernels.json
    VITSIM_BENCH_FULL=1 pytest benchmarks/test_bench_kernels.py --benchmark-only   # GPU sizes

The parameters come from `vitsim.bench.runner.discover`, so this suite, `vitsim bench` and
`benchmarks/report.py` never disagree on what a workload is: same inputs (`setup`), same call
(`run`), same float64 reference. Smoke sizes unless `VITSIM_BENCH_FULL=1` (full sizes need a
GPU); `VITSIM_BENCH_DEVICE` picks the device (default: CUDA when available).
"""

import math
import os

import pytest
import torch

from vitsim.bench import runner

DEVICE = torch.device(os.environ.get("VITSIM_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
SMOKE = os.environ.get("VITSIM_BENCH_FULL", "0") in ("", "0")
WORKLOADS = runner.discover(DEVICE, SMOKE)


@pytest.fixture(scope="module")
def ceilings():
    return runner.measure_ceilings(DEVICE, SMOKE)


@pytest.mark.parametrize("workload", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_workload(benchmark, workload, ceilings):
    inputs = workload.setup(DEVICE)

    def call():
        result = workload.run(inputs)
        runner.synchronize(DEVICE)
        return result

    result = benchmark.pedantic(call, rounds=3 if SMOKE else 10, warmup_rounds=1)
    value = runner._as_float(result)
    info = {"workload": workload.name, "suite": workload.suite, "device": runner._device_name(DEVICE),
            "smoke": SMOKE, "ceiling": workload.ceiling, "target": workload.target,
            "ceiling_value": ceilings.get(workload.ceiling, {}).get("value"),
            "flops": runner._number(inputs, ("flops", "gram_flops"), workload.flops),
            "bytes": runner._number(inputs, ("bytes",), workload.bytes), **workload.info,
            **runner._versions()}
    if workload.reference is not None and value is not None:
        info["reference"] = float(workload.reference(inputs))
        info["abs_error"] = abs(value - info["reference"])
        # A wrong workload definition shows up as a gross error; the conventions §8 tolerances are
        # checked by the kernel tests in tests/.
        assert info["abs_error"] < 1e-2
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})
    if value is not None:
        assert math.isfinite(value)
