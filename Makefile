# The README's two commands: `make demo` and `make test`. Both set up what they need themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PKGS := proofs trainer audit rewards
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck pytest setup browser bench clean

setup: $(STAMP) node_modules/.installed browser

# The audit report test renders the page in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report rendering test"; \
	    $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

$(STAMP): pyproject.toml constraints.txt setup.py proofs/_sha256tree.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# merkletools is only a test oracle; its dependency pysha3 no longer builds on Python 3.11,
	# and merkletools' sha256 mode does not need it, so install it without dependencies.
	$(BIN)/python -m pip install -q --no-deps merkletools==1.0.3
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

lint: setup
	$(BIN)/ruff check $(PKGS) tests benchmarks
	$(BIN)/ruff format --check $(PKGS) tests benchmarks

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

demo: $(STAMP) node_modules/.installed
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python benchmarks/merkle_bench.py
	$(BIN)/python benchmarks/payout_bench.py

clean:
	rm -rf $(VENV) node_modules
