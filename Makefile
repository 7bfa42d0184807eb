# Centralino: `make run` runs the platform's main flow, `make test` passes the tests.
# Both work from a clean checkout: they do their own setup.

SHELL := /bin/bash
PYTHON ?= python3.11
CACHE ?= $(or $(CENTRALINO_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/centralino)
# The virtualenv lives in the cache, named by the hash of the lock file, so a fresh
# clone on the same machine (as CI is) reuses it; `.venv` is a link to it.
LOCK_HASH := $(shell sha256sum requirements.lock | cut -c1-16)
VENV_DIR := $(CACHE)/venv-$(LOCK_HASH)
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard proto/centralino/v1/*.proto)

export CENTRALINO_CACHE := $(CACHE)
export PIP_CACHE_DIR := $(CACHE)/pip
export PYTHONPATH := $(CURDIR):$(CURDIR)/gen
export PIP_DISABLE_PIP_VERSION_CHECK := 1

TRACE_PNG ?= .stack/trace.png

.PHONY: setup venv proto infra-install infra-up infra-down infra-status test test-unit run lint lock clean \
	dashboard-up dashboard-down trace-screenshot chromium bench

setup: venv proto infra-install

venv: $(VENV_DIR)/.installed
	@ln -sfn $(VENV_DIR) $(VENV)

$(VENV_DIR)/.installed: requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	rm -rf $(VENV_DIR)
	$(PYTHON) -m venv $(VENV_DIR)
	$(VENV_DIR)/bin/pip install -q -r requirements.lock
	touch $@

proto: gen/.stamp

gen/.stamp: $(PROTOS) | venv
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I proto --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	touch $@

infra-install: venv
	$(PY) -m infra.stack install

infra-up: setup
	$(PY) -m infra.stack up

infra-down: venv
	$(PY) -m infra.stack down

infra-status: venv
	$(PY) -m infra.stack status

# The test session starts its own Kafka and MongoDB-wire database on free ports
# (or testcontainers where Docker answers) and stops them at the end.
test: setup
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

run: infra-up
	$(PY) -m services.demo

# The tracing dashboard: Zipkin (UI and API) on http://127.0.0.1:9411 (ZIPKIN_PORT moves it).
# Services send it their traces with OTEL_TRACES_EXPORTER=zipkin, e.g.
#   make dashboard-up && OTEL_TRACES_EXPORTER=zipkin make run
dashboard-up: venv
	$(PY) -m infra.stack dashboard-up

dashboard-down: venv
	$(PY) -m infra.stack dashboard-down

# One onboarding traced end to end (console -> agents gRPC -> MongoDB -> Kafka -> Faust -> MongoDB),
# checked through Zipkin's API and photographed in its UI by headless Chromium into $(TRACE_PNG).
trace-screenshot: infra-up dashboard-up chromium
	$(PY) -m tools.trace_journey --screenshot $(TRACE_PNG)

# Debian's Chromium, installed on first use (root, as on the project's machines; sudo otherwise).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

lint: setup
	$(VENV)/bin/ruff check services infra tests tools bench
	$(VENV)/bin/mypy services infra tests tools bench

# Routing benchmark (not a test): its own Kafka + database, the agents and routing servers,
# open-loop load at rising rates; figures in bench/results/ (latest.md and a JSON per run).
# Knobs: BENCH_STEPS, BENCH_STEP_S, BENCH_AGENTS, ... (see bench/routing.py).
# Then FerretDB as released against our patched build (bench/ferretdb.py), kafka-python against
# librdkafka (bench/kafka_producers.py), queue figures old against new (bench/queue_stats.py) and the
# router's start-up from a checkpoint against the whole log (bench/recovery.py), and what grows with
# uptime, old way against new (bench/agent_history.py), side by side.
bench: setup
	$(PY) -m bench.routing
	$(PY) -m bench.ferretdb
	$(PY) -m bench.kafka_producers
	$(PY) -m bench.queue_stats
	$(PY) -m bench.recovery
	$(PY) -m bench.agent_history

# Re-resolve the pinned dependency set after editing pyproject.toml.
lock:
	rm -rf /tmp/centralino-lock && $(PYTHON) -m venv /tmp/centralino-lock
	/tmp/centralino-lock/bin/pip install -q '.[dev]'
	(echo '# Exact versions installed by `make setup` (pip install -r). Regenerate with `make lock` after changing pyproject.toml.'; \
	 /tmp/centralino-lock/bin/pip freeze --exclude centralino) > requirements.lock

clean:
	rm -rf gen .venv .pytest_cache .mypy_cache .ruff_cache
