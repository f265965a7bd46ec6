# The README's commands. Each one installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PHOTOS ?= ../shared/data/photos
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	PY=$(PY) PHOTOS=$(PHOTOS) bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -ra --durations=10 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
