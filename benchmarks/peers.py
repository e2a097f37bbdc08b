"""vitsim beside the CKA packages people use today, on the same data in the same run.

    python benchmarks/peers.py                      # CPU cases -> benchmarks/results/peers-cpu.{md,json}
    python benchmarks/peers.py --device cuda        # GPU cases (+ n = 65,536 and the largest-n scan)
    python benchmarks/peers.py --bad-inputs         # what each package does with bad input
    python benchmarks/peers.py --quick              # tiny sizes: checks the plumbing in seconds
    python benchmarks/peers.py --cases W6-biased --interleave ultimate-anatome   # A/B timing
    python benchmarks/peers.py --peers vitsim --merge   # re-measure vitsim's rows only
    python benchmarks/peers.py --render benchmarks/results/peers-cpu.json       # redo the .md

Run it from a virtual environment that has the peers installed (`benchmarks/requirements-peers.txt`,
never a dependency of vitsim) and vitsim itself (`pip install -e . --no-deps`).

Every (case, package) pair runs in a fresh subprocess: the data is loaded from `.npy` files, the
package's input conversion is done untimed, one warm-up call, then up to `--repeats` timed calls
(fewer when a call is slow); the median is reported. Peak memory is the resident-set high-water
mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus the resident set before the first
call (CPU), or `torch.cuda.max_memory_allocated` minus the memory allocated before it (GPU). A
call running longer than `--timeout` seconds is killed and reported as a timeout.

Errors are against the float64 reference `vitsim.reference.cka` on the same float32 values.
The GEMM floor is the time of the matrix products the formula needs on pre-centred float32
inputs, measured in the same run: feature space `XcᵀYc` plus the self terms `XcᵀXc`, `YcᵀYc`
with each symmetric pair computed once; Gram space (and RBF) the two Gram matrices, again
symmetric. It is the fastest of three ways measured: torch blocks over the upper block
triangle, plain torch GEMMs, and (CPU) NumPy's BLAS, whose `aᵀ @ a` is one syrk call.

On a shared machine the load changes from minute to minute, so rows measured minutes apart are
not comparable to a few percent. `--interleave` calls vitsim, the named packages and the GEMM
floors in turn in one process (A/B timing); the W6 targets are judged from those times when
`<stem>-interleaved.json` exists beside the main report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# --- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One workload: sizes, kernel, estimator."""

    name: str
    n: int
    d1: int
    d2: int
    kernel: str = "linear"
    unbiased: bool = False
    seed: int = 0
    note: str = ""

    @property
    def estimator(self) -> str:
        return "unbiased" if self.unbiased else "biased"

    def label(self) -> str:
        return (f"{self.name}: n={self.n:,}, d1={self.d1:,}, d2={self.d2:,}, {self.kernel}, "
                f"{self.estimator}")


CPU_CASES = [
    Case("W6-biased", 4096, 2048, 1024, "linear", False, note="the W6 target case"),
    Case("W6-unbiased", 4096, 2048, 1024, "linear", True),
    Case("rbf", 2048, 2048, 1024, "rbf", False),
    Case("gram-biased", 1024, 150528, 150528, "linear", False, note="Gram regime: d = 3·224·224"),
    Case("gram-unbiased", 1024, 150528, 150528, "linear", True),
]
GPU_EXTRA = [
    Case("n65k-biased", 65536, 1024, 1024, "linear", False),
    Case("n65k-unbiased", 65536, 1024, 1024, "linear", True),
]
QUICK_CASES = [
    Case("quick-biased", 300, 64, 48, "linear", False),
    Case("quick-unbiased", 300, 64, 48, "linear", True),
    Case("quick-rbf", 200, 32, 16, "rbf", False),
    Case("quick-gram", 64, 3000, 2000, "linear", False),
]


def related_pair(case: Case, offset: float = 0.0):
    """Seeded float32 `x` `(n, d1)` and `y` `(n, d2)`, y a function of x plus noise.

    `y = tanh(x W / √d1) + 0.5 ε` when W is small enough to hold, else (the Gram regime)
    `y = tanh(x[:, :d2]) + 0.5 ε`. CKA then lies well inside (0, 1).
    """
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((case.n, case.d1), dtype=np.float32)
    if case.d1 * case.d2 <= 1 << 26:
        w = rng.standard_normal((case.d1, case.d2), dtype=np.float32) / np.float32(math.sqrt(case.d1))
        y = np.tanh(x @ w)
        del w
    else:
        y = np.tanh(x[:, : case.d2])
    y += np.float32(0.5) * rng.standard_normal((case.n, case.d2), dtype=np.float32)
    if offset:
        x += np.float32(offset)
        y += np.float32(offset)
    return x, y


# --- worker: one (case, package) measurement in a fresh process -----------------------------


def write_case(work: Path, case: Case, offset: float = 0.0):
    """Generate the case's inputs into `work/<case>/` (`x.npy`, `y.npy`, `case.json`), where the
    workers load them; returns `(case_dir, x, y)`."""
    case_dir = work / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    x, y = related_pair(case, offset)
    np.save(case_dir / "x.npy", x)
    np.save(case_dir / "y.npy", y)
    (case_dir / "case.json").write_text(json.dumps(asdict(case)))
    return case_dir, x, y


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Memory:
    """Peak extra memory of the calls: RSS high-water mark (CPU) or max_memory_allocated (GPU)."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.reset_ok = _reset_peak_rss()
            self.base = _proc_kib("VmRSS") * 1024

    def peak_delta(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        return int(_proc_kib("VmHWM") * 1024 - self.base)


def _emit(kind: str, **payload):
    print(json.dumps({"kind": kind, **payload}), flush=True)


def _sync(device: str):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_calls(fn, device, repeats, budget_s, cold_limit_s):
    """Warm-up, then timed calls; returns `(value, times, cold)`."""
    _emit("start", phase="warmup", t=time.time())
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    warm = time.perf_counter() - t0
    _emit("done", phase="warmup", seconds=warm)
    if warm > cold_limit_s:
        # One more call would take as long again: report the cold call, flagged.
        return value, [warm], True
    times = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        _emit("start", phase="timed", t=time.time())
        t0 = time.perf_counter()
        value = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        _emit("done", phase="timed", seconds=times[-1])
    return value, times, False


def _load(data_dir: Path, device: str):
    import torch

    x = torch.from_numpy(np.load(data_dir / "x.npy"))
    y = torch.from_numpy(np.load(data_dir / "y.npy"))
    if device == "cuda":
        x, y = x.cuda(), y.cuda()
    return x, y


def _sym_gram(a, block: int, rows: bool):
    """Upper block triangle of `a aᵀ` (rows=True) or `aᵀ a`: one GEMM per symmetric block pair."""
    size = a.shape[0] if rows else a.shape[1]
    starts = list(range(0, size, block))
    out = []
    for i in starts:
        ai = a[i:i + block] if rows else a[:, i:i + block]
        for j in starts:
            if j < i:
                continue
            aj = a[j:j + block] if rows else a[:, j:j + block]
            out.append(ai @ aj.T if rows else ai.T @ aj)
    return out


def _syrk_floor(xc, yc, space: str):
    """The products through NumPy's BLAS on the CPU, where `aᵀ @ a` runs as one `syrk` (the
    self terms at half a GEMM's cost without blocking); None on CUDA."""
    if xc.is_cuda:
        return None
    xn, yn = xc.numpy(), yc.numpy()
    if space == "feature":
        return lambda: (xn.T @ yn, xn.T @ xn, yn.T @ yn)
    return lambda: (xn @ xn.T, yn @ yn.T)


def _gemm_floor(x, y, case: Case, args):
    """GEMM-floor timings in this process: plain GEMMs and one block per symmetric pair."""
    from vitsim._dispatch import linear_space

    space = "gram" if case.kernel == "rbf" else linear_space(case.n, case.d1, case.d2)
    xc = x - x.mean(dim=0)
    yc = y - y.mean(dim=0)
    if space == "feature":
        def plain():
            return xc.T @ yc, xc.T @ xc, yc.T @ yc

        def sym(block):
            return lambda: (xc.T @ yc, _sym_gram(xc, block, False), _sym_gram(yc, block, False))
    else:
        def plain():
            return xc @ xc.T, yc @ yc.T

        def sym(block):
            return lambda: (_sym_gram(xc, block, True), _sym_gram(yc, block, True))
    results = {"space": space}
    _, t, _ = _time_calls(plain, args.device, args.repeats, args.budget, 1e9)
    results["plain_s"] = statistics.median(t)
    syrk = _syrk_floor(xc, yc, space)
    if syrk is not None:
        _, t, _ = _time_calls(syrk, args.device, args.repeats, args.budget, 1e9)
        results["syrk_s"] = statistics.median(t)
    best = None
    for block in (256, 512, 1024):
        _, t, _ = _time_calls(sym(block), args.device, args.repeats, args.budget, 1e9)
        med = statistics.median(t)
        results[f"sym{block}_s"] = med
        if best is None or med < best[1]:
            best = (block, med)
    results["sym_block"], results["sym_s"] = best
    results["floor_s"] = min(results["plain_s"], results["sym_s"], results.get("syrk_s", math.inf))
    return results


def interleaved(args) -> None:
    """vitsim, the named packages and the GEMM floors called in turn, `--rounds` times, in one
    process: on a shared machine the load changes from minute to minute, and alternating the
    calls spreads it evenly over all of them. Reports median and fastest per entry."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.simplefilter("ignore")
    import torch

    from peer_adapters import BY_NAME
    from vitsim._dispatch import linear_space

    case = Case(**json.loads((Path(args.data_dir) / "case.json").read_text()))
    x, y = _load(Path(args.data_dir), args.device)
    xc, yc = x - x.mean(dim=0), y - y.mean(dim=0)
    space = linear_space(case.n, case.d1, case.d2)
    calls = {}
    for name in args.interleave.split(","):
        peer = BY_NAME[name]
        if not peer.supports(case.kernel, case.unbiased) or args.device not in peer.devices:
            continue
        prepared = peer.prepare(x, y)
        calls[name] = (lambda p=peer, a=prepared: p.call(a, case.kernel, case.unbiased))
    if case.kernel == "linear" and space == "feature":
        calls["GEMM floor, plain"] = lambda: (xc.T @ yc, xc.T @ xc, yc.T @ yc)
        calls["GEMM floor, symmetric"] = lambda: (xc.T @ yc, _sym_gram(xc, args.block, False),
                                                  _sym_gram(yc, args.block, False))
    else:
        calls["GEMM floor, plain"] = lambda: (xc @ xc.T, yc @ yc.T)
        calls["GEMM floor, symmetric"] = lambda: (_sym_gram(xc, args.block, True),
                                                  _sym_gram(yc, args.block, True))
    syrk = _syrk_floor(xc, yc, "gram" if case.kernel == "rbf" else space)
    if syrk is not None:
        calls["GEMM floor, syrk (NumPy BLAS)"] = syrk
    times = {name: [] for name in calls}
    values = {}
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        for name, fn in calls.items():
            values[name] = fn()
        for _ in range(args.rounds):
            for name, fn in calls.items():
                _sync(args.device)
                t0 = time.perf_counter()
                fn()
                _sync(args.device)
                times[name].append(time.perf_counter() - t0)
    out = {name: {"median_s": statistics.median(t), "min_s": min(t), "times": t,
                  "value": values[name] if isinstance(values[name], float) else None}
           for name, t in times.items()}
    _emit("result", case=asdict(case), block=args.block, rounds=args.rounds, entries=out,
          source=source_id())


def worker(args) -> None:
    """Entry point of the per-(case, package) subprocess; reports JSON lines on stdout."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.simplefilter("ignore")
    case = Case(**json.loads((Path(args.data_dir) / "case.json").read_text()))
    try:
        import torch

        from peer_adapters import BY_NAME

        x, y = _load(Path(args.data_dir), args.device)
        if args.worker == "gemm-floor":
            _emit("result", **_gemm_floor(x, y, case, args))
            return
        peer = BY_NAME[args.worker]
        with contextlib.redirect_stdout(io.StringIO()):
            prepared = peer.prepare(x, y)
        memory = _Memory(args.device)
        memory.start()

        def call():
            # Some packages print progress; keep stdout for the JSON protocol.
            with contextlib.redirect_stdout(io.StringIO()):
                with torch.no_grad():
                    return peer.call(prepared, case.kernel, case.unbiased)

        source = source_id() if peer.name == "vitsim" else None
        value, times, cold = _time_calls(call, args.device, args.repeats, args.budget,
                                         args.cold_limit)
        _emit("result", value=value, times=times, median_s=statistics.median(times),
              min_s=min(times), cold=cold, source=source,
              peak_bytes=memory.peak_delta(), rss_reset=getattr(memory, "reset_ok", None))
    except Exception as exc:  # noqa: BLE001 - any failure of a package is a result
        text = str(exc).lower()
        oom = isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text
        _emit("error", type=type(exc).__name__, message=str(exc)[:300], oom=oom)


# --- parent: orchestration, reference, tables -----------------------------------------------


def run_worker(name: str, data_dir: Path, args, python: str) -> dict:
    """Run one worker with a per-call timeout; returns its result or error record."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--data-dir", str(data_dir),
           "--device", args.device, "--repeats", str(args.repeats), "--budget", str(args.budget),
           "--cold-limit", str(args.cold_limit)]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(HERE.parent))
    lines: queue.Queue = queue.Queue()
    stderr_tail: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def drain_err():
        for line in proc.stderr:
            stderr_tail.append(line)
            del stderr_tail[:-20]

    threading.Thread(target=pump, daemon=True).start()
    threading.Thread(target=drain_err, daemon=True).start()
    deadline = time.monotonic() + args.timeout
    record: dict = {}
    calls: list[float] = []
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if line is None:
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return {"status": "timeout", "message": f"one call ran past {args.timeout:.0f} s",
                    "calls": calls}
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg["kind"] == "start":
            deadline = time.monotonic() + args.timeout
        elif msg["kind"] == "done":
            calls.append(msg["seconds"])
            # Between calls only set-up runs; allow it the same limit.
            deadline = time.monotonic() + args.timeout
        elif msg["kind"] in ("result", "error"):
            record = msg
    proc.wait()
    if not record:
        tail = "".join(stderr_tail).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        killed = proc.returncode in (-9, 137)
        return {"status": "oom" if killed else "failed", "message": tail[0][:300], "calls": calls}
    if record["kind"] == "error":
        return {"status": "oom" if record.get("oom") else "failed",
                "message": f"{record['type']}: {record['message']}", "calls": calls}
    record.pop("kind")
    record["status"] = "ok"
    return record


def reference_value(case: Case, x, y) -> float:
    from vitsim import reference

    return reference.cka(x.astype(np.float64), y.astype(np.float64), kernel=case.kernel,
                         unbiased=case.unbiased)


def _cached_reference(case: Case, x, y, cache_dir: Path, offset: float) -> tuple[float, float]:
    key = hashlib.sha1(json.dumps([asdict(case), offset]).encode()).hexdigest()[:16]
    path = cache_dir / f"ref-{case.name}-{key}.json"
    if path.exists():
        rec = json.loads(path.read_text())
        return rec["value"], rec["seconds"]
    t0 = time.perf_counter()
    value = reference_value(case, x, y)
    rec = {"value": value, "seconds": time.perf_counter() - t0}
    path.write_text(json.dumps(rec))
    return rec["value"], rec["seconds"]


def source_id() -> str:
    """git HEAD of this checkout and the sha1 of vitsim/torch_path.py as the workers see it
    (the file other engineers tune; its hash tells which version a row measured)."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True).stdout.strip()
    except OSError:
        head = "?"
    path = root / "vitsim" / "torch_path.py"
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:10] if path.exists() else "?"
    return f"HEAD {head or '?'}, torch_path.py sha1 {digest}"


def versions(peer_names) -> dict:
    from peer_adapters import BY_NAME

    out = {}
    for dist in ["vitsim", "torch", "numpy"] + [BY_NAME[p].dist for p in peer_names]:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(OSError, ValueError):
        info["memory_gib"] = round(_meminfo_kib("MemTotal") / 2**20, 1)
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(field)


def _fmt_time(s):
    if s is None:
        return "—"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_bytes(b):
    if b is None:
        return "—"
    return f"{b / 2**20:,.0f} MiB"


def _fmt_err(e):
    return "—" if e is None else f"{e:.1e}"


def _row_cells(row: dict, vitsim_s):
    status = row["status"]
    if status == "ok":
        ratio = "—" if not vitsim_s else f"{row['median_s'] / vitsim_s:.2f}×"
        note = "single cold call" if row.get("cold") else ""
        if row.get("remeasured"):
            note = (note + "; " if note else "") + "re-measured in a later run"
        if row.get("source"):
            note = (note + "; " if note else "") + row["source"]
        timing = _fmt_time(row["median_s"])
        if row.get("min_s") is not None and len(row.get("times", [])) > 1:
            timing += f" ({_fmt_time(row['min_s'])})"
        return [f"{row['value']:.10f}", _fmt_err(row["error"]), timing, ratio,
                _fmt_bytes(row.get("peak_bytes")), note]
    text = {"n/a": "not offered", "timeout": "timeout", "oom": "out of memory",
            "failed": "failed"}[status]
    msg = row.get("message", "")
    return [text, "—", "—", "—", "—", msg.replace("|", "/")[:90]]


def markdown(report: dict) -> str:
    lines = [f"# vitsim and the CKA packages on PyPI ({report['device'].upper()})", ""]
    lines += [f"Command: `{report['command']}`  ", f"Date: {report['date']}  ",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()) + "  ",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    lines += ["Value: CKA returned. Error: |value − float64 reference| (`vitsim.reference.cka` on "
              "the same float32 inputs). Time: median wall time of the timed calls after one "
              "warm-up (fastest in brackets). × vitsim: median time over vitsim's. Memory: peak extra "
              + ("resident set (VmHWM − RSS before the first call)" if report["device"] == "cpu"
                 else "`torch.cuda.max_memory_allocated` over the allocation before the first call")
              + ". Inputs are float32.", ""]
    for case in report["cases"]:
        floor = case.get("gemm_floor", {})
        lines += [f"## {case['label']}", ""]
        if "loadavg_before" in case:
            lines += ["Load average (1, 5, 15 min) before / after the case: "
                      f"{', '.join(f'{v:.1f}' for v in case['loadavg_before'])} / "
                      f"{', '.join(f'{v:.1f}' for v in case['loadavg_after'])} "
                      f"on {report['machine']['cores']} cores.", ""]
        ref = case["reference"]
        lines += [f"Reference CKA {ref:.12f} (float64, {case['reference_s']:.1f} s). "
                  + (f"GEMM floor ({floor.get('space')} space): {_fmt_time(floor.get('floor_s'))} "
                     f"(one block per symmetric pair, block {floor.get('sym_block')}: "
                     f"{_fmt_time(floor.get('sym_s'))}; plain GEMMs: {_fmt_time(floor.get('plain_s'))}"
                     + (f"; NumPy BLAS with syrk self terms: {_fmt_time(floor['syrk_s'])}"
                        if "syrk_s" in floor else "") + ")."
                     if "floor_s" in floor else f"GEMM floor: {floor.get('message', '—')}"), ""]
        lines += ["| package (entry point) | style | CKA | error | time | × vitsim | memory | note |",
                  "|---|---|---|---|---|---|---|---|"]
        vitsim_s = next((r.get("median_s") for r in case["rows"] if r["peer"] == "vitsim"), None)
        for row in case["rows"]:
            cells = _row_cells(row, vitsim_s)
            lines.append(f"| {row['peer']} (`{row['entry']}`) | {row['style']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if report.get("targets"):
        lines += ["## W6 targets", "",
                  "Each row of the tables above ran in its own process at its own time; on a "
                  "shared machine the load changes between rows, so the × vitsim column is only "
                  "indicative. The time ratios below come from the interleaved run "
                  "(`--interleave`, every entry called in turn in one process) where it exists.",
                  "", "| target | measured | met |", "|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    if report.get("scan"):
        lines += ["## Largest n on the device", "", "| package | largest n that ran | first failure |",
                  "|---|---|---|"]
        for name, rec in report["scan"].items():
            lines.append(f"| {name} | {rec['largest']:,} | {rec['failure']} |")
        lines.append("")
    lines += ["Peer notes:", ""]
    from peer_adapters import BY_NAME

    for name in report["peers"]:
        p = BY_NAME[name]
        lines.append(f"- **{name}** (`{p.entry}`): {p.notes or 'the reference implementation here'}")
    return "\n".join(lines) + "\n"


# The hook-based packages the ≥ 8× target of issue 7 names (their hook entry points).
HOOK_TARGETS = ("torch-cka", "ckatorch (CKA hooks)", "cka-pytorch")


def targets(report: dict, inter: dict | None = None, floor_inter: dict | None = None) -> list[dict]:
    """The W6 targets of issue 7, judged from the measured rows.

    Times come from the interleaved A/B run (`--interleave`) when `inter` holds the case: on a
    shared machine only calls made in turn are comparable. The GEMM-floor ratio comes from
    `floor_inter` (vitsim and the floors alone, `--stem <stem>-floor --interleave vitsim`) when
    it holds the case, else from `inter`. Errors come from the main table.
    """
    out = []
    inter = inter or {}
    floor_inter = floor_inter or {}
    by_case = {c["name"]: c for c in report["cases"]}

    def median(case_name, row):
        entries = inter.get(case_name, {})
        if row["peer"] in entries:
            return entries[row["peer"]]["median_s"], "interleaved"
        return row.get("median_s"), "main table"

    for name in ("W6-biased", "W6-unbiased"):
        case = by_case.get(name)
        v = {r["peer"]: r for r in case["rows"]}.get("vitsim", {}) if case else {}
        if v.get("status") != "ok":
            continue
        label = name.replace("-", " ")
        v_s, v_src = median(name, v)
        peers_ok = [r for r in case["rows"] if r["peer"] != "vitsim" and r["status"] == "ok"]
        if peers_ok:
            fastest = min((median(name, r)[0], r["peer"], r["error"]) for r in peers_ok)
            ratio = v_s / fastest[0]
            out.append({"target": f"vitsim ≤ 0.8× the fastest peer ({label})",
                        "measured": f"{ratio:.2f}× of {fastest[1]} ({_fmt_time(v_s)} vs "
                                    f"{_fmt_time(fastest[0])}; its error {fastest[2]:.1e}; {v_src})",
                        "met": ratio <= 0.8})
        out.append({"target": f"vitsim error ≤ 1e-8 ({label})", "measured": _fmt_err(v["error"]),
                    "met": v["error"] <= 1e-8})
        if "vitsim" in floor_inter.get(name, {}):
            out += _floor_target(name, case, floor_inter[name]["vitsim"]["median_s"], floor_inter,
                                 "vitsim and the floors alone")
        else:
            out += _floor_target(name, case, v_s, inter, "interleaved")
    # The hook-based packages issue 7 names offer only the unbiased estimator: judged on
    # W6-unbiased.
    wu = by_case.get("W6-unbiased")
    if wu:
        vu = {r["peer"]: r for r in wu["rows"]}.get("vitsim", {})
        if vu.get("status") == "ok":
            vu_s, _ = median("W6-unbiased", vu)
            for row in wu["rows"]:
                if row["peer"] not in HOOK_TARGETS:
                    continue
                name = f"vitsim ≥ 8× faster than {row['peer']} (W6 unbiased)"
                if row["status"] == "ok":
                    t, src = median("W6-unbiased", row)
                    out.append({"target": name, "measured": f"{t / vu_s:.1f}× ({src})",
                                "met": t / vu_s >= 8})
                else:
                    out.append({"target": name, "measured": row["status"], "met": True})
    return out


def _floor_target(name: str, case: dict, vitsim_s: float, inter: dict, run: str) -> list[dict]:
    """vitsim's time over the GEMM floor: the fastest way measured to form the products (plain
    GEMMs, symmetric blocks, or one BLAS syrk per self term), from the interleaved run if any."""
    entries = inter.get(name, {})
    floors = {k: e["median_s"] for k, e in entries.items() if k.startswith("GEMM floor")}
    if floors:
        which = min(floors, key=floors.get)
        floor, src = floors[which], f"{run}, {which}"
    else:
        floor, src = case.get("gemm_floor", {}).get("floor_s"), "main table"
    if not floor:
        return []
    r = vitsim_s / floor
    return [{"target": f"vitsim within 1.2× of the GEMM floor ({name.replace('-', ' ')})",
             "measured": f"{r:.2f}× ({_fmt_time(vitsim_s)} vs {_fmt_time(floor)}; {src})",
             "met": r <= 1.2}]


def _interleaved(out_dir: Path, stem: str) -> dict:
    path = out_dir / f"{stem}-interleaved.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {c["case"]["name"]: c["entries"] for c in data["cases"]}


def write_report(report: dict, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["targets"] = targets(report, _interleaved(out_dir, stem),
                                _interleaved(out_dir, f"{stem}-floor"))
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text(markdown(report))


def compare(args) -> None:
    from peer_adapters import BY_NAME, PEERS

    cases = QUICK_CASES if args.quick else list(CPU_CASES)
    if args.device == "cuda" and not args.quick:
        cases += GPU_EXTRA
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c.name in wanted]
    names = args.peers.split(",") if args.peers else [p.name for p in PEERS]
    if "vitsim" not in names:
        names.insert(0, "vitsim")
    python = args.python or sys.executable
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="vitsim-peers-"))
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "command": " ".join(["python"] + sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(args.device),
              "versions": versions(names), "peers": names, "offset": args.offset,
              "settings": {"repeats": args.repeats, "budget_s": args.budget,
                           "timeout_s": args.timeout, "cold_limit_s": args.cold_limit},
              "cases": []}
    stem = args.stem or f"peers-{args.device}" + ("-quick" if args.quick else "")
    previous = {}
    if args.merge:
        # Re-measure only the named rows (and the GEMM floor); keep every other row as it was.
        old = json.loads((Path(args.out_dir) / f"{stem}.json").read_text())
        previous = {c["name"]: c for c in old["cases"]}
        report["peers"] = old["peers"]
        report["versions"] = {**old["versions"], **report["versions"]}
        report["command"] = old["command"] + " ; then " + report["command"]
    for case in cases:
        print(f"== {case.label()}", flush=True)
        case_dir, x, y = write_case(work, case, args.offset)
        ref, ref_s = _cached_reference(case, x, y, cache, args.offset)
        del x, y
        print(f"   reference {ref:.12f} ({ref_s:.1f} s)", flush=True)
        entry = {"name": case.name, "label": case.label(), "case": asdict(case), "reference": ref,
                 "reference_s": ref_s, "rows": [], "loadavg_before": os.getloadavg()}
        floor = run_worker("gemm-floor", case_dir, args, python)
        entry["gemm_floor"] = floor
        print(f"   gemm floor: {json.dumps(floor)}", flush=True)
        for name in names:
            peer = BY_NAME[name]
            row = {"peer": name, "dist": peer.dist, "entry": peer.entry, "style": peer.style}
            if not peer.supports(case.kernel, case.unbiased):
                row.update(status="n/a", message=f"{'/'.join(peer.kernels)} kernel, "
                           f"{'/'.join(peer.estimators)} estimator only")
            elif args.device not in peer.devices:
                row.update(status="n/a", message=f"runs on {'/'.join(peer.devices)} only")
            else:
                row.update(run_worker(name, case_dir, args, python))
                if row["status"] == "ok":
                    row["error"] = abs(row["value"] - ref)
            entry["rows"].append(row)
            brief = (f"{row['value']:.10f} err {row['error']:.1e} {_fmt_time(row['median_s'])}"
                     if row["status"] == "ok" else f"{row['status']}: {row.get('message', '')[:100]}")
            print(f"   {name:24s} {brief}", flush=True)
        entry["loadavg_after"] = os.getloadavg()
        if case.name in previous:
            fresh = {r["peer"]: r for r in entry["rows"]}
            for r in fresh.values():
                r["remeasured"] = entry["loadavg_before"]
            entry["rows"] = [fresh.get(r["peer"], r) for r in previous[case.name]["rows"]]
        report["cases"].append(entry)
        if previous:
            done = {c["name"]: c for c in report["cases"]}
            report["cases"] = ([done.get(n, c) for n, c in previous.items()]
                               + [c for n, c in done.items() if n not in previous])
        write_report(report, Path(args.out_dir), stem)
        if not args.data_dir:
            shutil.rmtree(case_dir, ignore_errors=True)
    if args.device == "cuda" and args.scan and not args.quick:
        report["scan"] = scan_largest_n(args, names, python, work)
    write_report(report, Path(args.out_dir), stem)
    print(f"wrote {Path(args.out_dir) / stem}.md and .json", flush=True)


def scan_largest_n(args, names, python, work: Path) -> dict:
    """Double n at d1 = d2 = `--scan-d` until a package fails, runs out of memory or times out."""
    from peer_adapters import BY_NAME

    out = {}
    scan_args = argparse.Namespace(**{**vars(args), "repeats": 1, "budget": 0.0,
                                      "timeout": args.scan_timeout})
    for name in names:
        peer = BY_NAME[name]
        if "cuda" not in peer.devices or not peer.supports("linear", True):
            continue
        largest, failure, n = 0, "none up to the scan limit", 4096
        while n <= args.scan_max_n:
            case = Case(f"scan-{n}", n, args.scan_d, args.scan_d, "linear", True)
            case_dir = work / case.name
            if not (case_dir / "x.npy").exists():
                write_case(work, case)
            rec = run_worker(name, case_dir, scan_args, python)
            if rec["status"] != "ok":
                failure = f"n={n:,}: {rec['status']} {rec.get('message', '')[:60]}"
                break
            largest = n
            n *= 2
        out[name] = {"largest": largest, "failure": failure, "d": args.scan_d}
        print(f"   scan {name}: {out[name]}", flush=True)
    return out


def interleave_report(args) -> None:
    """Parent of `--interleave`: one worker per case, a table of median and fastest times."""
    cases = [c for c in (QUICK_CASES if args.quick else CPU_CASES + GPU_EXTRA)
             if not args.cases or c.name in args.cases.split(",")]
    names = args.interleave.split(",")
    if "vitsim" not in names:
        names.insert(0, "vitsim")
    python = args.python or sys.executable
    work = Path(args.data_dir or tempfile.mkdtemp(prefix="vitsim-peers-"))
    report = {"device": args.device, "command": " ".join(["python"] + sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(args.device),
              "versions": versions(names), "rounds": args.rounds, "cases": []}
    md = [f"# Interleaved timing ({args.device.upper()}): vitsim, peers and GEMM floors in turn", "",
          f"Command: `{report['command']}`  ", f"Date: {report['date']}  ",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()) + "  ",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
          f"Each round calls every entry once, in turn, in one process ({args.rounds} rounds "
          "after one untimed call each), so a change of machine load falls on all of them alike. "
          f"GEMM floor, symmetric: XcᵀYc plus the upper {args.block}-wide blocks of XcᵀXc and "
          "YcᵀYc (Gram space: of XcXcᵀ and YcYcᵀ) on pre-centred float32 inputs, with torch. "
          "GEMM floor, syrk (CPU): the same products through NumPy's BLAS, where `aᵀ @ a` runs "
          "as one syrk.", ""]
    for case in cases:
        case_dir, _, _ = write_case(work, case, args.offset)
        cmd = [python, str(Path(__file__).resolve()), "--interleave-worker", "--interleave",
               ",".join(names), "--data-dir", str(case_dir), "--device", args.device,
               "--rounds", str(args.rounds), "--block", str(args.block)]
        load_before = os.getloadavg()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(HERE.parent),
                              env=dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore"))
        line = next((l for l in proc.stdout.splitlines() if '"kind": "result"' in l), None)
        if line is None:
            print(proc.stderr[-2000:], flush=True)
            continue
        rec = json.loads(line)
        rec["loadavg"] = [load_before, os.getloadavg()]
        report["cases"].append(rec)
        entries = rec["entries"]
        v = entries["vitsim"]
        md += [f"## {case.label()}", "", f"vitsim source: {rec['source']}.", "",
               f"Load average before / after: {', '.join(f'{a:.1f}' for a in load_before)} / "
               f"{', '.join(f'{a:.1f}' for a in os.getloadavg())}.", "",
               "| entry | median | fastest | median × vitsim | fastest × vitsim |",
               "|---|---|---|---|---|"]
        for name, e in entries.items():
            md.append(f"| {name} | {_fmt_time(e['median_s'])} | {_fmt_time(e['min_s'])} | "
                      f"{e['median_s'] / v['median_s']:.2f}× | {e['min_s'] / v['min_s']:.2f}× |")
        md.append("")
        print("\n".join(md[-len(entries) - 3:]), flush=True)
        if not args.data_dir:
            shutil.rmtree(case_dir, ignore_errors=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main_stem = args.stem or f"peers-{args.device}" + ("-quick" if args.quick else "")
    stem = main_stem + "-interleaved"
    if args.merge and (out_dir / f"{stem}.json").exists():
        # Keep the cases of the earlier interleaved run that this one did not repeat.
        old = json.loads((out_dir / f"{stem}.json").read_text())
        fresh = {c["case"]["name"] for c in report["cases"]}
        kept = [c for c in old["cases"] if c["case"]["name"] not in fresh]
        report["cases"] = kept + report["cases"]
        report["command"] = old["command"] + " ; then " + report["command"]
        old_md = (out_dir / f"{stem}.md").read_text().split("\n## ")
        md += ["## " + part for part in old_md[1:]
               if part.split(":")[0] in {c["case"]["name"] for c in kept}]
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / stem}.md and .json", flush=True)
    main_json = out_dir / f"{main_stem}.json"
    if main_json.exists():
        # The targets of the main report are judged from these interleaved times.
        write_report(json.loads(main_json.read_text()), out_dir, main_json.stem)


# --- bad inputs -----------------------------------------------------------------------------


def bad_inputs(seed: int = 0) -> dict:
    """The malformed inputs of issue 7, as `(x, y)` torch tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g)
    y = torch.tanh(x[:, :16]) + 0.5 * torch.randn(64, 16, generator=g)
    nan_x = x.clone()
    nan_x[3, 5] = float("nan")
    return {
        "mismatched n": (x, y[:63]),
        "NaN": (nan_x, y),
        "n = 2": (x[:2], y[:2]),
        "constant features": (torch.full_like(x, 3.0), y),
        "integer dtype": ((x * 10).to(torch.int64), (y * 10).to(torch.int64)),
        "1-D input": (x[:, 0].contiguous(), y[:, 0].contiguous()),
    }


def _classify(fn) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                value = fn()
        except Exception as exc:  # noqa: BLE001
            from peer_adapters import NotExpressible

            if isinstance(exc, NotExpressible):
                return {"outcome": "n/a", "detail": str(exc)}
            return {"outcome": "error", "detail": f"{type(exc).__name__}: {str(exc)[:160]}"}
    warned = [f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught
              if issubclass(w.category, RuntimeWarning)]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {"outcome": "NaN", "detail": "; ".join(warned)[:200], "warned": bool(warned)}
    return {"outcome": "number", "value": value, "detail": "; ".join(warned)[:200],
            "warned": bool(warned)}


def bad_inputs_worker(args) -> None:
    """Run every bad input through one package; JSON on stdout."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    from peer_adapters import BY_NAME

    peer = BY_NAME[args.bad_worker]
    unbiased = "unbiased" in peer.estimators if not args.biased else False
    out = {"estimator": "unbiased" if unbiased else "biased", "results": {}}
    for label, (x, y) in bad_inputs().items():
        out["results"][label] = _classify(lambda: peer.call(peer.prepare(x, y), "linear", unbiased))
    print("RESULT " + json.dumps(out), flush=True)


def _cell(rec: dict) -> str:
    if rec["outcome"] == "error":
        return f"error ({rec['detail'].split(':')[0]})"
    if rec["outcome"] == "n/a":
        return "cannot express"
    if rec["outcome"] == "NaN":
        return "NaN + warning" if rec.get("warned") else "NaN, silent"
    return f"silent number {rec['value']:.4g}" + (" + warning" if rec.get("warned") else "")


def bad_inputs_report(args) -> None:
    from peer_adapters import BY_NAME, PEERS

    names = args.peers.split(",") if args.peers else [p.name for p in PEERS]
    python = args.python or sys.executable
    rows = []
    runs = [(n, False) for n in names]
    if "vitsim" in names:
        runs.insert(names.index("vitsim") + 1, ("vitsim", True))
    for name, biased in runs:
        cmd = [python, str(Path(__file__).resolve()), "--bad-worker", name]
        if biased:
            cmd.append("--biased")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env=dict(os.environ, TQDM_DISABLE="1"), cwd=str(HERE.parent))
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rec = {"estimator": "—", "failed": tail[:200]}
            else:
                rec = json.loads(line[len("RESULT "):])
        except subprocess.TimeoutExpired:
            rec = {"estimator": "—", "failed": f"timeout after {args.timeout} s"}
        rec["peer"], rec["entry"] = name, BY_NAME[name].entry
        rows.append(rec)
        print(f"   {name:24s} {json.dumps(rec)[:300]}", flush=True)
    labels = list(bad_inputs().keys())
    report = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "versions": versions(names), "rows": rows}
    md = ["# What each CKA package does with bad input", "",
          f"Command: `{report['command']}`  ", f"Date: {report['date']}  ",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
          "Linear kernel, x `(64, 32)` and y `(64, 16)` float32 unless the column says otherwise; "
          "the estimator is the package's unbiased one where it has one. \"silent number\" is a "
          "value returned with no error and no warning; \"cannot express\" means the package's "
          "documented entry point (one DataLoader feeding both models) cannot take the input.", "",
          "| package | estimator | " + " | ".join(labels) + " |",
          "|---|---|" + "---|" * len(labels)]
    for rec in rows:
        if "failed" in rec:
            cells = [f"failed: {rec['failed'][:60]}"] * len(labels)
        else:
            cells = [_cell(rec["results"][l]) for l in labels]
        md.append(f"| {rec['peer']} | {rec['estimator']} | " + " | ".join(cells) + " |")
    md += ["", "For vitsim, n = 2 is valid for the biased estimator (conventions §3: n ≥ 2; CKA of two "
           "distinct points is exactly 1), and constant features give NaN with a RuntimeWarning "
           "naming the input, as conventions §3 prescribes; every other bad input is an error naming the "
           "argument (conventions §7). A number for integer input can be the right CKA of those integers "
           "(the package casts them); vitsim refuses non-float dtypes by design.",
           "", "Messages:", ""]
    for rec in rows:
        if "failed" in rec:
            continue
        for label in labels:
            r = rec["results"][label]
            if r.get("detail"):
                md.append(f"- {rec['peer']} ({rec['estimator']}), {label}: {r['detail']}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "peers-bad-inputs"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / stem}.md and .json", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", help="comma-separated case names (default: all for the device)")
    p.add_argument("--peers", help="comma-separated package rows (default: all; vitsim always)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (max)")
    p.add_argument("--budget", type=float, default=30.0,
                   help="stop timing once the timed calls add up to this many seconds")
    p.add_argument("--cold-limit", type=float, default=120.0,
                   help="a warm-up call longer than this is reported alone (flagged cold)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-call limit in seconds")
    p.add_argument("--offset", type=float, default=0.0, help="common offset added to x and y")
    p.add_argument("--quick", action="store_true", help="tiny cases: checks the plumbing")
    p.add_argument("--bad-inputs", action="store_true", help="run the bad-input table instead")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, find the largest n each package still runs at")
    p.add_argument("--scan-d", type=int, default=1024)
    p.add_argument("--scan-max-n", type=int, default=1 << 20)
    p.add_argument("--scan-timeout", type=float, default=300.0)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--stem", help="output file stem (default peers-<device>)")
    p.add_argument("--data-dir", help="keep the generated inputs here (default: a temp dir)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "vitsim-peers-cache"),
                   help="where float64 reference values are cached between runs")
    p.add_argument("--python", help="interpreter for the workers (default: this one)")
    p.add_argument("--merge", action="store_true",
                   help="re-measure only --peers (and the GEMM floor) into the existing JSON")
    p.add_argument("--render", metavar="JSON",
                   help="rewrite the Markdown of an earlier run from its JSON (no measuring)")
    p.add_argument("--interleave", metavar="PEERS",
                   help="with --cases: call these rows and the GEMM floors in turn in one process "
                        "(A/B timing on a shared machine); writes <stem>-interleaved.{md,json}")
    p.add_argument("--rounds", type=int, default=7, help="rounds of --interleave")
    p.add_argument("--block", type=int, default=512, help="block of the symmetric GEMM floor")
    p.add_argument("--interleave-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--bad-worker", help=argparse.SUPPRESS)
    p.add_argument("--biased", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        for case in report["cases"]:
            for row in case["rows"]:
                if row["status"] == "failed" and "can't allocate" in row.get("message", ""):
                    row["status"] = "oom"
        write_report(report, path.parent, path.stem)
    elif args.interleave_worker:
        interleaved(args)
    elif args.interleave:
        interleave_report(args)
    elif args.worker:
        worker(args)
    elif args.bad_worker:
        bad_inputs_worker(args)
    elif args.bad_inputs:
        bad_inputs_report(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
