# Two commands from a fresh clone:  make demo  |  make test   (each sets up .venv when missing)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo tune test clean-runs

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

test: setup
	$(PY) -m pytest --durations=10

clean-runs:
	rm -rf runs results/demo results/demo-*
