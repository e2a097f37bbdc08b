"""The kernel benchmark report: measured ceilings, then every workload of the chosen suites.

    report = run_report(suite="cka", smoke=True, out="benchmarks/results")
    print(format_table(report))

Workloads come from the modules in `SUITE_MODULES`, each exposing
`workloads(device, smoke) -> list[Workload]` (modules not written yet are skipped). For each
workload the runner builds the inputs, times `run` (warm-up and autotuning outside the timing,
median of repeats: CUDA events on GPU, `perf_counter` on CPU), measures the peak extra memory of
one call (`torch.cuda.max_memory_allocated` minus what was allocated before it, CUDA only),
compares the result with the float64 reference, and times the baseline for the ratio column.
`benchmarks/report.py` and `vitsim bench` are thin wrappers over `run_report`.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import platform
import re
import shlex
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from .ceilings import measure_ceilings
from .timing import measure, synchronize
from .workload import Workload

SUITE_MODULES = {
    "cka": "vitsim.bench.cka_workloads",
    "attention": "vitsim.bench.attention_workloads",
    "streaming": "vitsim.bench.streaming_workloads",
}
SUITES = ("all",) + tuple(SUITE_MODULES)
DEFAULT_OUT = Path("benchmarks") / "results"


def discover(device: torch.device, smoke: bool, suite: str = "all") -> list[Workload]:
    """The workloads of `suite` ("all" or a key of `SUITE_MODULES`) on `device`."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(map(repr, SUITES))}")
    found = []
    for name, module in SUITE_MODULES.items():
        if suite not in ("all", name) or importlib.util.find_spec(module) is None:
            continue
        found += [w for w in importlib.import_module(module).workloads(device, smoke)
                  if suite == "all" or w.suite == suite]
    return found


def _tensors(obj, seen=None):
    """Every distinct tensor inside nested dicts/lists/tuples."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        seen.setdefault((obj.data_ptr(), obj.nbytes), obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, seen)
    return seen


def _as_float(value):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.detach().double().cpu().reshape(-1)[0]) if value.numel() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _number(inputs: dict, keys, default):
    for key in keys:
        value = inputs.get(key) if isinstance(inputs, dict) else None
        if isinstance(value, (int, float)):
            return float(value)
    return default


def run_workload(w: Workload, device: torch.device, ceilings: dict, smoke: bool) -> dict:
    """Measure one workload; returns its report row (status "ok", "skipped: …" or "error: …")."""
    row = {"name": w.name, "suite": w.suite, "target": w.target, "ceiling": w.ceiling,
           "info": dict(w.info), "status": "ok"}
    budget = 0.1 if smoke else 2.0
    inputs = None
    try:
        inputs = w.setup(device)
        synchronize(device)
        input_bytes = sum(t.nbytes for t in _tensors(inputs).values())
        row["input_bytes"] = input_bytes
        timing = measure(lambda: w.run(inputs), device, warmup=1, budget_s=budget)
        row.update(seconds=timing.median, seconds_min=timing.min, seconds_max=timing.max,
                   repeats=timing.repeats)
        # one more call for the peak memory and the value
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        value = _as_float(w.run(inputs))
        synchronize(device)
        if device.type == "cuda":
            extra = torch.cuda.max_memory_allocated(device) - before
            row.update(extra_bytes=extra, extra_pct_of_inputs=100.0 * extra / max(input_bytes, 1))
        row["value"] = value
        flops = _number(inputs, ("flops", "gram_flops"), w.flops)
        nbytes = _number(inputs, ("bytes",), w.bytes)
        ceiling = ceilings.get(w.ceiling, {}).get("value")
        row["ceiling_value"] = ceiling
        if flops:
            row["tflops"] = flops / timing.median / 1e12
            if ceiling and w.ceiling.startswith("matmul"):
                row["pct_of_ceiling"] = 100.0 * row["tflops"] / ceiling
        if nbytes:
            row["gbps"] = nbytes / timing.median / 1e9
            if ceiling and w.ceiling == "copy":
                row["pct_of_ceiling"] = 100.0 * row["gbps"] / ceiling
        if w.reference is not None and value is not None:
            row["reference"] = float(w.reference(inputs))
            row["error"] = abs(value - row["reference"])
    except Exception as error:  # noqa: BLE001 - a report row records what went wrong
        row["status"] = f"skipped: out of memory ({error})" if _is_oom(error) else f"error: {error!r}"
        if not _is_oom(error):
            row["traceback"] = traceback.format_exc()
    if row["status"] == "ok" and w.baseline is not None:
        try:
            base = measure(lambda: w.baseline(inputs), device, warmup=1, budget_s=budget)
            row["baseline_seconds"] = base.median
            row["ratio"] = row["seconds"] / base.median
        except Exception as error:  # noqa: BLE001
            row["baseline_status"] = ("skipped: out of memory" if _is_oom(error)
                                      else f"error: {error!r}")
    del inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - Triton is optional
        triton_version = None
    import numpy

    from .. import __version__

    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "numpy": numpy.__version__, "vitsim": __version__, "python": platform.python_version()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_report(suite: str = "all", device=None, smoke: bool = False, out=None,
               command: str | None = None) -> dict:
    """Measure the ceilings and every workload of `suite` on `device`; optionally write files.

    Args:
        suite: "all", "cka", "attention" or "streaming".
        device: "cuda", "cpu" or a `torch.device`; default CUDA when available. A CPU run is
            always a smoke run (full sizes would take hours).
        smoke: tiny sizes that finish in seconds (checks the plumbing, not the speed).
        out: None (write nothing), a directory (writes `report-<suite>-<device>[-smoke].json`
            and `.md` there), or a file name ending in .json or .md (that file only).
        command: the command line to record (default: this process's argv).
    Returns:
        The report as a dict: device, versions, date, command, ceilings, and one row per
        workload (see `run_workload`).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    notes = []
    if device.type == "cpu" and not smoke:
        smoke = True
        notes.append("CPU run: smoke sizes")
    report = {
        "device": _device_name(device), "device_type": device.type, **_versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join([sys.executable] + sys.argv),
        "suite": suite, "smoke": smoke, "notes": notes,
    }
    found = discover(device, smoke, suite)
    report["ceilings"] = measure_ceilings(device, smoke)
    rows = []
    for w in found:
        row = run_workload(w, device, report["ceilings"], smoke)
        print(f"[vitsim bench] {row['name']}: {row['status']}"
              + (f", {row['seconds'] * 1e3:.3f} ms" if "seconds" in row else ""), file=sys.stderr)
        rows.append(row)
    report["workloads"] = rows
    if out is not None:
        report["files"] = [str(p) for p in write_report(report, out)]
    return report


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_report(report: dict, out) -> list[Path]:
    """Write `report` as JSON and Markdown into directory `out`, or to the one file `out`
    names (.json or .md). Returns the paths written."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        paths = [out]
    else:
        smoke = "-smoke" if report["smoke"] else ""
        stem = f"report-{report['suite']}-{_slug(report['device'])}{smoke}"
        paths = [out / f"{stem}.json", out / f"{stem}.md"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        else:
            path.write_text(to_markdown(report))
    return paths


def _fmt(value, spec: str = ".4g", scale: float = 1.0) -> str:
    if value is None:
        return "—"
    return format(value * scale, spec)


def format_table(report: dict) -> str:
    """The workload table (Markdown), each figure beside the ceiling it is measured against."""
    head = ("| workload | median ms | TFLOP/s | GB/s | % of ceiling (ceiling) | extra mem MB (% inputs) "
            "| abs error vs float64 | baseline ms | ratio | target |")
    lines = [head, "|" + "---|" * 10]
    for r in report["workloads"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']} | | | | | | | | {r['target']} |")
            continue
        ceiling = report["ceilings"].get(r["ceiling"], {})
        pct = (f"{r['pct_of_ceiling']:.1f}% of {ceiling.get('value', 0):.4g} {ceiling.get('unit', '')} "
               f"{r['ceiling']}" if "pct_of_ceiling" in r else "—")
        mem = (f"{r['extra_bytes'] / 2**20:.1f} ({r['extra_pct_of_inputs']:.2f}%)"
               if "extra_bytes" in r else "—")
        base = _fmt(r.get("baseline_seconds"), ".4g", 1e3) if "baseline_seconds" in r else \
            r.get("baseline_status", "—")
        lines.append(
            f"| {r['name']} | {_fmt(r['seconds'], '.4g', 1e3)} | {_fmt(r.get('tflops'), '.4g')} "
            f"| {_fmt(r.get('gbps'), '.4g')} | {pct} | {mem} | {_fmt(r.get('error'), '.2e')} "
            f"| {base} | {_fmt(r.get('ratio'), '.3f')} | {r['target']} |")
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    """The whole report as a Markdown document: set-up, measured ceilings, workload table."""
    lines = [
        f"# vitsim kernel benchmark report ({report['suite']}{', smoke' if report['smoke'] else ''})",
        "",
        f"- device: {report['device']}",
        f"- torch {report['torch']}, triton {report['triton']}, CUDA {report['cuda']}, "
        f"vitsim {report['vitsim']}, numpy {report['numpy']}, Python {report['python']}",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
    ]
    lines += [f"- note: {note}" for note in report.get("notes", [])]
    lines += ["", "## Measured ceilings", "", "| ceiling | value | size |", "|---|---|---|"]
    for name, c in report["ceilings"].items():
        lines.append(f"| {name} | {c['value']:.4g} {c['unit']} | {c['size']} |")
    lines += ["", "## Workloads", "", format_table(report), ""]
    return "\n".join(lines) + "\n"
