# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitsim-installed

.PHONY: demo test bench-cpu report-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,timm,plot,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitsim demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-cpu: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only

report-smoke: $(STAMP)
	$(PY) benchmarks/report.py --smoke

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
