"""Kernel benchmark report: measured ceilings and every workload, as JSON and Markdown.

    python benchmarks/report.py                    # on the GPU machine: all suites
    python benchmarks/report.py --smoke            # tiny sizes on CPU, seconds (CI)
    python benchmarks/report.py --suite cka --out benchmarks/results

A thin wrapper over `vitsim.bench.runner.run_report` (the same code as `vitsim bench`).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from vitsim.bench import runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes that run in seconds (a CPU run is always smoke)")
    parser.add_argument("--suite", choices=runner.SUITES, default="all",
                        help="which workloads (default all)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", default=str(runner.DEFAULT_OUT), metavar="DIR",
                        help="directory for the JSON and Markdown files (default benchmarks/results)")
    args = parser.parse_args(argv)
    words = sys.argv if argv is None else [__file__, *argv]
    command = shlex.join([sys.executable, *words])
    report = runner.run_report(suite=args.suite, device=args.device, smoke=args.smoke, out=args.out,
                               command=command)
    print(runner.format_table(report))
    for path in report.get("files", []):
        print(f"wrote {path}")
    return 0 if all(not r["status"].startswith("error") for r in report["workloads"]) else 1


if __name__ == "__main__":
    sys.exit(main())
