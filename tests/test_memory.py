"""Issue #2: a linear CPU call on n = 20,000, d = 4,096 float32 needs at most about twice the
inputs' memory (inputs plus at most as much again), measured as the peak resident set of a
fresh process."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import torch, vitsim
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4096, generator=g)
    y = torch.randn(20000, 4096, generator=g)
    before = peak()
    vitsim.cka(x, y, backend="torch")
    print((peak() - before) / (x.nbytes + y.nbytes))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_linear_cpu_call_needs_at_most_twice_the_inputs():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    extra_over_inputs = float(out.stdout.strip().splitlines()[-1])
    assert extra_over_inputs <= 1.0
