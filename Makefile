# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test layers lint bench clean

# The ffcv extra builds a C extension against system OpenCV and libjpeg-turbo: tools/system-deps.sh
# installs them where it can (root and apt-get, as on CI); where they cannot be had, or ffcv does
# not build, kdcache installs without it and the FFCV tests skip, saying why.
$(STAMP): pyproject.toml tools/system-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	bash tools/system-deps.sh && $(BIN)/python -m pip install --quiet -e '.[dev,ffcv]' \
		|| echo "make: the ffcv extra is not installed; the FFCV tests will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdcache demo --out runs/demo

test: $(STAMP) layers
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The layers contract in pyproject.toml ([tool.importlinter]), checked by import-linter. grimp
# sees only common/ in the editable install (package-dir maps three folders into kdcache), so
# the check runs against a regular install of a copy of the sources in a temporary directory.
layers: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && mkdir "$$tmp/src" && \
	cp -r pyproject.toml README.md common cache train "$$tmp/src/" && \
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --target "$$tmp/site" \
		"$$tmp/src" && \
	cd "$$tmp" && PYTHONPATH="$$tmp/site" "$(CURDIR)/$(BIN)/lint-imports" --no-cache \
		"$(CURDIR)/pyproject.toml"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
