# Two entry points for a fresh machine: `make run` and `make test`.
# Both bootstrap .venv when it is missing or pyproject.toml changed, and are no-ops otherwise.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROFILE ?= default
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
# Bytecode is cached where Python imports it: the first process that imports a module compiles it
# once, and only what the pipeline imports is ever compiled. Where the environment sets
# PYTHONDONTWRITEBYTECODE=1 (as these machines do) nothing would be cached and every process would
# compile torch again (26.6-29.0 s of imports against 9.5-9.9, docs/MEASURED.md); an empty value unsets it.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: run test test-fast bench report serve clean-venv

# tools/install_venv.py: uv (pip's sources handed to it; pip as the fallback), the `dataclasses` backport removed
$(STAMP): pyproject.toml tools/install_venv.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python tools/install_venv.py $(VENV)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/unclip --profile $(PROFILE) run

# The report tests open the HTML pages in headless Chromium: Debian's package (no browser download).
CHROMIUM := /usr/bin/chromium
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium \
	  || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

# Test files run on TEST_WORKERS pytest-xdist workers, a whole file per worker (--dist loadfile:
# a module's fixtures, such as test_flow's trained workspace, are built once); tests/conftest.py
# gives each worker its share of the CPU threads. Half the suite waits on subprocesses and servers
# with one core idle: on 2 cores 2 workers take 10.4 min where one took 17.2 (docs/MEASURED.md: "the tests on two workers").
TEST_WORKERS ?= 2
test: $(STAMP) $(CHROMIUM)
	UNCLIP_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# ML ops: a Prefect server on 127.0.0.1:$(PREFECT_PORT) (UI and API) and the scheduled retraining
# deployment served from this process (flows/deploy.py); CRON and PROFILE choose when and what.
# The API is locked: an auth string (PREFECT_API_AUTH_STRING, else .unclip/prefect-auth, generated
# 0600), CORS for its own origin only, CSRF on; runs only in this workspace, one at a time.
PREFECT_PORT ?= 4200
CRON    ?= 0 3 * * *
serve: $(STAMP)
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.deploy --start-server \
	  --port $(PREFECT_PORT) --cron "$(CRON)" --profile $(PROFILE) --workspace .

# rebuild the latest run's report (reports/<run>/report.html); compare: unclip report compare A B
report: $(STAMP)
	$(BIN)/unclip report latest

bench: $(STAMP)
	$(BIN)/python bench/embed.py

clean-venv:
	rm -rf $(VENV)
