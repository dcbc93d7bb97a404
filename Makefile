# tapsign: the two commands are `make run` and `make test`; both set everything up first
# (virtualenv, packages, SoftHSM2 and its token, keys) and are safe to run again.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
VAR    := var

.DEFAULT_GOAL := run
.PHONY: run test setup system-packages venv hsm db lint loadtest crashtest fuzz

# make loadtest SCENARIO=mixed USERS=32 SPAWN_RATE=16 DURATION=60s [URL=… ACCESS_KEY=…]
#   [DATABASE_URL=postgresql+psycopg://root@127.0.0.1:5432/test: the started server on
#   PostgreSQL, in a scratch schema of that database dropped afterwards; HOSTS=3: three
#   tapsign serve process groups on it, each phone talking to another host than its bank]
SCENARIO   ?= mixed
USERS      ?= 32
SPAWN_RATE ?= 16
DURATION   ?= 60s
URL        ?=
ACCESS_KEY ?=
DATABASE_URL ?=
SERVER_WORKERS ?= 0
HOSTS ?= 1

run: setup
	@echo "==> access key for your backend (made on the first run, shown only then)"
	@$(BIN)/tapsign keys create --name "make run" --if-none
	@echo "==> tapsign serve on http://127.0.0.1:8080 with SQLite and SoftHSM2 (Ctrl+C stops)"
	$(BIN)/tapsign serve --host 127.0.0.1 --port 8080

test: setup lint
	@echo "==> pytest"
	$(BIN)/pytest

loadtest: setup
	@echo "==> Locust, scenario $(SCENARIO), $(USERS) users, $(DURATION), report in loadtests/reports/"
	$(BIN)/python -m loadtests.run --scenario $(SCENARIO) --users $(USERS) \
	  --spawn-rate $(SPAWN_RATE) --duration $(DURATION) --server-workers $(SERVER_WORKERS) --hosts $(HOSTS) \
	  $(if $(URL),--url $(URL)) $(if $(ACCESS_KEY),--access-key $(ACCESS_KEY)) \
	  $(if $(DATABASE_URL),--database-url $(DATABASE_URL))

# make crashtest CYCLES=20 CLIENTS=8: SIGKILL the server under load, restart, check (tests/e2e/crash.py)
#   [HOSTS=3 DATABASE_URL=postgresql+psycopg://root@127.0.0.1:5432/test: three servers on
#   one PostgreSQL database, killed one at a time]
CYCLES  ?= 20
CLIENTS ?= 8

crashtest: setup
	@echo "==> crash test: $(CYCLES) kills and restarts under load from $(CLIENTS) clients, $(HOSTS) host(s)"
	$(BIN)/python -m tests.e2e.crash --cycles $(CYCLES) --clients $(CLIENTS) --hosts $(HOSTS) \
	  $(if $(DATABASE_URL),--database-url $(DATABASE_URL))

# make fuzz FUZZ_EXAMPLES=300: many more fuzz cases than make test runs, on SQLite and
# PostgreSQL (skipped, with the reason, where PostgreSQL is not running)
FUZZ_EXAMPLES ?= 300

fuzz: setup
	@echo "==> fuzzing: $(FUZZ_EXAMPLES) cases per route and per property"
	TAPSIGN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TAPSIGN_FUZZ_DATABASES=sqlite,postgresql \
	  $(BIN)/pytest -s -p no:cacheprovider \
	  tests/e2e/test_fuzz.py tests/sdk/test_messages.py tests/sdk/test_payload.py

lint: venv
	@echo "==> ruff check, ruff format --check, mypy --strict, import contracts"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

setup: system-packages venv hsm db

system-packages:
	@softhsm-config/install-packages.sh $(PYTHON)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py hsm/_p256.c sdk/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "tapsign needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@echo "==> creating $(VENV) and installing tapsign with its development tools"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ./sdk -e '.[dev]'
	@touch $@

hsm: system-packages venv
	@softhsm-config/init-token.sh $(VAR) $(BIN)/tapsign

db: venv
	@echo "==> tapsign db upgrade (SQLite in $(VAR)/ unless TAPSIGN_DATABASE_URL says otherwise)"
	@$(BIN)/tapsign db upgrade
