"""Kernel benchmark report: measured device ceilings and the workloads of every suite.

`benchmarks/report.py` and `vitsim bench` are thin wrappers over this package, so both agree on
what each workload is.
"""
