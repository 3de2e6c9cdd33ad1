# Share-of-Model. The README's two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Three workers on this 2-core machine: most tests wait on servers, agents and browsers; files stay
# whole on one worker (--dist loadfile), so module-scoped servers are never shared across workers.
PYTEST_ARGS ?= -n 3 --dist loadfile

.PHONY: install demo browser jail oidc jsfmt test test-fast test-slow bench bench-peers lint docs clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps -c constraints.txt flwr  # Flower: its own pins conflict (pyproject)
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py
	$(PY) examples/federated_demo.py

# Debian's Chromium for the web UI's browser tests (tests/marketplace/test_web_ui.py); root only.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || echo "chromium is missing (run 'make browser' as root): the browser tests will be skipped"

# bubblewrap for the custom-job jail (marketplace/services/jail.py, tests/security/test_jail.py); root only.
jail:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } || echo "bubblewrap is missing (run 'make jail' as root): custom jobs will be refused and the jail tests fail"

# The real OpenID Provider of the SSO tests (panva's oidc-provider, tests/oidc/provider.mjs), from
# the committed package-lock.json into tests/oidc/node_modules. Needs node and npm (root: from Debian).
oidc:
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } || echo "npm is missing (run 'make oidc' as root): the SSO tests will be skipped"
	@if command -v npm >/dev/null && [ ! tests/oidc/node_modules/.package-lock.json -nt tests/oidc/package-lock.json ]; then cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error; fi

test: install browser jail oidc
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/run.py --out docs/benchmarks.md

bench-peers:
	bash bench/peers/run.sh

# The web UI's formatter: prettier from the committed marketplace/web/package-lock.json (npm from Debian).
jsfmt:
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
	@if [ ! marketplace/web/node_modules/.package-lock.json -nt marketplace/web/package-lock.json ]; then cd marketplace/web && npm ci --no-audit --no-fund --loglevel=error; fi

lint: install jsfmt
	marketplace/web/node_modules/.bin/prettier --check "marketplace/web/static/*.js"
	$(VENV)/bin/ruff format --check crypto contracts marketplace tests bench examples
	$(VENV)/bin/ruff check crypto contracts marketplace
	$(VENV)/bin/mypy crypto contracts marketplace

docs: install
	$(PY) -m pytest -q tests/test_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
