# Two commands from a fresh clone:  make demo  |  make test   (each sets up .venv when missing)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo tune test test-gpu clean-runs

setup: $(STAMP)

# Reinstalls when pyproject.toml changes. pip (not uv/poetry) takes torch from the local wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m jobs.pipeline

tune: setup
	$(PY) -m jobs.tune

# Two pytest processes, each test file whole in one of them (its module fixtures run once); the
# whole-process runs go first (tests/conftest.py) so the quick files fill in beside them.
# make test TEST_WORKERS=0 runs in one process. The suite is written for the CPU, as CI runs it: a
# GPU stays hidden from it (CUDA_VISIBLE_DEVICES empty), or runtime.device auto would train its
# runs on CUDA, where the bit-for-bit checks and the CPU paths' expectations are not meant to hold.
# There tests/test_cuda.py runs on its CPU stand-in; make test-gpu runs it on the GPU instead, and
# fails where torch sees none (TRUEFACE_REQUIRE_CUDA).
TEST_WORKERS ?= 2
test: setup
	CUDA_VISIBLE_DEVICES= $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=10

test-gpu: setup
	TRUEFACE_REQUIRE_CUDA=1 $(PY) -m pytest tests/test_cuda.py -v -rs

clean-runs:
	rm -rf runs results/demo results/demo-*
