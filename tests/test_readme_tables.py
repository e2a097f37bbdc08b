"""The README's peer tables are the results files' tables (issue 7: never typed by hand)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_peer_tables_match_the_results_files():
    assert _module().main(["--check"]) == 0, "run: python benchmarks/readme_tables.py"


def test_the_check_fails_on_a_hand_edit(tmp_path, monkeypatch):
    module = _module()
    edited = module.README.read_text().replace("| vitsim |", "| vitsim (edited) |", 1)
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1
