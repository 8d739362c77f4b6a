# flower-large-batch: `make run` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements.lock | cksum | cut -d' ' -f1)
PIP := --quiet --disable-pip-version-check
RUN_CONFIG ?=
FEDERATION_CONFIG ?=
OUT ?=

NODES ?= 3

.PHONY: install lock run test bench deploy-local clean

# Installs the locked versions (requirements.lock); a failed install stops make.
$(STAMP): requirements.txt requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(BIN)/pip install $(PIP) -r requirements.txt -c requirements.lock 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	set -o pipefail; $(BIN)/pip install $(PIP) --no-deps -e . 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	cd /tmp && $(abspath $(BIN))/python -c "import flb, torch, torchvision, flwr, flwr_datasets, ray, sklearn, pandas, matplotlib, nbclient, ipykernel, pytest, opacus"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m flb.launch --run-config "$(RUN_CONFIG)" --federation-config "$(FEDERATION_CONFIG)" --out "$(OUT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_sim

deploy-local: $(STAMP)
	$(BIN)/python -m deploy.local --nodes $(NODES) --check-intruder --run-config "num-server-rounds=3 $(RUN_CONFIG)"

# Refresh the lock: a throwaway venv gets the newest versions requirements.txt allows.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	set -o pipefail; .lock-venv/bin/pip install $(PIP) -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	{ sed -n '1,4p' requirements.lock; .lock-venv/bin/pip freeze $(PIP); } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv
	git diff --stat requirements.lock

clean:
	rm -rf results .flwr
