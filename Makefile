# The two commands of the README: `make demo` and `make test` (and `make test-fast`).
# Each creates (or updates) the virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first: on these machines pip takes the CPU build from local disk, while an
# unpinned torch would pull a multi-GB CUDA build. Clusters install their own (deploy/Dockerfile).
# The labelling page's browser test drives Debian's chromium through Playwright (which cannot
# download browsers of its own here); installing it needs root, elsewhere that test skips.
$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: 'apt-get install chromium' (as root) for the browser test of the labelling page"; fi; }
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python orchestrator/run.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# The fast tier: no Ray, browser or subprocess (README); `make test` runs everything.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
