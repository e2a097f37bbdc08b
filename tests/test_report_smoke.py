"""`benchmarks/report.py --smoke` end to end on CPU: files written, every field present (< 60 s)."""

import importlib.util
import json
from pathlib import Path

import pytest

from vitsim.bench import runner

ROOT = Path(__file__).resolve().parents[1]


def _report_script():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_smoke_writes_json_and_markdown(tmp_path, capsys):
    args = ["--smoke", "--suite", "cka", "--device", "cpu", "--out", str(tmp_path)]
    status = _report_script().main(args)
    assert status == 0
    files = sorted(tmp_path.iterdir())
    assert [p.suffix for p in files] == [".json", ".md"]
    report = json.loads(files[0].read_text())
    for key in ("device", "torch", "triton", "date", "command", "suite", "smoke", "ceilings",
                "workloads"):
        assert key in report, key
    assert report["smoke"] is True and report["suite"] == "cka"
    assert "--smoke" in report["command"]
    for name in ("matmul_bf16", "matmul_tf32", "copy"):
        assert report["ceilings"][name]["value"] > 0
    names = [row["name"] for row in report["workloads"]]
    assert sum(n.startswith("W1") for n in names) == 2
    assert sum(n.startswith("W2") for n in names) == 3
    assert any(n.startswith("Moonshot") for n in names)
    for row in report["workloads"]:
        assert row["status"] == "ok", row
        assert row["suite"] == "cka"
        assert row["seconds"] > 0 and row["repeats"] >= 3
        assert row["tflops"] > 0 and row["pct_of_ceiling"] > 0
        assert row["baseline_seconds"] > 0 and row["ratio"] > 0
        # the CPU torch path (float32 products) against the float64 reference
        assert row["error"] < 1e-5
        assert 0 < row["value"] < 1
    markdown = files[1].read_text()
    assert "## Measured ceilings" in markdown and report["device"] in markdown
    for name in names:
        assert name in markdown
    printed = capsys.readouterr().out
    assert "| workload |" in printed and "wrote" in printed


def test_unknown_suite_is_rejected():
    with pytest.raises(ValueError, match="suite"):
        runner.discover("cpu", True, suite="nope")
