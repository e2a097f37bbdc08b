"""The sdist is a source tree whose tests run, and the wheel declares what it is (issue 13,
item 12): sdist members from MANIFEST.in, SPDX license metadata, one version source."""

import email
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import vitsim

ROOT = Path(__file__).resolve().parents[1]
# build outputs and caches a checkout may hold; none of them belongs in a build's input
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 "*.pyc", ".pytest_cache", ".hypothesis", ".benchmarks",
                                 "vitsim-demo", ".whl", ".ci")
BACKEND = ("import sys, setuptools.build_meta as b; "
           "print(getattr(b, 'build_' + sys.argv[1])(sys.argv[2]))")


def _build(kind: str, source: Path, out: Path) -> Path:
    """Build an sdist or wheel of `source` into `out` without network access (no isolation):
    `python -m build` when it is installed, else the setuptools backend directly."""
    if importlib.util.find_spec("build") is not None:
        cmd = [sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(out)]
    else:
        cmd = [sys.executable, "-c", BACKEND, kind, str(out)]
    done = subprocess.run(cmd, cwd=source, capture_output=True, text=True, timeout=120)
    built = sorted(out.glob("*.tar.gz" if kind == "sdist" else "*.whl"))
    if done.returncode != 0 or not built:
        pytest.skip(f"cannot build the {kind} offline here: {done.stderr.strip()[-300:]}")
    return built[-1]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout (the build writes its egg-info next to the sources)."""
    pytest.importorskip("setuptools")
    copy = tmp_path_factory.mktemp("src") / "vitsim"
    shutil.copytree(ROOT, copy, ignore=IGNORED)
    return copy


@pytest.fixture(scope="module")
def sdist(source, tmp_path_factory) -> Path:
    return _build("sdist", source, tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    return _build("wheel", source, tmp_path_factory.mktemp("wheel"))


def _files(source: Path, folder: str, pattern: str = "*") -> set[str]:
    return {p.relative_to(source).as_posix() for p in (source / folder).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


def _check_metadata(text: str) -> None:
    meta = email.message_from_string(text)
    assert meta["Name"] == "vitsim"
    assert meta["Version"] == vitsim.__version__  # vitsim/_version.py, the one source
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]


def test_sdist_holds_what_its_tests_and_readme_need(source, sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        prefix = names[0].split("/")[0]
        members = {name[len(prefix) + 1:] for name in names if name.startswith(prefix + "/")}
        pkg_info = tar.extractfile(f"{prefix}/PKG-INFO").read().decode()
    assert {"tests/_data.py", "tests/conftest.py"} <= members
    assert _files(source, "tests") <= members  # the whole tests/ folder
    docs = _files(source, "docs", "*.png") | _files(source, "docs", "*.md")
    assert docs and docs <= members  # the README's images and the docs it links
    for script in ("benchmarks/readme_tables.py", "benchmarks/report.py"):  # read by tests
        assert script in members
    assert _files(source, "benchmarks/results") <= members
    assert {"LICENSE", "README.md", "pyproject.toml", "vitsim/_version.py",
            "kernels/hsic_gram.py"} <= members
    assert not any("__pycache__" in m or m.endswith(".pyc") for m in members)
    assert prefix == f"vitsim-{vitsim.__version__}"
    _check_metadata(pkg_info)


def test_wheel_metadata_and_layout(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        dist_info = f"vitsim-{vitsim.__version__}.dist-info"
        metadata = whl.read(f"{dist_info}/METADATA").decode()
    _check_metadata(metadata)
    assert f"{dist_info}/licenses/LICENSE" in names
    assert {"vitsim/__init__.py", "vitsim/_version.py", "vitsim/kernels/__init__.py",
            "vitsim/kernels/hsic_gram.py"} <= names
    # kernels/ installs only as vitsim.kernels; tests and docs stay in the sdist
    assert not any(n.split("/")[0] in ("kernels", "tests", "docs", "benchmarks") for n in names)
