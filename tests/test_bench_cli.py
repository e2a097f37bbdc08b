"""`vitsim bench`: the subcommand is registered, runs the smoke report end to end, and agrees
with `vitsim.bench.runner` on what the workloads are."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from vitsim import cli
from vitsim.bench import cli as bench_cli
from vitsim.bench import runner


def test_bench_is_registered_with_the_runners_suites():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--suite", "cka", "--device", "cpu", "--smoke", "--out", "r.json"])
    assert args.func is bench_cli.run
    assert (args.suite, args.device, args.smoke, args.out) == ("cka", "cpu", True, "r.json")
    assert bench_cli.SUITES == runner.SUITES
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--suite", "nope"])


def test_command_line_round_trips():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--suite", "attention", "--smoke", "--out", "a b.md"])
    line = bench_cli.command_line(args)
    assert line == "vitsim bench --suite attention --smoke --out 'a b.md'"
    assert vars(parser.parse_args(shlex.split(line)[1:])) == vars(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert cli.main(["bench", "--device", "cuda", "--smoke"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_smoke_report_runs_every_workload(tmp_path):
    # A user's CPU run: a fresh process without the Triton interpreter the test suite enables.
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "vitsim.cli", "bench", "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    expected = [w.name for w in runner.discover(torch.device("cpu"), smoke=True)]
    assert [r["name"] for r in report["workloads"]] == expected
    assert expected, "no workloads discovered"
    assert report["command"] == f"vitsim bench --suite all --device cpu --smoke --out {out}"
    for row in report["workloads"]:
        assert row["status"] == "ok", (row["name"], row["status"])
        assert row["seconds"] > 0
        assert row["name"] in proc.stdout
        # A wrong workload definition shows up as a gross error; the conventions §8 tolerances are
        # checked by the kernel tests.
        if "error" in row:
            assert row["error"] < 1e-2, (row["name"], row["error"])
    assert "## Measured ceilings" in proc.stdout
