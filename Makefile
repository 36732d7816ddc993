# Two commands do all set-up on a fresh machine:  make demo  and  make test.
# Both create .venv, install torch==2.13.0 (the CPU build on local disk) when the venv
# has no torch, and install this package with --no-build-isolation so that no other
# torch (a multi-GB CUDA build) is ever pulled.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fusedattn-installed
# transformers (optional for users) is installed so the tests of fusedattn.integrations.transformers
# run; it does not depend on torch, so pip leaves torch 2.13.0 alone (checked with pip --dry-run)
DEPS   := triton==3.9.0 pybind11 ninja numpy matplotlib pytest pytest-benchmark hypothesis ruff \
          transformers==5.24.0

.PHONY: install demo test lint bench compile-check clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q $(DEPS)
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import torch, fusedattn; print('torch', torch.__version__, '| backends:', fusedattn.available_backends())"
	touch $@

demo: $(STAMP)
	$(PY) -m fusedattn.demo --quick --out out/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

compile-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m fusedattn.tools.gpu_compile_check --arch 80 90

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests
	mkdir -p out
	env -u TRITON_INTERPRET $(PY) -m fusedattn.tools.gpu_compile_check --arch 80 90 --jobs 2 --json out/cc.json --sass-dir out/sass

bench: $(STAMP)
	mkdir -p out
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-json=out/bench-pytest.json -q
	$(PY) -m fusedattn.bench --json out/bench.json --plot docs/perf.png --markdown out/perf.md

clean:
	rm -rf build out *.egg-info python/fusedattn/_C*.so
