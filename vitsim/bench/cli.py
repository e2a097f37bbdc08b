"""`vitsim bench`: run the kernel benchmark report on this machine and print it.

    vitsim bench                      # every suite, on CUDA when there is one
    vitsim bench --suite cka --smoke  # tiny sizes, seconds (what CI runs)
    vitsim bench --out bench.json     # also write the report (.json or .md; a folder: both)

The workloads and the measured ceilings are those of `vitsim.bench.runner`, the same code that
`benchmarks/report.py` and the pytest-benchmark suites in `benchmarks/` call, so all three agree
on what each workload is.
"""

from __future__ import annotations

import argparse
import shlex
import sys

# Mirrors `runner.SUITES`; kept here so building the `vitsim` parser does not import the runner.
SUITES = ("all", "cka", "attention", "streaming")
DEVICES = ("cuda", "cpu")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on an argparse `subparsers` object.

    Args:
        subparsers: the object `ArgumentParser.add_subparsers()` returned.
    Returns:
        The `bench` sub-parser; its `func` default runs the report and returns the exit status
        (0, or 1 when a workload failed or the device is not available).
    """
    p = subparsers.add_parser(
        "bench", help="benchmark the kernels on this machine and print the report",
        description="Run the kernel benchmark report (the workloads of benchmarks/report.py): "
                    "measure this device's matmul and copy ceilings, time every workload, compare "
                    "each result with the float64 reference, and print the table.")
    p.add_argument("--suite", choices=SUITES, default="all",
                   help="which workloads (default all)")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="cuda or cpu (default: cuda if available; a CPU run uses smoke sizes)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes that run in seconds (checks the set-up, not the speed)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="also write the report: FILE.json, FILE.md, or a folder for both")
    p.set_defaults(func=run)
    return p


def command_line(args: argparse.Namespace) -> str:
    """The `vitsim bench ...` command that reproduces `args` (recorded in the report)."""
    parts = ["vitsim", "bench", "--suite", args.suite]
    if args.device:
        parts += ["--device", args.device]
    if args.smoke:
        parts.append("--smoke")
    if args.out:
        parts += ["--out", args.out]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Run the report for parsed `bench` arguments, print it, return the exit status."""
    import torch

    from . import runner

    if args.device == "cuda" and not torch.cuda.is_available():
        print("vitsim: error: --device cuda, but torch sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return 1
    report = runner.run_report(suite=args.suite, device=args.device, smoke=args.smoke,
                               out=args.out, command=command_line(args))
    print(runner.to_markdown(report), end="")
    for path in report.get("files", []):
        print(f"wrote {path}")
    failed = [r["name"] for r in report["workloads"] if r["status"].startswith("error")]
    if failed:
        print(f"vitsim: error: {len(failed)} workload(s) failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0
