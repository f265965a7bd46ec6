# The README's commands. Each one installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PHOTOS ?= ../shared/data/photos
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[cpu,jax,torch,dev]'
	touch $@

install: $(VENV)/.installed

# Debian's chromium for the web page's browser test (Playwright drives it; it never downloads one).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } \
	  || echo "warning: no chromium (apt-get install chromium as root); the browser test will be skipped"; }

demo: install
	PY=$(PY) PHOTOS=$(PHOTOS) bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The suite runs in two processes (pytest-xdist), each module whole in one: its Redis databases,
# workers and model fixtures are per module or per session. PYTEST_PARALLEL= runs it in one.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

test: lint browser
	$(PY) -m pytest -q -ra --durations=10 $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
